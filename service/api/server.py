"""Running the service: ``serve(host, port, settings)`` and the ``dhrclip serve`` sub-command.

``dhrclip serve [--host H] [--port P] [--env-file F] [--log-level L]``: settings come from ``DHR_*`` environment
variables and the ``.env`` file (or ``--env-file``); an invalid setting ends the command with one line naming it
and exit status 2. ``dhrclip serve --help-settings`` prints every setting with its default and meaning.
uvicorn runs one process with the app built by :func:`service.api.app.create_app`; SIGTERM /
Ctrl-C shut it down gracefully (the engine drains its queue, answered inspections are already on disk); uvicorn
then re-raises the signal, so the exit status after SIGTERM is the conventional 143 (-15 seen from Python).
Logs are JSON lines on stderr: ``dhrclip.access`` one per request, ``dhrclip.api`` for start-up, model loading,
retention and errors; uvicorn's own access log is off (it would duplicate ours).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings

logger = logging.getLogger("dhrclip.api")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def serve(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, settings: Settings | None = None, log_level: str = "info"
) -> None:
    """Run the service until interrupted (blocking). ``settings=None``: read ``DHR_*`` / ``.env`` now."""
    import uvicorn

    from .app import create_app
    from .logs import configure_logging
    from .settings import Settings

    settings = settings if settings is not None else Settings()
    configure_logging(log_level)
    app = create_app(settings)
    logger.info(
        "serving on http://%s:%d (preset %s, device %s, data %s)",
        host,
        port,
        settings.preset,
        settings.device,
        settings.data_dir,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=int(port),
        log_level=log_level,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=max(5, int(settings.request_timeout_s) + 5),
    )
    uvicorn.Server(config).run()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dhrclip serve``."""
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"interface to bind (default {DEFAULT_HOST}; 0.0.0.0 for every interface)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument("--env-file", default=None, help="read DHR_* settings from this file instead of ./.env")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level (default info)")
    parser.add_argument(
        "--help-settings", action="store_true", help="print the DHR_* settings (defaults, meaning) and exit"
    )


def run_serve(args: argparse.Namespace) -> int:
    """``dhrclip serve``: returns the exit status (0 after a clean shutdown, 2 for invalid settings)."""
    from dotenv import dotenv_values
    from pydantic import ValidationError

    from .settings import Settings, settings_error_line, settings_table, unknown_variables

    if getattr(args, "help_settings", False):
        print(settings_table())
        return 0
    env_file = getattr(args, "env_file", None)
    if env_file and not Path(env_file).is_file():
        print(f"dhrclip serve: --env-file {env_file}: file not found", file=sys.stderr)
        return 2
    if env_file and (unknown := unknown_variables(dotenv_values(env_file))):
        print(
            f"dhrclip serve: --env-file {env_file}: {', '.join(unknown)} "
            f"{'is not a setting' if len(unknown) == 1 else 'are not settings'} (dhrclip serve --help-settings)",
            file=sys.stderr,
        )
        return 2
    try:
        settings = Settings(_env_file=env_file) if env_file else Settings()
    except ValidationError as exc:
        print(f"dhrclip serve: {settings_error_line(exc)}", file=sys.stderr)
        return 2
    if not 0 < int(args.port) < 65536:
        print(f"dhrclip serve: --port must be 1-65535, got {args.port}", file=sys.stderr)
        return 2
    serve(host=args.host, port=args.port, settings=settings, log_level=getattr(args, "log_level", "info"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m service.api.server`` (the same as ``dhrclip serve``)."""
    parser = argparse.ArgumentParser(prog="dhrclip serve", description="start the HTTP service")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
