"""moto's standalone S3-compatible server on a loopback port, started by the tests, and buckets on it.

``s3_endpoint`` (session fixture) starts ``python -m moto.server`` in a subprocess on a free 127.0.0.1 port and
points the AWS variables of the test process at it (fixed dummy credentials, region us-east-1), so that boto3
clients built the standard way, in this process or in child processes, talk to it. ``s3_bucket`` creates a new
empty bucket per test.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int, log=None) -> subprocess.Popen:
    """The moto server on ``127.0.0.1:port``; returns once it answers HTTP (at most 60 s). ``log``: a file for
    its request log (default: discarded)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log if log is not None else subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with status {proc.returncode}") from None
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not answer within 60 s") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """URL of a running moto S3 server; the AWS variables of this process point at it for the session."""
    port = free_port()
    with open(tmp_path_factory.mktemp("moto") / "moto.log", "wb") as log:
        proc = start_moto(port, log)
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=url)
    try:
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # a request thread still hangs: moto waits for it on SIGTERM
            proc.kill()
            proc.wait(10)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A new empty bucket on the moto server."""
    import boto3

    name = f"dhr-test-{secrets.token_hex(6)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name
