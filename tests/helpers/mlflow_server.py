"""A real ``mlflow server`` on 127.0.0.1 for tests: tracking over HTTP, artifacts proxied by the server.

API (small and stable; imported as ``tests.helpers.mlflow_server``)::

    from tests.helpers.mlflow_server import MlflowServer

    with MlflowServer(tmp_path / "mlflow") as server:   # start() on enter, stop() on exit
        server.uri             # "http://127.0.0.1:<port>": MLFLOW_TRACKING_URI / tracking.uri for every process
        server.stop()          # the store and the port survive a stop ...
        server.start()         # ... and a start serves the same runs again (same port, same store)
        server.restart()       # stop() + start()
        server.running         # True while the process is alive
        server.db_uri          # "sqlite:///<root>/mlflow.db": the backend store, for direct reads
        server.artifacts_dir   # <root>/artifacts: where the server writes artifacts (--artifacts-destination)
        server.startup_s       # seconds the last start() took until /health answered

    # pytest fixtures (import them into a test module or a conftest.py):
    #   mlflow_server         function-scoped, a fresh store in tmp_path / "mlflow"
    #   mlflow_server_module  module-scoped, one store shared by a module's tests

The command is ``mlflow server --host 127.0.0.1 --port PORT --backend-store-uri sqlite:///<root>/mlflow.db
--artifacts-destination <root>/artifacts --workers 1`` (never 0.0.0.0), run as a subprocess in its own process group
(its stdout/stderr go to ``<root>/server.log``); :meth:`start` waits for ``GET /health`` to answer 200 and raises
:class:`RuntimeError` with the log's tail if it does not within `start_timeout_s`. New experiments get
``mlflow-artifacts:/<id>`` artifact roots, so every artifact travels through the server.

Start-up time measured on the 2-core dev machine (MLflow 3.17): ~7 s for a fresh store (schema migrations), ~5 s for a
restart on an existing one; the fixtures therefore come in a module-scoped variant too.

Only tests start MLflow servers (``tests/reliability/test_security.py`` forbids it in project code).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from tests.helpers.server_process import HOST, ServerProcess, free_port, listening


def _mlflow_executable() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]


class MlflowServer(ServerProcess):
    """One ``mlflow server`` process over the store in `root` (created if missing); see the module docstring."""

    _label = "mlflow server"
    _ready_word = "healthy"
    _health_path = "/health"

    def __init__(self, root: str | Path, *, port: int | None = None, start_timeout_s: float = 120.0):
        self.root = Path(root).resolve()
        super().__init__(port=port, start_timeout_s=start_timeout_s)

    # -- addresses --------------------------------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return self._http_url

    @property
    def db_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    # -- the process (hooks of ServerProcess) -----------------------------------------------------------------------
    def _command(self) -> list[str]:
        return [
            *_mlflow_executable(),
            "server",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--backend-store-uri",
            self.db_uri,
            "--artifacts-destination",
            str(self.artifacts_dir),
            "--workers",
            "1",
        ]

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        # no job runner (6 extra processes, a /dev/shm folder left behind per start, 3x slower start-up); no telemetry
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _cwd(self) -> Path:
        return self.root

    def _open_log(self, cmd: list[str]) -> IO[str]:
        self._log_path = self.log_path
        log = self.log_path.open("a")
        log.write(f"\n--- start {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n")
        log.flush()
        return log

    def _accepts(self, status: int) -> bool:
        return status == 200

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def start(self) -> MlflowServer:
        """Starts the server (a no-op while it runs) and waits until ``/health`` answers."""
        if not self.running:
            self.root.mkdir(parents=True, exist_ok=True)
            self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        return super().start()

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stops the server's process group (SIGTERM, then SIGKILL after `timeout_s`) and waits until the port is
        free again; the store is kept. A no-op when it is not running."""
        proc = self._terminate(timeout_s)
        if proc is not None:  # workers of the group that outlived the parent
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._close_log()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and listening(HOST, self.port):
            time.sleep(0.1)

    def restart(self) -> MlflowServer:
        """stop() then start(): the same port and the same store."""
        self.stop()
        return self.start()

    def __repr__(self) -> str:
        return f"MlflowServer({self.root}, uri={self.uri}, running={self.running})"


@pytest.fixture
def mlflow_server(tmp_path):
    """A running :class:`MlflowServer` over a fresh store in ``tmp_path / "mlflow"`` (stopped afterwards)."""
    with MlflowServer(tmp_path / "mlflow") as server:
        yield server


@pytest.fixture(scope="module")
def mlflow_server_module(tmp_path_factory):
    """One running :class:`MlflowServer` for a whole test module (tests share its store: use distinct experiment
    names). A test that stops it must start it again before it ends."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


__all__ = ["HOST", "MlflowServer", "free_port", "mlflow_server", "mlflow_server_module"]
