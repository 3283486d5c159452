"""One contract, two artefact backends: a local folder and an S3 bucket on moto's standalone server."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.storage.artefacts import (
    ArtefactMissingError,
    ArtefactStore,
    ArtefactStoreError,
    LocalArtefactStore,
    S3ArtefactStore,
    open_artefact_store,
)

BACKENDS = ("local", "s3")
DATA = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3


@pytest.fixture(params=BACKENDS)
def artefacts(request, tmp_path) -> ArtefactStore:
    if request.param == "local":
        return LocalArtefactStore(tmp_path / "artefacts")
    bucket = request.getfixturevalue("s3_bucket")
    return open_artefact_store(f"s3://{bucket}/plant-a/", tmp_path / "unused")


def test_put_get_exists_replace_delete(artefacts):
    key = "2024/03/10/abc/overlay.png"
    assert not artefacts.exists(key)
    with pytest.raises(ArtefactMissingError, match="overlay.png"):
        artefacts.get(key)
    artefacts.put(key, DATA)
    assert artefacts.exists(key) and artefacts.get(key) == DATA
    artefacts.put(key, b"second")
    assert artefacts.get(key) == b"second"
    artefacts.put("2024/03/10/abc/empty.bin", b"")
    assert artefacts.get("2024/03/10/abc/empty.bin") == b""
    artefacts.delete(key)
    artefacts.delete(key)  # deleting what is gone is no error
    assert not artefacts.exists(key)
    assert artefacts.keys() == ["2024/03/10/abc/empty.bin"]
    artefacts.check()


def test_keys_and_delete_prefix(artefacts):
    names = ["2024/03/10/a/mask.png", "2024/03/10/a/overlay.png", "2024/03/10/ab/mask.png", "2024/03/11/c/x.png"]
    for n in names:
        artefacts.put(n, n.encode())
    assert artefacts.keys() == names
    assert artefacts.keys("2024/03/10/") == names[:3]
    assert artefacts.keys("2024/03/10/a/") == names[:2]
    assert artefacts.keys("2024/03/10/a") == names[:3]  # a plain prefix, not a folder
    assert artefacts.keys("2025/") == []
    assert artefacts.delete_prefix("2024/03/10/a/") == 2
    assert artefacts.keys() == names[2:]
    assert artefacts.delete_prefix("2024/03/10/a/") == 0
    assert [artefacts.get(n) for n in names[2:]] == [n.encode() for n in names[2:]]


@pytest.mark.parametrize("bad", ["", "/abs.png", "a/../b.png", "a//b.png", "a/./b", "sp ace.png", "a\\b.png", 5])
def test_invalid_keys_are_refused_everywhere(artefacts, bad):
    for call in (artefacts.get, artefacts.exists, artefacts.delete, lambda k: artefacts.put(k, b"x")):
        with pytest.raises(ValueError, match="artefact key"):
            call(bad)
    assert artefacts.keys() == []


def test_concurrent_puts_from_a_thread_pool(artefacts):
    def work(i: int) -> str:
        key = f"2024/01/01/{i:04d}/mask.png"
        artefacts.put(key, DATA + bytes([i]))
        return key

    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(work, range(40)))
    assert artefacts.keys("2024/01/01/") == sorted(keys)
    assert all(artefacts.get(k) == DATA + bytes([i]) for i, k in enumerate(keys))


def test_local_put_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    store = LocalArtefactStore(tmp_path / "a")
    store.put("2024/03/10/r/mask.png", DATA)
    assert (tmp_path / "a" / "2024" / "03" / "10" / "r" / "mask.png").read_bytes() == DATA

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.put("2024/03/11/r/mask.png", DATA)
    monkeypatch.undo()
    assert not (tmp_path / "a" / "2024" / "03" / "11").exists()  # no temp file, no empty folders
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == ["03", "10", "2024", "mask.png", "r"]


def test_local_check_names_an_unwritable_folder(tmp_path):
    store = LocalArtefactStore(tmp_path / "a")
    (tmp_path / "a").rmdir()
    (tmp_path / "a").write_bytes(b"")  # a file where the folder must be: fails also as root
    with pytest.raises(ArtefactStoreError, match=r"^artefact folder .* is not writable"):
        store.check()


def test_s3_unknown_bucket_is_one_line(s3_endpoint, tmp_path):
    store = open_artefact_store("s3://no-such-bucket-dhr/x", tmp_path)
    with pytest.raises(ArtefactStoreError) as err:
        store.check()
    assert str(err.value) == (
        "s3://no-such-bucket-dhr/x: bucket does not exist (or is not visible with these credentials)"
    )


def test_s3_missing_credentials_is_one_line(s3_endpoint, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = open_artefact_store("s3://any-bucket", tmp_path)
    with pytest.raises(ArtefactStoreError) as err:
        store.check()
    assert str(err.value) == (
        "s3://any-bucket: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)"
    )


def test_s3_unreachable_endpoint_is_one_line(monkeypatch, tmp_path):
    from .s3_server import S3_ENV, free_port

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    store = open_artefact_store("s3://b/p", tmp_path)
    with pytest.raises(ArtefactStoreError, match=r"^s3://b/p: cannot reach the S3 endpoint .*AWS_ENDPOINT_URL$"):
        store.check()


def test_urls_choose_the_backend(tmp_path):
    assert isinstance(open_artefact_store(None, tmp_path / "d"), LocalArtefactStore)
    assert open_artefact_store("", tmp_path / "d").location == str(tmp_path / "d")
    assert open_artefact_store(f"file://{tmp_path}/e", tmp_path / "d").location == f"{tmp_path}/e"
    s3 = open_artefact_store("s3://bucket/a/b/", tmp_path)
    assert isinstance(s3, S3ArtefactStore) and (s3.bucket, s3.prefix, s3.location) == (
        "bucket",
        "a/b",
        "s3://bucket/a/b",
    )
    for bad in ("ftp://x/y", "file://host/x", "file:relative", "s3:///prefix"):
        with pytest.raises(ValueError, match="artefact URL|needs a bucket"):
            open_artefact_store(bad, tmp_path)
