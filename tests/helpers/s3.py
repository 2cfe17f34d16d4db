"""Real object-store and web servers on 127.0.0.1 for tests: S3 (moto's server) and plain HTTP (``http.server``).

API (small and stable; imported as ``tests.helpers.s3``)::

    from tests.helpers.s3 import S3Server, HttpFolderServer

    with S3Server() as s3:                  # start() on enter, stop() on exit
        s3.endpoint                        # "http://127.0.0.1:<port>"
        s3.env()                           # {"AWS_ENDPOINT_URL": ..., "AWS_ACCESS_KEY_ID": ..., ...}: put these in a
                                           # process environment (a Ray runtime_env's env_vars, a subprocess env)
        s3.make_bucket("data")             # -> "s3://data"
        s3.fs()                            # an s3fs.S3FileSystem on this endpoint (no cache), for direct reads/writes
        s3.url("data", "demo/train")       # -> "s3://data/demo/train"

    with HttpFolderServer(folder) as web:  # a read-only web server over `folder` (GET / HEAD, 404 when missing)
        web.url("demo/train/manifest.json")  # "http://127.0.0.1:<port>/demo/train/manifest.json"

    # pytest fixtures (import them into a test module or a conftest.py):
    #   s3         function-scoped: a fresh server, the AWS_* variables monkeypatched into os.environ
    #   s3_module  module-scoped: one server shared by a module's tests (sets os.environ for the module, restores it)
    #   s3_session session-scoped: the same, once per test session

The S3 command is ``python -m moto.server -H 127.0.0.1 -p PORT`` (never 0.0.0.0), run as a subprocess in its own
process group (stdout/stderr to a temporary log file); :meth:`S3Server.start` waits until the endpoint answers HTTP and
raises :class:`RuntimeError` with the log's tail if it does not within ``start_timeout_s``. moto accepts any
credentials; the ones in :meth:`S3Server.env` are fixed dummies. Start-up on the 2-core dev machine: ~1-2 s.

s3fs (botocore) and pyarrow both read ``AWS_ENDPOINT_URL``, so code under test needs no endpoint argument; fsspec
caches filesystem instances per process, so :meth:`S3Server.start` and the fixtures clear s3fs's instance cache
(``S3FileSystem.clear_instance_cache()``) so that a new endpoint is picked up.

Only tests start these servers.
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

import pytest

from tests.helpers.server_process import HOST, ServerProcess
from tests.helpers.server_process import free_port as free_port  # re-exported: tests import it from here

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


def clear_fs_caches() -> None:
    """Forget cached s3fs / fsspec filesystem instances (they hold the endpoint they were made with)."""
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:  # pragma: no cover
        pass
    try:
        import fsspec.implementations.http as fh

        fh.HTTPFileSystem.clear_instance_cache()
    except ImportError:  # pragma: no cover
        pass


class S3Server(ServerProcess):
    """One ``moto.server`` process on 127.0.0.1; see the module docstring."""

    _label = "moto server"
    _poll_s = 0.05
    _stdin = subprocess.DEVNULL

    @property
    def endpoint(self) -> str:
        return self._http_url

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point boto / s3fs / pyarrow at this server (dummy credentials)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }

    def fs(self):
        """An ``s3fs.S3FileSystem`` on this endpoint (uncached instance, listings not cached)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": REGION},
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    def make_bucket(self, name: str) -> str:
        """Creates bucket ``name`` (a no-op when it exists); returns ``"s3://name"``."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )
        try:
            client.create_bucket(Bucket=name)  # us-east-1: no LocationConstraint
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    @staticmethod
    def url(bucket: str, *parts: str) -> str:
        return "/".join([f"s3://{bucket}", *(p.strip("/") for p in parts if p)])

    # -- the process (hooks of ServerProcess) -----------------------------------------------------------------------
    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _open_log(self, cmd: list[str]) -> IO[str]:
        fd, name = tempfile.mkstemp(prefix="moto-", suffix=".log")
        os.close(fd)
        self._log_path = Path(name)
        return self._log_path.open("a")

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def start(self) -> S3Server:
        if not self.running:
            super().start()
            clear_fs_caches()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Kills the server's process group (SIGTERM, then SIGKILL); the objects are gone (moto keeps them in
        memory)."""
        super().stop(timeout_s)
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None
        clear_fs_caches()

    def __repr__(self) -> str:
        return f"S3Server({self.endpoint}, running={self.running})"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request log on stderr
        pass


class HttpFolderServer:
    """``http.server`` over ``folder`` on 127.0.0.1 in a daemon thread (threaded: parallel loader workers)."""

    def __init__(self, folder: str | Path, *, port: int | None = None):
        self.folder = Path(folder)
        self.port = port or 0
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, *parts: str) -> str:
        return "/".join([self.base, *(p.strip("/") for p in parts if p)])

    def start(self) -> HttpFolderServer:
        handler = functools.partial(_QuietHandler, directory=str(self.folder))
        self._httpd = http.server.ThreadingHTTPServer((HOST, self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http-folder", daemon=True)
        self._thread.start()
        clear_fs_caches()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> HttpFolderServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _set_env(server: S3Server, setter) -> None:
    for k in ENV_KEYS:
        setter(k, None)
    for k, v in server.env().items():
        setter(k, v)


@pytest.fixture
def s3(monkeypatch):
    """A fresh :class:`S3Server` for one test, its AWS_* variables in ``os.environ`` (restored afterwards)."""
    with S3Server() as server:

        def setter(k, v):
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, v)

        _set_env(server, setter)
        clear_fs_caches()
        yield server
    clear_fs_caches()


def _shared(server_factory):
    saved = {k: os.environ.get(k) for k in ENV_KEYS}

    def setter(k, v):
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

    with server_factory() as server:
        _set_env(server, setter)
        clear_fs_caches()
        try:
            yield server
        finally:
            for k, v in saved.items():
                setter(k, v)
            clear_fs_caches()


@pytest.fixture(scope="module")
def s3_module():
    """One :class:`S3Server` for a test module; its AWS_* variables in ``os.environ`` while the module runs."""
    yield from _shared(S3Server)


@pytest.fixture(scope="session")
def s3_session():
    """One :class:`S3Server` for the test session; its AWS_* variables in ``os.environ`` meanwhile."""
    yield from _shared(S3Server)
