"""The one exception type for mistakes of the user (a bad option, file, folder or setting), not of the program.

The command line prints a :class:`UserError` as one line ``dhrclip <command>: <message>`` and exits with status 2;
any other exception is a bug and shows its traceback. It subclasses :class:`ValueError`, so code that validated
with ``except ValueError`` keeps working. No dependencies: every layer may raise it.
"""

from pathlib import Path


class UserError(ValueError):
    """Wrong input from the user; the message is one line naming the file, option or setting and what is wrong."""


def check_out_folder(option: str, path: str | Path, error: type[UserError] = UserError) -> None:
    """Refuse an output folder option that names an existing file, before any work is done."""
    if Path(path).exists() and not Path(path).is_dir():
        raise error(f"{option} {path}: exists and is not a folder")
