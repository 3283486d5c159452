"""Artefact stores: the bytes of an inspection (images, maps, PNGs) by key, in a local folder or an S3 bucket.

A key is a relative POSIX path of safe segments, e.g. ``2024/03/10/<id>/overlay.png`` (see :func:`check_key`).
Every backend keeps one contract, tested by one parametrised suite (tests/test_artefacts.py):

- ``put(key, data)`` is durable when it returns: a crash or power loss afterwards keeps the whole object; a reader
  sees either nothing or all of it. Putting an existing key replaces it.
- ``get(key)`` returns the bytes or raises :class:`ArtefactMissingError`; ``exists(key)`` says which.
- ``delete(key)`` and ``delete_prefix(prefix)`` remove objects; removing what is not there is no error.
- ``keys(prefix)`` lists the stored keys under a prefix, sorted.
- ``check()`` proves the store is usable now (folder writable, bucket reachable with these credentials) or raises
  :class:`ArtefactStoreError` with one line saying what is wrong.

Backends, chosen by :func:`open_artefact_store` from ``DHR_ARTEFACT_URL``:

- unset or ``file:///abs/path``: :class:`LocalArtefactStore`, a folder (default: the data directory). A put writes a
  temp file in the target folder, fsyncs it, renames it over the key, then fsyncs every folder it created and the
  target folder, so the rename itself survives a power loss.
- ``s3://bucket/prefix``: :class:`S3ArtefactStore`, any S3-compatible store through boto3. Endpoint and
  credentials come from the usual AWS variables (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``,
  ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles, instance roles). A PUT that
  returned 200 is stored durably by the S3 contract; objects appear whole or not at all.
"""

from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlparse

from service.storage.files import fsync_dir, write_atomic

_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_S3_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys


class ArtefactStoreError(RuntimeError):
    """The artefact store cannot be used (unreachable, unknown bucket, no credentials, not writable)."""


class ArtefactMissingError(KeyError):
    """No object under this key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "artefact missing"


def check_key(key: str, prefix: bool = False) -> str:
    """``key`` if it is a relative path of safe segments (no ``..``, no empty segment), else ValueError.

    With ``prefix=True`` the empty string and a trailing ``/`` are allowed too.
    """
    if not isinstance(key, str):
        raise ValueError(f"artefact key must be a string, got {type(key).__name__}")
    body = key[:-1] if prefix and key.endswith("/") else key
    if prefix and body == "":
        return key
    if not all(_SEGMENT_RE.match(part) for part in body.split("/")):
        raise ValueError(f"invalid artefact key {key!r}: use relative paths of [A-Za-z0-9_.-] segments")
    return key


@runtime_checkable
class ArtefactStore(Protocol):
    """Bytes by key; see the module docstring for the contract."""

    location: str  # where the bytes live, for logs and /health (no credentials)

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def keys(self, prefix: str = "") -> list[str]: ...

    def check(self) -> None: ...


class LocalArtefactStore:
    """Artefacts as files under ``root`` (created if absent); key ``a/b/c.png`` is the file ``root/a/b/c.png``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file of ``key`` (it may not exist)."""
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        new_dirs = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_atomic(path, bytes(data))
        except BaseException:
            self._prune(path.parent)
            raise
        for d in (path.parent, *(d.parent for d in new_dirs)):
            fsync_dir(d)

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtefactMissingError(f"artefact {key!r} is missing from {self.location}") from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        self._prune(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key under ``prefix`` (a folder when it ends with ``/``); returns how many."""
        doomed = self.keys(prefix)
        folder = self.root / check_key(prefix, prefix=True)
        if prefix.endswith("/") and folder.is_dir() and folder != self.root:
            shutil.rmtree(folder)
            self._prune(folder.parent)
        else:
            for key in doomed:
                self.delete(key)
        return len(doomed)

    def keys(self, prefix: str = "") -> list[str]:
        check_key(prefix, prefix=True)
        head, _, _ = prefix.rpartition("/")
        base = self.root / head if head else self.root
        if not base.is_dir():
            return []
        found = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in found if k.startswith(prefix) and not k.rsplit("/", 1)[-1].startswith("."))

    def check(self) -> None:
        probe = self.root / f".probe-{secrets.token_hex(4)}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ArtefactStoreError(f"artefact folder {self.location} is not writable: {exc}") from None

    def _prune(self, folder: Path) -> None:
        """Remove ``folder`` and the folders above it that became empty (never ``root``)."""
        root = self.root.resolve()
        while folder.resolve() != root and root in folder.resolve().parents:
            try:
                folder.rmdir()
            except OSError:
                return  # not empty, or already gone
            folder = folder.parent


class S3ArtefactStore:
    """Artefacts as objects ``<prefix>/<key>`` in an S3 bucket (any S3-compatible server), through boto3.

    ``client``: a boto3 S3 client; None builds one from the standard AWS environment with short timeouts.
    """

    def __init__(self, bucket: str, prefix: str = "", client=None) -> None:
        if not bucket:
            raise ValueError("S3 artefact store needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = client if client is not None else _s3_client()

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self._call("put", key, self._client.put_object, Bucket=self.bucket, Key=self._name(key), Body=bytes(data))

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"].read()
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                raise ArtefactMissingError(f"artefact {key!r} is missing from {self.location}") from None
            raise ArtefactStoreError(_describe(exc, self.location, f"get {key!r}")) from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise ArtefactStoreError(_describe(exc, self.location, f"head {key!r}")) from None
        return True

    def delete(self, key: str) -> None:
        self._call("delete", key, self._client.delete_object, Bucket=self.bucket, Key=self._name(key))

    def delete_prefix(self, prefix: str) -> int:
        names = [self._name(k) for k in self.keys(prefix)]
        for start in range(0, len(names), _S3_DELETE_BATCH):
            batch = [{"Key": n} for n in names[start : start + _S3_DELETE_BATCH]]
            out = self._call(
                "delete", prefix, self._client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch}
            )
            if out.get("Errors"):
                key, why = out["Errors"][0].get("Key"), out["Errors"][0].get("Message")
                raise ArtefactStoreError(f"{self.location}: could not delete {key}: {why}")
        return len(names)

    def keys(self, prefix: str = "") -> list[str]:
        check_key(prefix, prefix=True)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        try:
            return sorted(obj["Key"][strip:] for page in pages for obj in page.get("Contents", ()))
        except Exception as exc:  # noqa: BLE001 - botocore raises several unrelated types; all become one line
            raise ArtefactStoreError(_describe(exc, self.location, "list")) from None

    def check(self) -> None:
        """HEAD the bucket: unknown bucket, missing credentials and unreachable endpoints each get one line."""
        self._call("check", "", self._client.head_bucket, Bucket=self.bucket)

    def _call(self, what: str, key: str, fn, **kwargs):
        try:
            return fn(**kwargs)
        except Exception as exc:  # noqa: BLE001 - see keys()
            raise ArtefactStoreError(_describe(exc, self.location, f"{what} {key!r}" if key else what)) from None


def _code(exc) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _describe(exc: Exception, location: str, action: str) -> str:
    """One line for a botocore failure: what was attempted where, and the likely cause."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return f"{location}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)"
    if isinstance(exc, EndpointConnectionError):
        return f"{location}: cannot reach the S3 endpoint ({exc}); check AWS_ENDPOINT_URL"
    if isinstance(exc, ClientError):
        code = _code(exc)
        if code in ("NoSuchBucket", "404") and action == "check":
            return f"{location}: bucket does not exist (or is not visible with these credentials)"
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"{location}: access denied ({code}); check the AWS credentials"
        return f"{location}: {action} failed: {code or type(exc).__name__}: {exc}"
    return f"{location}: {action} failed: {type(exc).__name__}: {exc}"


def _s3_client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ArtefactStoreError("s3:// artefact URLs need boto3: pip install 'dhrclip-service[s3]'") from None

    # a stalled store fails a request within about 2 x (5 + 10) s instead of hanging it
    config = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.session.Session().client("s3", config=config)


def parse_artefact_url(url: str) -> tuple[str, str, str]:
    """``file:///abs/path`` -> ``("file", "", "/abs/path")``; ``s3://bucket/prefix`` -> ``("s3", "bucket", "prefix")``.

    Raises ValueError naming the accepted forms for anything else.
    """
    parsed = urlparse(url)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost") and parsed.path.startswith("/"):
        return "file", "", parsed.path
    if parsed.scheme == "s3" and parsed.netloc:
        prefix = parsed.path.strip("/")
        if prefix:
            check_key(prefix)
        return "s3", parsed.netloc, prefix
    raise ValueError(f"artefact URL {url!r}: use s3://bucket/prefix or file:///absolute/path")


def open_artefact_store(url: str | None, data_dir: Path | str) -> ArtefactStore:
    """The store named by ``DHR_ARTEFACT_URL``: unset -> ``data_dir``; ``file:///path``; ``s3://bucket/prefix``.

    Builds the client only; call ``check()`` to find out whether the store is usable.
    """
    if not url:
        return LocalArtefactStore(data_dir)
    scheme, bucket, path = parse_artefact_url(url)
    if scheme == "file":
        return LocalArtefactStore(path)
    return S3ArtefactStore(bucket, path)
