"""A server run as a subprocess on 127.0.0.1 for tests: the lifecycle that ``tests.helpers.s3`` and
``tests.helpers.mlflow_server`` share.

:class:`ServerProcess` starts a command in its own process group (``start_new_session``; stdout/stderr to a log
file), waits until ``GET http://127.0.0.1:<port><health_path>`` answers with a status the subclass accepts (raising
:class:`RuntimeError` with the log's tail when the process exits first or ``start_timeout_s`` passes) and stops the
group with SIGTERM, then SIGKILL after a timeout. A subclass gives the command, its environment and working directory,
the log file and the health check::

    class MyServer(ServerProcess):
        _label = "my server"                    # in error messages
        _health_path = "/health"

        def _command(self) -> list[str]: ...    # binds HOST and self.port
        def _child_env(self) -> dict[str, str]: ...
        def _open_log(self, cmd) -> IO[str]: ...  # sets self._log_path, returns the file opened for appending

Servers bind 127.0.0.1 (:data:`HOST`) only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TypeVar

HOST = "127.0.0.1"
_S = TypeVar("_S", bound="ServerProcess")


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class ServerProcess:
    """One server subprocess on ``HOST:port``; see the module docstring. Subclasses fill in the hooks below."""

    _label = "server"  # "<label> exited with ..." / "<label> on <url> not <ready_word> after ..."
    _ready_word = "up"
    _health_path = "/"
    _poll_s = 0.1  # between health probes
    _stdin: int | None = None  # the child's stdin (None: inherited)

    def __init__(self, *, port: int | None = None, start_timeout_s: float = 60.0):
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.startup_s: float | None = None  # seconds the last start() took until the health check passed
        self._proc: subprocess.Popen | None = None
        self._log: IO[str] | None = None
        self._log_path: Path | None = None

    # -- hooks ------------------------------------------------------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _child_env(self) -> dict[str, str]:
        return dict(os.environ)

    def _cwd(self) -> Path | None:
        return None

    def _open_log(self, cmd: list[str]) -> IO[str]:
        """Sets ``self._log_path`` and returns that file opened for appending (the child's stdout and stderr)."""
        raise NotImplementedError

    def _accepts(self, status: int) -> bool:
        """Whether an HTTP answer with `status` from the health URL means the server is up."""
        return status < 500

    # -- lifecycle --------------------------------------------------------------------------------------------------
    @property
    def _http_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self: _S) -> _S:
        """Starts the process (a no-op while it runs) and waits until the health URL answers."""
        if self.running:
            return self
        cmd = self._command()
        self._log = self._open_log(cmd)
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self._cwd(),
            env=self._child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=self._stdin,
            start_new_session=True,
        )
        try:
            self._wait_ready(t0 + self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _wait_ready(self, deadline: float) -> None:
        url = f"{self._http_url}{self._health_path}"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self._label} exited with {self._proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    status = r.status
            except urllib.error.HTTPError as e:  # an HTTP error status is an answer too
                status = e.code
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                status = None
            if status is not None and self._accepts(status):
                return
            time.sleep(self._poll_s)
        raise RuntimeError(
            f"{self._label} on {self._http_url} not {self._ready_word} after {self.start_timeout_s:.0f}s:\n"
            f"{self._log_tail()}"
        )

    def _log_tail(self, n: int = 4000) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-n:] if self._log_path else "(no log)"
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the process group (SIGTERM, then SIGKILL after `timeout_s`) and closes the log. A no-op when it is
        not running."""
        self._terminate(timeout_s)
        self._close_log()

    def _terminate(self, timeout_s: float) -> subprocess.Popen | None:
        """SIGTERM to the process group, SIGKILL after `timeout_s`; returns the process (None if none was started)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["HOST", "ServerProcess", "free_port", "listening"]
