"""Service settings: environment variables with the ``DHR_`` prefix, an optional ``.env`` file, or explicit kwargs.

Built by the app factory (``create_app(settings)``), never at import. Values that depend on other values or on
the file system (the weights to load, the database URL, the device) are resolved at start-up, see
``service.api.weights`` and :meth:`Settings.resolved_database_url`.

Every setting is a field below whose description says what it does; ``dhrclip serve --help-settings`` prints the
table of variables, defaults and descriptions made from this model (:func:`settings_table`).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, get_args

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.engine import BackendName, ImageScore, PrecisionChoice, PresetName
from service.engine.options import COMPILE, PREPROCESS, CompileMode, PreprocessMode
from service.runtime import POLICY_ENV
from service.storage.artefacts import parse_artefact_url
from service.storage.store import default_database_url

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_OPTIONAL = (
    "backbone",
    "prompts",
    "export_dir",
    "database_url",
    "artefact_url",
    "replica_name",
    "retention_days",
    "retention_max_count",
    "max_queue_wait_s",
    "ray_gpus_per_replica",
)


class Settings(BaseSettings):
    """Every knob of the service: field ``x`` is the environment variable ``DHR_X``."""

    # allow_inf_nan=False: "inf" passed every bound (DHR_MAX_UPLOAD_MB=inf overflowed at start-up)
    model_config = SettingsConfigDict(
        env_prefix="DHR_", env_file=".env", env_file_encoding="utf-8", extra="ignore", allow_inf_nan=False
    )

    backbone: str | None = Field(
        None, description='CLIP file or "openai"; unset: the single file in model_weights/backbone/, else "openai"'
    )
    prompts: str | None = Field(
        None,
        description='prompt checkpoint file/dir or "ensemble"; unset: the newest in model_weights/prompts/, '
        'else "ensemble"',
    )
    preset: PresetName = Field("mvtec", description="DHR geometry")
    device: str = Field(
        "auto",
        description="auto | cpu | cuda | cuda:N | mps (auto: cuda when available, else cpu); a comma list "
        "(cuda:0,cuda:1) runs one model replica per device, each batch on a free one",
    )
    precision: PrecisionChoice = Field(
        "auto", description="vision tower precision; auto: bf16 on CUDA, fp32 elsewhere (the reference-parity path)"
    )
    backend: BackendName = Field(
        "torch", description="what runs the vision path; all but torch run a model written by `dhrclip export`"
    )
    export_dir: Path | None = Field(
        None, description="the exported model of a non-torch backend; unset: <model_weights_dir>/export"
    )
    allow_download: bool = Field(False, description="let open_clip download the OpenAI weights when backbone=openai")
    model_weights_dir: Path = Field(Path("./model_weights"), description="where unset backbone / prompts are looked up")

    max_batch_size: int = Field(8, ge=1, le=1024, description="images per model call")
    max_wait_ms: float = Field(
        10.0, ge=0, le=60_000, description="longest wait of a batch's first image for companions"
    )
    queue_size: int = Field(
        64, ge=1, description="images admitted and not yet through the model, at most; beyond: 503 + Retry-After"
    )
    max_queue_wait_s: float | None = Field(
        None,
        gt=0,
        description="expected wait for the model or the CPU stage (from measured batch / job times) beyond which a "
        "request gets 503 + Retry-After "
        "before anything is decoded; unset: half a measured single-image model call, at least 0.1 s (accepted "
        "requests then stay within about twice the unloaded latency)",
    )
    workers: int = Field(
        2, ge=1, le=64, description="threads for decode / postprocess; their backlog is bounded like the model's"
    )
    preprocess: PreprocessMode = Field(
        "auto", description="where uploads become views: " + "; ".join(f"{k}: {v}" for k, v in PREPROCESS.items())
    )
    compile: CompileMode = Field(
        "off", description="the vision tower under torch.compile: " + "; ".join(f"{k}: {v}" for k, v in COMPILE.items())
    )
    warmup: bool = Field(True, description="run one dummy batch before reporting ready")

    max_upload_mb: float = Field(20.0, gt=0, description="largest request body in MiB, all files of a request together")
    max_pixels: int = Field(
        40_000_000, ge=1, description="largest image in pixels, width * height (40e6 accepted); beyond: 413"
    )
    max_side: int = Field(
        32_768, ge=1, le=1_000_000, description="largest width or height in pixels (PNG stops at 1e6); beyond: 413"
    )
    max_aspect_ratio: float = Field(64.0, ge=1.0, description="largest long side / short side; beyond: 422")
    accept_truncated: bool = Field(
        False,
        description="decode JPEGs whose data ends early or lacks the end marker (missing rows grey) instead of "
        "answering 422 corrupt-image",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="longest decode + inference + postprocess of one image; beyond: 504"
    )

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated operator keys for X-API-Key (inspect, read, review); with neither these nor "
        "admin keys, authentication is off",
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated admin keys (also thresholds, references, calibration, deletion); when empty, "
        "every operator key is an admin key",
    )
    protect_ops: bool = Field(False, description="also require a key for /health, /livez, /readyz, /metrics")

    database_url: str | None = Field(None, description="SQLAlchemy URL; unset: sqlite:///<data_dir>/inspections.db")
    data_dir: Path = Field(Path("./data"), description="artefacts (unless artefact_url) and the default SQLite file")
    artefact_url: str | None = Field(
        None,
        description="where artefacts go: unset -> data_dir; file:///abs/path; s3://bucket/prefix (endpoint and "
        "credentials from the AWS_* variables)",
    )
    state_refresh_s: float = Field(
        5.0, ge=0, le=3600, description="longest use of a product profile changed through another replica"
    )
    heartbeat_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="seconds between this process's liveness beats in the database; a POST /segment with an "
        "Idempotency-Key held by a process silent for 3 beats (it died) is retried at once, not after the claim's "
        "timeout (twice DHR_REQUEST_TIMEOUT_S plus 60 s)",
    )
    replica_name: str | None = Field(
        None, max_length=200, description="label of this replica in /metrics, /health, X-DHR-Replica; unset: host-pid"
    )
    store_originals: bool = Field(
        True,
        description="keep each upload's bytes (PNGs rendered from them on first request); false: store the overlay PNG",
    )
    retention_days: float | None = Field(None, ge=0, description="delete inspections older than this; unset: keep")
    retention_max_count: int | None = Field(None, ge=0, description="keep at most this many inspections; unset: all")
    retention_interval_s: float = Field(3600.0, gt=0, description="seconds between retention passes")

    image_threshold: float = Field(0.5, ge=0, le=1, description='default image threshold: score >= it -> "defect"')
    pixel_threshold: float = Field(0.5, ge=0, le=1, description="default pixel threshold of the defect mask")
    image_score: ImageScore = Field("reference", description="default image-score variant")

    memory_cache_size: int = Field(8, ge=1, description="products whose normal memory stays on the device (LRU)")
    memory_max_tokens: int = Field(40_000, ge=1, description="coreset cap of a normal memory per layer and view kind")

    ray_min_replicas: int = Field(1, ge=0, description="Ray Serve: fewest replicas")
    ray_max_replicas: int = Field(4, ge=1, description="Ray Serve: most replicas")
    ray_target_ongoing: float = Field(8.0, gt=0, description="Ray Serve: ongoing requests per replica to aim at")
    ray_gpus_per_replica: float | None = Field(
        None, ge=0, description="Ray Serve: GPUs per replica; unset: 1 when the cluster has GPUs, else 0 (CPU)"
    )
    ray_cpus_per_replica: float = Field(1.0, gt=0, description="Ray Serve: CPUs reserved per replica")

    @field_validator(*_OPTIONAL, mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """``DHR_RETENTION_DAYS=`` in a .env file means "not set", not an invalid number."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        """``"k1, k2"`` -> ``["k1", "k2"]``; empty entries are dropped."""
        if value is None:
            return []
        if isinstance(value, str):
            value = value.split(",")
        return [str(k).strip() for k in value if str(k).strip()]

    @field_validator("max_pixels", mode="before")
    @classmethod
    def _pixels_may_be_float(cls, value):
        """Accept ``40e6`` as well as ``40000000``."""
        if isinstance(value, str):
            value = float(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"max_pixels must be a whole number, got {value}")
            value = int(value)
        return value

    @field_validator("preset", "precision", "backend", "preprocess", "compile", mode="before")
    @classmethod
    def _known_choice(cls, value: str, info: ValidationInfo) -> str:
        """One line naming the choices (the Literal's own message would list them less readably)."""
        choices = get_args(cls.model_fields[info.field_name].annotation)
        if value not in choices:
            raise ValueError(f"unknown {info.field_name} {value!r}; choose one of {', '.join(choices)}")
        return value

    @field_validator("artefact_url")
    @classmethod
    def _known_artefact_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_artefact_url(value)
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        names = [d.strip() for d in value.split(",")]
        if not all(_DEVICE_RE.match(d) for d in names):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, or a comma list of them, got {value!r}")
        if len(names) > 1 and "auto" in names:
            raise ValueError(f"a device list names each device (auto is one device), got {value!r}")
        return ",".join(names)

    @property
    def devices(self) -> tuple[str, ...]:
        """``DHR_DEVICE`` as a tuple: one model replica per entry; the model is loaded on the first."""
        return tuple(self.device.split(","))

    @property
    def max_upload_bytes(self) -> int:
        """Largest accepted request body in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    @property
    def retention_enabled(self) -> bool:
        return self.retention_days is not None or self.retention_max_count is not None

    def resolved_replica_name(self) -> str:
        """``DHR_REPLICA_NAME``, or ``<hostname>-<pid>`` (unique among the replicas of one host)."""
        return self.replica_name or f"{socket.gethostname()}-{os.getpid()}"

    def resolved_database_url(self) -> str:
        """``DHR_DATABASE_URL``, or a SQLite file inside the data directory."""
        if self.database_url:
            return self.database_url
        return default_database_url(self.data_dir)


# DHR_* names read elsewhere, not settings: DHR_THREAD_POLICY (before torch loads), the Ray Serve wrapper's
# DHR_RAY_* (service/deploy/ray_serve.py) and the test suite's DHR_TEST_* (e.g. DHR_TEST_POSTGRES_URL in CI)
OTHER_READERS = (POLICY_ENV, "DHR_RAY_", "DHR_TEST_")


def unknown_variables(names) -> list[str]:
    """The ``DHR_*`` names among ``names`` (any case) that no setting reads (nor ``OTHER_READERS``), upper-cased and
    sorted: a misspelt variable would otherwise be ignored without a word."""
    known = {f"DHR_{name.upper()}" for name in Settings.model_fields}
    upper = {n.upper() for n in names}
    return sorted(n for n in upper if n.startswith("DHR_") and n not in known and not n.startswith(OTHER_READERS))


def settings_error_line(exc: Exception) -> str:
    """One line naming every invalid setting, for the CLI (``DHR_PRESET: unknown preset 'x'; ...``)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors():
        name = "DHR_" + "_".join(str(p) for p in err.get("loc", ()) if isinstance(p, str)).upper()
        parts.append(f"{name}: {err.get('msg', 'invalid')}")
    return "invalid settings: " + "; ".join(parts)


def settings_table() -> str:
    """The settings as a text table: variable, default, choices or type, description (from the model's fields)."""
    rows = [("variable", "default", "description")]
    for name, f in Settings.model_fields.items():
        default = f.default_factory() if f.default_factory is not None else f.default
        if isinstance(default, bool):
            default = str(default).lower()
        default = "unset" if default is None else ",".join(default) if isinstance(default, list) else str(default)
        choices = get_args(f.annotation)
        what = f"{' | '.join(choices)}: " if choices and all(isinstance(c, str) for c in choices) else ""
        rows.append((f"DHR_{name.upper()}", default or '""', what + (f.description or "")))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows)
