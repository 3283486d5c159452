"""Service settings: environment variables with the ``DHR_`` prefix, an optional ``.env`` file, or explicit kwargs.

Built by the app factory (``create_app(settings)``), never at import. Values that depend on other values or on
the file system (the weights to load, the database URL, the device) are resolved at start-up, see
``service.api.weights`` and :meth:`Settings.resolved_database_url`.

=========================  ==========================================================================================
variable                   meaning (default)
=========================  ==========================================================================================
DHR_BACKBONE               CLIP file or "openai" (unset: the single file in model_weights/backbone/, else "openai")
DHR_PROMPTS                prompt checkpoint file/dir or "ensemble" (unset: newest in model_weights/prompts/, else
                           "ensemble")
DHR_PRESET                 DHR geometry: mvtec | visa | fast (mvtec)
DHR_DEVICE                 auto | cpu | cuda | cuda:N | mps (auto: cuda when available, else cpu)
DHR_PRECISION              fp32 | bf16 | fp16 (fp32)
DHR_MAX_BATCH_SIZE         images per model call (8)
DHR_MAX_WAIT_MS            longest wait of the first image of a batch for companions (10)
DHR_QUEUE_SIZE             images waiting at most; beyond: 503 + Retry-After (64)
DHR_WORKERS                threads for decode / postprocess (2)
DHR_WARMUP                 run one dummy batch before reporting ready (true)
DHR_MAX_UPLOAD_MB          largest request body in MiB, all files of a request together (20)
DHR_MAX_PIXELS             largest image in pixels, width * height (40e6)
DHR_API_KEYS               comma-separated keys for X-API-Key; empty: authentication off ("")
DHR_PROTECT_OPS            also require a key for /health, /livez, /readyz, /metrics (false)
DHR_DATABASE_URL           SQLAlchemy URL (sqlite:///<DATA_DIR>/inspections.db)
DHR_DATA_DIR               artefact PNGs and the default SQLite file (./data)
DHR_RETENTION_DAYS         delete inspections older than this many days (unset: keep)
DHR_RETENTION_MAX_COUNT    keep at most this many inspections (unset: no limit)
DHR_RETENTION_INTERVAL_S   seconds between retention passes (3600)
DHR_REQUEST_TIMEOUT_S      longest decode + inference + postprocess of one image; beyond: 504 (30)
DHR_IMAGE_THRESHOLD        default image threshold: score >= threshold -> "defect" (0.5)
DHR_PIXEL_THRESHOLD        default pixel threshold of the defect mask (0.5)
DHR_IMAGE_SCORE            default image-score variant: reference | map_max | map_topk (reference)
DHR_MODEL_WEIGHTS_DIR      where unset DHR_BACKBONE / DHR_PROMPTS are looked up (./model_weights)
DHR_ALLOW_DOWNLOAD         let open_clip download the OpenAI weights when DHR_BACKBONE=openai (false)
=========================  ==========================================================================================
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, get_args

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.engine import ImageScore, Precision, PresetName

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_OPTIONAL = ("backbone", "prompts", "database_url", "retention_days", "retention_max_count")


class Settings(BaseSettings):
    """Every knob of the service; see the module docstring for the environment variables."""

    model_config = SettingsConfigDict(env_prefix="DHR_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    backbone: str | None = None
    prompts: str | None = None
    preset: PresetName = "mvtec"
    device: str = "auto"
    precision: Precision = "fp32"
    allow_download: bool = False
    model_weights_dir: Path = Path("./model_weights")

    max_batch_size: int = Field(8, ge=1, le=1024)
    max_wait_ms: float = Field(10.0, ge=0, le=60_000)
    queue_size: int = Field(64, ge=1)
    workers: int = Field(2, ge=1, le=64)
    warmup: bool = True

    max_upload_mb: float = Field(20.0, gt=0)
    max_pixels: int = Field(40_000_000, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    protect_ops: bool = False

    database_url: str | None = None
    data_dir: Path = Path("./data")
    retention_days: float | None = Field(None, ge=0)
    retention_max_count: int | None = Field(None, ge=0)
    retention_interval_s: float = Field(3600.0, gt=0)

    image_threshold: float = Field(0.5, ge=0, le=1)
    pixel_threshold: float = Field(0.5, ge=0, le=1)
    image_score: ImageScore = "reference"

    @field_validator(*_OPTIONAL, mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        """``DHR_RETENTION_DAYS=`` in a .env file means "not set", not an invalid number."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys", mode="before")
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

    @field_validator("preset", "precision", mode="before")
    @classmethod
    def _known_choice(cls, value: str, info: ValidationInfo) -> str:
        """One line naming the choices (the Literal's own message would list them less readably)."""
        choices = get_args(cls.model_fields[info.field_name].annotation)
        if value not in choices:
            raise ValueError(f"unknown {info.field_name} {value!r}; choose one of {', '.join(choices)}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
        return value

    @property
    def max_upload_bytes(self) -> int:
        """Largest accepted request body in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def retention_enabled(self) -> bool:
        return self.retention_days is not None or self.retention_max_count is not None

    def resolved_database_url(self) -> str:
        """``DHR_DATABASE_URL``, or a SQLite file inside the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'inspections.db').resolve()}"


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
