"""The app on shared storage: artefacts in S3 (moto), and bad storage configuration answered, never papered over."""

from __future__ import annotations

import logging

import boto3
import pytest
from fastapi.testclient import TestClient

from service.api import create_app

from .api_fixtures import decode_png, make_settings, png_file, wait_ready
from .s3_server import free_port


def test_inspections_go_to_the_bucket_and_nothing_to_the_data_dir(tmp_path, s3_bucket, database_url):
    settings = make_settings(tmp_path / "data", database_url=database_url, artefact_url=f"s3://{s3_bucket}/line-7")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        r = client.post("/segment", files=[png_file("a.png", 3, (48, 40))], data={"product": "cap"})
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        day = res["created_at"][:10].replace("-", "/")
        prefix = f"line-7/{day}/{res['id']}/"
        listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]
        assert sorted(o["Key"] for o in listed) == [prefix + "map.f16.png", prefix + "original.bin"]
        png = client.get(res["links"]["overlay"])  # rendered on first request, cached in the bucket
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert decode_png(png.content).size == (48, 40)
        body = boto3.client("s3").get_object(Bucket=s3_bucket, Key=f"line-7/{day}/{res['id']}/overlay.png")["Body"]
        assert body.read() == png.content
        _references_go_to_the_bucket(client, s3_bucket)
    found = sorted(p.name for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert all(name.startswith("inspections.db") for name in found), found  # only a SQLite file, no PNG


def _references_go_to_the_bucket(client: TestClient, bucket: str) -> None:
    """Reference images, their features, the memory built from them and the gallery's cached thumbnails are objects
    under the same prefix; removing a reference removes its thumbnail."""
    s3 = boto3.client("s3")

    def keys(under: str) -> list[str]:
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=under).get("Contents", ()))

    assert client.put("/products/cap", json={"image_threshold": 0.5, "pixel_threshold": 0.5}).status_code == 200
    files = [png_file("good-1.png", 5, (48, 40)), png_file("good-2.png", 6, (48, 40))]
    r = client.post("/products/cap/references", files=files)
    assert r.status_code == 201, r.text
    first, second = (item["id"] for item in r.json()["items"])
    version = r.json()["memory"]["version"]
    assert keys("line-7/references/") == [
        f"line-7/references/{ref}/{name}" for ref in (first, second) for name in ("features.safetensors", "image.bin")
    ]
    assert keys("line-7/memories/") == [f"line-7/memories/{version}.safetensors"]
    stored = s3.get_object(Bucket=bucket, Key=f"line-7/references/{first}/image.bin")["Body"].read()
    assert stored == files[0][1][1]  # the uploaded bytes, exactly
    seg = client.post("/segment", files=[png_file("b.png", 7, (48, 40))], data={"product": "cap"})
    assert seg.status_code == 200 and seg.json()["results"][0]["memory_version"] == version

    thumb = client.get(f"/ui/products/cap/references/{first}.jpg")  # the gallery's: rendered once, cached beside it
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert keys(f"line-7/references/{first}/") == [
        f"line-7/references/{first}/{n}" for n in ("features.safetensors", "image.bin", "thumb.jpg")
    ]
    assert s3.get_object(Bucket=bucket, Key=f"line-7/references/{first}/thumb.jpg")["Body"].read() == thumb.content
    s3.put_object(Bucket=bucket, Key=f"line-7/references/{first}/thumb.jpg", Body=b"\xff\xd8cached")
    assert client.get(f"/ui/products/cap/references/{first}.jpg").content == b"\xff\xd8cached"  # not rendered again

    assert client.delete(f"/products/cap/references/{first}").status_code == 204
    rebuilt = client.get("/products/cap/references").json()["memory"]["version"]
    assert keys("line-7/references/") == [
        f"line-7/references/{second}/{n}" for n in ("features.safetensors", "image.bin")
    ]
    assert keys("line-7/memories/") == [f"line-7/memories/{rebuilt}.safetensors"] and rebuilt != version


def _assert_unready_with(client: TestClient, caplog, reason: str) -> None:
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json() == {"status": "error", "reason": reason}
    seg = client.post("/segment", files=[png_file("a.png", 1, (32, 32))])
    assert seg.status_code == 503 and seg.json()["detail"] == reason
    listed = client.get("/inspections")
    assert listed.status_code == 503 and listed.json()["detail"] == reason
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "dhrclip.api" and rec.levelno == logging.ERROR]
    assert lines == [reason]


def test_unreachable_postgres_is_one_line_and_503(tmp_path, caplog):
    port = free_port()
    settings = make_settings(tmp_path / "data", database_url=f"postgresql+psycopg://dhr:secret@127.0.0.1:{port}/x")
    with caplog.at_level(logging.ERROR, logger="dhrclip.api"), TestClient(create_app(settings)) as client:
        reason = client.get("/readyz").json()["reason"]
        assert reason.startswith(f"storage unavailable: database postgresql+psycopg://dhr:***@127.0.0.1:{port}/x ")
        assert "\n" not in reason and "secret" not in reason and "refused" in reason.lower()
        _assert_unready_with(client, caplog, reason)
    assert not (tmp_path / "data" / "inspections.db").exists()


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("nonsense", "Could not parse SQLAlchemy URL from given URL string"),
        ("postgresql://dhr:secret@db:notaport/x", "invalid literal for int() with base 10: 'notaport'"),
    ],
)
def test_an_unparseable_database_url_is_one_line_and_503(tmp_path, caplog, url, cause):
    """Was an ArgumentError/ValueError traceback that stopped the start-up (the URL is not echoed: it may hold a
    password)."""
    settings = make_settings(tmp_path / "data", database_url=url)
    with caplog.at_level(logging.ERROR, logger="dhrclip.api"), TestClient(create_app(settings)) as client:
        reason = f"storage unavailable: the database URL cannot be parsed ({cause})"
        _assert_unready_with(client, caplog, reason)


def test_unknown_bucket_is_one_line_and_503(tmp_path, s3_endpoint, caplog):
    settings = make_settings(tmp_path / "data", artefact_url="s3://no-such-bucket-dhr/p")
    with caplog.at_level(logging.ERROR, logger="dhrclip.api"), TestClient(create_app(settings)) as client:
        reason = (
            "storage unavailable: artefact store unavailable: s3://no-such-bucket-dhr/p: "
            "bucket does not exist (or is not visible with these credentials)"
        )
        _assert_unready_with(client, caplog, reason)
    assert [p.name for p in (tmp_path / "data").rglob("*.png")] == []


def test_missing_credentials_are_one_line_and_503(tmp_path, s3_bucket, monkeypatch, caplog):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = make_settings(tmp_path / "data", artefact_url=f"s3://{s3_bucket}")
    with caplog.at_level(logging.ERROR, logger="dhrclip.api"), TestClient(create_app(settings)) as client:
        reason = (
            f"storage unavailable: artefact store unavailable: s3://{s3_bucket}: "
            "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)"
        )
        _assert_unready_with(client, caplog, reason)


@pytest.mark.parametrize("url", ["ftp://host/x", "s3://", "file:relative"])
def test_artefact_url_of_unknown_form_is_a_settings_error(tmp_path, url):
    with pytest.raises(ValueError, match="use s3://bucket/prefix or file:///absolute/path"):
        make_settings(tmp_path, artefact_url=url)
