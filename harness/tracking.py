"""Experiment tracking for training runs: a small ``Tracker`` protocol, an MLflow implementation and a no-op one.

Design (``shared/docs/architecture.md`` §5, §7 and pitfalls 8–10):

* Only the explicit client API (``mlflow.tracking.MlflowClient(tracking_uri)``) and explicit run ids are used, never
  the fluent ``mlflow.start_run``/``mlflow.log_*`` state, which is process- and thread-local: two Ray tasks would get
  two runs (pitfall 9). Every process passes the tracking URI itself (mlflow#7206, ray#36257).
* Rank 0 logs; other ranks get a :class:`NoopTracker` from :func:`make_tracker` (one run per GPU otherwise,
  mlflow#11782).
* A retried trial finds its run by the ``harness.trial_key`` tag and resumes it instead of creating a duplicate
  (the composer#3263 / lightly-train#334 pattern). Params are immutable in MLflow (mlflow#4248): they are logged when
  the run is new and *verified* when it is resumed; a changed configuration is an error naming the keys.
* Child runs in another process get ``mlflow.parentRunId`` set explicitly (``nested=True`` is in-process only).
* Metrics are logged against an explicit global step, so a resumed run overwrites instead of interleaving.
* A store that is unavailable for a while (SQLite locked by another writer, tracking server down) does not stop
  training: metrics and tags are buffered in order and retried with backoff (:func:`is_transient_store_error`);
  the worker stores what is still buffered inside each checkpoint, so a crash cannot lose it, and :meth:`finish`
  waits up to ``HARNESS_MLFLOW_RETRY_S`` (default 600 s) for the store. If it never comes back, the buffered metrics
  are written to ``spill_path`` (the run directory's ``unlogged_metrics.jsonl``, replayed into the run when the trial
  is resumed) and :class:`TrackingUnavailable` names the store, the count and the file: never silently missing.

The default store is a local SQLite file (``sqlite:///<run_dir>/mlflow.db``) with artifacts in
``<run_dir>/mlartifacts``; ``mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///<run_dir>/mlflow.db`` shows runs
and artifacts. ``MLFLOW_TRACKING_URI`` (or ``tracking.uri``) overrides it (a tracking server for clusters: a SQLite
file on a shared FS is not safe for many writers).

Over HTTP (``http://HOST:PORT``, a tracking server started with ``--artifacts-destination``): the harness sets no
artifact location, so new experiments get the server's ``mlflow-artifacts:/<id>`` root and every artifact (config,
provenance, adapter, the sweep's spec and report) is uploaded through the server, never written to a path of the
process that logs it. MLflow's own HTTP retries (MLflow 3.17: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` = 7,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` = 2, ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER`` = 1.0,
``MLFLOW_HTTP_REQUEST_TIMEOUT`` = 120 s) would block one training step for minutes while the server is down, so
:func:`limit_http_retries` (called by :meth:`MLflowTracker.open` for an http(s) URI) lowers them to
:data:`HTTP_CLIENT_LIMITS` (2 retries, factor 1, jitter 0.5 s, 10 s per request) *unless the environment already sets
them* (the user's values win; they are process-wide and inherited by child processes). A stopped or restarting
server (connection refused) then costs a failed call ~2.5 s, an unreachable host at most 3 × 10 s + 2.5 s, and the
tracker's own buffer (above) takes over: after a failed call, logging only buffers until the next retry time. Opening
a run also waits for the store (up to ``HARNESS_MLFLOW_RETRY_S``), searching for the trial's run again before it
creates one, so a retried request cannot create a duplicate run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

log = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
TRIAL_KEY_TAG = "harness.trial_key"
PARENT_RUN_TAG = "mlflow.parentRunId"
ERROR_TAG = "harness.error"  # why a run FAILED (set by RunLifecycle)
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"

# MLflow limits (mlflow/utils/validation.py, MLflow 3.17): 100 params/tags and 1000 metrics per log_batch call,
# param values ≤ 6000 chars, tag values ≤ 8000 chars.
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000


class ParamConflictError(ValueError):
    """A resumed run was opened with a configuration that differs from the params it already holds."""


class TrackingUnavailable(RuntimeError):
    """The tracking store stayed unavailable past the retry budget; the message names what was not logged."""


# error codes MLflow gives a store that is there but cannot answer now (SQLite "database is locked" comes back as
# TEMPORARILY_UNAVAILABLE after the driver's busy timeout; an unreachable server after MLflow's own HTTP retries)
# (MLflow's default code INTERNAL_ERROR is not one of them: it also marks real bugs; an unreachable server is
# recognised by its message, a 5xx answer by "error code 5xx")
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"}
_TRANSIENT_TEXT = (
    "database is locked",
    "unable to open database",
    "disk i/o error",
    "max retries exceeded",
    "connection refused",
    "connection reset",
    "connection aborted",
    "timed out",
    "temporarily unavailable",
)
_HTTP_5XX = re.compile(r"error code 5\d\d")


def is_unique_violation(err: BaseException) -> bool:
    """A store's unique-key violation (SQLite ``UNIQUE constraint failed``, PostgreSQL ``duplicate key value``, MySQL
    ``Duplicate entry``), as MLflow's sqlalchemy store raises it under concurrent inserts of the same row."""
    text = str(err)
    return any(m in text for m in ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry"))


def is_transient_store_error(e: BaseException) -> bool:
    """True when `e` says the store is unreachable or busy (retry later), not that the request is wrong."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    code = getattr(e, "error_code", None)
    text = str(e).lower()
    if code in _TRANSIENT_CODES or any(t in text for t in _TRANSIENT_TEXT) or _HTTP_5XX.search(text):
        return True
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(status, int):  # requests.HTTPError (an artifact upload/download through the server)
        return status >= 500 or status == 429
    mod = type(e).__module__
    return mod.startswith(("sqlalchemy", "requests", "urllib3")) and "integrity" not in type(e).__name__.lower()


def retry_budget_s() -> float:
    """Seconds a tracker waits for an unavailable store before giving up (``HARNESS_MLFLOW_RETRY_S``, default 600)."""
    try:
        return float(os.environ.get("HARNESS_MLFLOW_RETRY_S", "600"))
    except ValueError:
        raise ValueError(
            f"HARNESS_MLFLOW_RETRY_S={os.environ['HARNESS_MLFLOW_RETRY_S']!r} is not a number of seconds"
        ) from None


# MLflow's HTTP client limits while the harness tracks through a server (see the module docstring); a variable the
# environment already sets is left alone. Read by MLflow on every request (mlflow/utils/rest_utils.py http_request).
HTTP_CLIENT_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def is_http_uri(uri: str | None) -> bool:
    """True for a tracking server URI (``http://`` / ``https://``)."""
    return bool(uri) and str(uri).lower().startswith(("http://", "https://"))


def limit_http_retries(tracking_uri: str | None) -> dict[str, str]:
    """For an http(s) `tracking_uri`: sets :data:`HTTP_CLIENT_LIMITS` in ``os.environ`` where the environment does not
    set them already; returns the values in effect (``{}`` for other stores, which are left alone)."""
    if not is_http_uri(tracking_uri):
        return {}
    for k, v in HTTP_CLIENT_LIMITS.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in HTTP_CLIENT_LIMITS}


def wait_for_store(fn: Callable[[], Any], what: str, budget_s: float | None = None) -> Any:
    """Returns ``fn()``, calling it again with backoff (1, 2, 4 … 30 s) while it fails with a transient store error
    (:func:`is_transient_store_error`), for up to `budget_s` (default :func:`retry_budget_s`); then the last error
    propagates. For calls that cannot be buffered: opening a run, the driver's reads. `fn` must be safe to repeat."""
    deadline = time.monotonic() + (retry_budget_s() if budget_s is None else budget_s)
    delay, down_since = 1.0, None
    while True:
        try:
            out = fn()
        except Exception as e:
            if not is_transient_store_error(e) or time.monotonic() >= deadline:
                raise
            if down_since is None:
                down_since = time.monotonic()
                log.warning(
                    "MLflow store unavailable %s (%s: %s); retrying for up to %.0f s",
                    what,
                    type(e).__name__,
                    (str(e).splitlines() or [""])[0][:200],
                    deadline - time.monotonic(),
                )
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 2, 30.0)
            continue
        if down_since is not None:
            log.warning("MLflow store is back after %.0f s (%s)", time.monotonic() - down_since, what)
        return out


@runtime_checkable
class Tracker(Protocol):
    """What the training worker logs through. Implementations: :class:`MLflowTracker`, :class:`NoopTracker`."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, obj: Any, name: str) -> None: ...

    def log_datasets(self, datasets: Iterable[Mapping[str, Any]]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def finish(self, status: RunStatus = "FINISHED") -> None: ...

    def try_flush(self) -> bool: ...

    def pending_metrics(self) -> list[list[Any]]: ...

    def requeue_metrics(self, rows: Iterable[Iterable[Any]]) -> None: ...


# -- config flattening ------------------------------------------------------------------------------------------------
def flatten_config(cfg: Mapping[str, Any], *, max_value_length: int = MAX_PARAM_VAL_LENGTH) -> dict[str, str]:
    """Flattens a nested (resolved) config into MLflow params: dotted keys, string values.

    * nested mappings → ``a.b.c`` keys; an empty mapping → ``"{}"``;
    * lists/tuples of scalars → one JSON value (``trainer.milestones = "[3, 6]"``); lists containing mappings or
      lists → indexed keys (``a.0.b``);
    * scalars → ``str(value)`` (``None`` → ``"None"``, ``True`` → ``"True"``, floats via ``repr``);
    * values are truncated to MLflow's limit (what MLflow itself would store), so a stored param compares equal to a
      freshly flattened one.

    An OmegaConf ``DictConfig`` is resolved first.
    """
    cfg = _to_plain(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"flatten_config expects a mapping, got {type(cfg).__name__}")
    out: dict[str, str] = {}

    def put(key: str, value: str) -> None:
        out[key] = value[:max_value_length]

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            if not node and prefix:
                put(prefix, "{}")
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (list, tuple)):
            if any(isinstance(x, (Mapping, list, tuple)) for x in node):
                for i, v in enumerate(node):
                    walk(f"{prefix}.{i}", v)
            else:
                put(prefix, json.dumps([_scalar(x) for x in node]))
        else:
            put(prefix, _scalar_str(node))

    walk("", cfg)
    return out


def _to_plain(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _scalar(x: Any) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _scalar_str(x: Any) -> str:
    if isinstance(x, float):
        return repr(x)
    if hasattr(x, "value") and not isinstance(x, (int, float, str)):  # Enum members: their value, not "Cls.NAME"
        return str(x.value)
    return str(x)


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# -- tracking URI -----------------------------------------------------------------------------------------------------
def default_tracking_uri(run_dir: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<abs run_dir>/mlflow.db`` (the directory is created)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    d = Path(run_dir).expanduser().resolve()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / DB_FILE}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a *new* experiment keeps its artifacts: ``<dir of the SQLite file>/mlartifacts`` (absolute ``file://``
    URI) for a local SQLite store, ``None`` (the server's default) otherwise.

    Without it, MLflow's SQLite store puts artifacts under ``./mlruns`` of whatever the current directory was when the
    experiment was created, which Ray trials change (pitfall 11).
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db = tracking_uri[len(prefix) :]
    if db in ("", ":memory:"):
        return None
    # sqlite:////abs/path -> "/abs/path"; sqlite:///rel/path -> relative to the cwd (resolved now, once).
    return (Path(db).expanduser().resolve().parent / ARTIFACT_DIR).as_uri()


# Every experiment the harness creates is tagged as model development (the UI's CUSTOM_MODEL_DEVELOPMENT kind). The
# MLflow 3.17 UI does not read the tag yet (a browser-wide "GenAI / Model training" switch decides, GenAI at first:
# found by tests/harness/test_dashboard_browser.py), so the sweep also prints the runs table's link
# (harness.sweep_runs.review_hint); the tag says what the experiment is to any client that reads it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: "custom_model_development"}


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """Returns the id of experiment `name`, creating it (with `artifact_location`) if missing. Safe against a
    concurrent creator (another trial process racing on the same name)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=dict(EXPERIMENT_TAGS))
        except MlflowException as e:  # lost the race: someone created it in between
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            log.debug("experiment %r created concurrently (%s)", name, e)
    if exp.lifecycle_stage != "active":
        raise RuntimeError(
            f"MLflow experiment {name!r} (id {exp.experiment_id}) is deleted; restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or use another experiment name"
        )
    for k, v in EXPERIMENT_TAGS.items():  # an experiment made before the harness tagged it, or by hand
        if exp.tags.get(k) != v:
            client.set_experiment_tag(exp.experiment_id, k, v)
    if artifact_location and exp.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        log.info("experiment %r keeps its artifact location %s", name, exp.artifact_location)
    return exp.experiment_id


# -- implementations --------------------------------------------------------------------------------------------------
class NoopTracker:
    """Logs nothing: for ranks ≠ 0, tests and runs with tracking off."""

    run_id: str | None = None
    resumed = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        pass

    def log_datasets(self, datasets: Iterable[Mapping[str, Any]]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def finish(self, status: RunStatus = "FINISHED") -> None:
        _check_status(status)

    def try_flush(self) -> bool:
        return True

    def pending_metrics(self) -> list[list[Any]]:
        return []

    def requeue_metrics(self, rows: Iterable[Iterable[Any]]) -> None:
        pass

    def __enter__(self) -> NoopTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


def _check_status(status: str) -> None:
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")


class MLflowTracker:
    """One MLflow run, addressed by id through an explicit ``MlflowClient``. Build it with :meth:`open`.

    Usable as a context manager: the run ends FINISHED, FAILED on an exception, KILLED on ``KeyboardInterrupt``.
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        *,
        resumed: bool = False,
        retry_s: float | None = None,
        spill_path: str | Path | None = None,
    ):
        self.client = client
        self._run_id = run_id
        self.resumed = resumed
        self._finished = False
        self.retry_s = retry_budget_s() if retry_s is None else float(retry_s)
        self.spill_path = Path(spill_path) if spill_path is not None else None
        self._pending: list[tuple[str, list]] = []  # ("metrics" | "tags", entities) in logging order
        self._down_since: float | None = None
        self._next_try = 0.0
        self._backoff = 1.0
        self._gave_up = False
        self._system_monitor: Any = None

    @property
    def run_id(self) -> str:
        return self._run_id

    @classmethod
    def open(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        trial_key: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        artifact_location: str | None = None,
    ) -> MLflowTracker:
        """Resumes the run tagged ``harness.trial_key = trial_key`` in `experiment`, or creates it.

        Args:
            tracking_uri: explicit store URI (see :func:`default_tracking_uri`).
            experiment: experiment name; created if missing.
            run_name: the run's display name (from the config; set only when the run is created).
            trial_key: stable identity of this trial (``sweep_id/point_id/seed``): a retry finds the same run.
            parent_run_id: sets the ``mlflow.parentRunId`` tag (the parent lives in another process).
            tags: extra tags (set on create and on resume; tags are mutable).
            params: the resolved config (nested or flat); flattened with :func:`flatten_config`. Logged when the
                run is new; on resume it must equal the stored params (keys missing from the stored run, e.g. after
                a crash in the middle of the first logging, are added).
            artifact_location: for a newly created experiment; default :func:`default_artifact_location`.

        Raises:
            ParamConflictError: resumed run whose stored params differ from `params` (the keys are named).
        """
        from mlflow.tracking import MlflowClient

        if "'" in trial_key:
            raise ValueError(f"trial_key must not contain a single quote (MLflow filter syntax): {trial_key!r}")
        limit_http_retries(tracking_uri)
        client = MlflowClient(tracking_uri=tracking_uri)
        if artifact_location is None:
            artifact_location = default_artifact_location(tracking_uri)
        # the store may be down (a server restarting): wait for it; every try searches for the trial's run again
        # before creating it, so a create whose answer was lost is resumed, not duplicated
        return wait_for_store(
            lambda: cls._open(client, experiment, run_name, trial_key, parent_run_id, tags, params, artifact_location),
            f"opening the run of trial {trial_key}",
        )

    @classmethod
    def _open(
        cls,
        client: Any,
        experiment: str,
        run_name: str,
        trial_key: str,
        parent_run_id: str | None,
        tags: Mapping[str, Any] | None,
        params: Mapping[str, Any] | None,
        artifact_location: str | None,
    ) -> MLflowTracker:
        exp_id = ensure_experiment(client, experiment, artifact_location)
        found = client.search_runs(
            [exp_id],
            filter_string=f"tags.`{TRIAL_KEY_TAG}` = '{trial_key}'",
            order_by=["attributes.start_time ASC"],
            max_results=10,
        )
        all_tags = {TRIAL_KEY_TAG: trial_key, **{str(k): v for k, v in (tags or {}).items()}}
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        if found:
            run = found[0]
            if len(found) > 1:
                log.warning(
                    "%d MLflow runs carry %s=%r; resuming the oldest, %s",
                    len(found),
                    TRIAL_KEY_TAG,
                    trial_key,
                    run.info.run_id,
                )
            tracker = cls(client, run.info.run_id, resumed=True)
            if params is not None:
                tracker._verify_and_complete_params(flatten_config(params), run.data.params)
            client.update_run(run.info.run_id, status="RUNNING")
            if ERROR_TAG in run.data.tags:  # the previous attempt's error no longer describes this run
                client.delete_tag(run.info.run_id, ERROR_TAG)
            tracker.set_tags(all_tags)
            log.info("resumed MLflow run %s (trial %s)", run.info.run_id, trial_key)
        else:
            str_tags = {k: _tag_value(v) for k, v in all_tags.items()}
            run = client.create_run(exp_id, tags=str_tags, run_name=run_name)
            tracker = cls(client, run.info.run_id, resumed=False)
            if params is not None:
                tracker.log_params(params)
            log.info("created MLflow run %s (trial %s)", run.info.run_id, trial_key)
        return tracker

    # -- params --------------------------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs (flattened) params. A key the run already holds must have the same value (params are immutable,
        mlflow#4248); keys already stored with that value are skipped, so calling this again after a resume is safe."""
        flat = flatten_config(params)
        stored = self.client.get_run(self._run_id).data.params
        conflicts = {k: (stored[k], v) for k, v in flat.items() if k in stored and stored[k] != v}
        if conflicts:
            raise ParamConflictError(self._conflict_message(conflicts, [], []))
        self._log_params_batches({k: v for k, v in flat.items() if k not in stored})

    def _verify_and_complete_params(self, flat: dict[str, str], stored: Mapping[str, str]) -> None:
        changed = {k: (stored[k], flat[k]) for k in flat if k in stored and stored[k] != flat[k]}
        removed = sorted(set(stored) - set(flat))
        if changed or removed:
            raise ParamConflictError(self._conflict_message(changed, removed, sorted(set(flat) - set(stored))))
        missing = {k: v for k, v in flat.items() if k not in stored}
        if missing:
            log.info("run %s: logging %d params missing from the stored run", self._run_id, len(missing))
        self._log_params_batches(missing)

    def _conflict_message(self, changed: dict, removed: list, added: list) -> str:
        lines = [f"MLflow run {self._run_id} was logged with a different configuration (params are immutable):"]
        lines += [f"  {k}: stored {a!r}, now {b!r}" for k, (a, b) in sorted(changed.items())[:20]]
        if len(changed) > 20:
            lines.append(f"  ... and {len(changed) - 20} more changed keys")
        if removed:
            lines.append(f"  only in the stored run: {removed[:20]}")
        if added:
            lines.append(f"  only in the new config: {added[:20]}")
        lines.append("Resume with the original config, or use a new trial_key (a new point_id) for a changed config.")
        return "\n".join(lines)

    def _log_params_batches(self, flat: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, params=chunk, synchronous=True)

    # -- metrics, tags, artifacts ----------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Logs every metric at global `step` (batched). Values may be Python/numpy numbers or 0-d tensors."""
        from mlflow.entities import Metric

        if isinstance(step, bool) or not isinstance(step, int):
            step = int(step)
        ts = int(time.time() * 1000)
        items = [Metric(str(k), _to_float(k, v), ts, step) for k, v in metrics.items()]
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self._pending.append(("metrics", chunk))
        self.try_flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), _tag_value(v)) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._pending.append(("tags", chunk))
        self.try_flush()

    # -- buffering while the store is unavailable --------------------------------------------------------------
    def try_flush(self) -> bool:
        """Sends what is buffered, oldest first; True when nothing is left. While the store is down, calls before the
        next retry time only buffer (training does not wait on a store that just failed)."""
        if not self._pending:
            return True
        if time.monotonic() < self._next_try:
            return False
        while self._pending:
            kind, chunk = self._pending[0]
            try:
                self.client.log_batch(self._run_id, synchronous=True, **{kind: chunk})
            except Exception as e:
                if not is_transient_store_error(e):
                    self._pending.pop(0)  # a rejected request is dropped (and raised), not retried forever
                    raise
                self._store_down(e)
                return False
            self._pending.pop(0)
        if self._down_since is not None:
            log.warning(
                "MLflow store is back after %.0f s; run %s: buffered metrics logged",
                time.monotonic() - self._down_since,
                self._run_id,
            )
        self._down_since, self._backoff, self._next_try = None, 1.0, 0.0
        return True

    def _store_down(self, e: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "MLflow store unavailable (%s: %s); run %s keeps training, buffering metrics and retrying",
                type(e).__name__,
                str(e).splitlines()[0][:200],
                self._run_id,
            )
        self._next_try = now + self._backoff
        self._backoff = min(self._backoff * 2, 60.0)

    def flush(self, timeout_s: float | None = None) -> None:
        """Waits (up to `timeout_s`, default :attr:`retry_s`) until everything buffered is logged.

        Raises:
            TrackingUnavailable: the store stayed unavailable; the buffered metrics were written to
                :attr:`spill_path` (when set) and the message names the store, the run, the count and the file.
        """
        if self._gave_up:  # the budget is spent (e.g. finish("FAILED") after a TrackingUnavailable): one try
            timeout_s, self._next_try = 0.0, 0.0
        deadline = time.monotonic() + (self.retry_s if timeout_s is None else timeout_s)
        while not self.try_flush():
            if time.monotonic() >= deadline:
                self._gave_up = True
                raise TrackingUnavailable(self._give_up_message())
            time.sleep(max(0.05, min(self._next_try, deadline) - time.monotonic()))

    def _give_up_message(self) -> str:
        n = sum(len(c) for k, c in self._pending if k == "metrics")
        where = ""
        if self.spill_path is not None:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with self.spill_path.open("w") as f:
                for row in self.pending_metrics():  # everything still buffered, replayed rows included
                    f.write(json.dumps(row) + "\n")
            where = (
                f"; they are saved in {self.spill_path} and logged into the run when the trial is resumed "
                "(re-run the same command once the store is reachable)"
            )
        uri = getattr(self.client, "_tracking_client", None)
        uri = getattr(uri, "tracking_uri", None) or getattr(self.client, "tracking_uri", "?")
        return (
            f"MLflow store {uri} unavailable for {self.retry_s:.0f} s (HARNESS_MLFLOW_RETRY_S): {n} metric "
            f"values of run {self._run_id} not logged{where}"
        )

    def pending_metrics(self) -> list[list[Any]]:
        """Buffered metric values as ``[key, value, timestamp_ms, step]`` rows (weights_only-safe, for checkpoints)."""
        return [
            [m.key, float(m.value), int(m.timestamp), int(m.step)]
            for kind, chunk in self._pending
            if kind == "metrics"
            for m in chunk
        ]

    def requeue_metrics(self, rows: Iterable[Iterable[Any]]) -> None:
        """Buffers rows from :meth:`pending_metrics` again (after a resume); their original timestamps make a value
        that did reach the store before the crash a duplicate of itself, not a second point."""
        from mlflow.entities import Metric

        items = [Metric(str(k), float(v), int(ts), int(st)) for k, v, ts, st in rows]
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self._pending.append(("metrics", chunk))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads a file, or a directory's contents, under `artifact_path` of the run's artifact root."""
        p = Path(path)
        if p.is_dir():
            self._retrying(self.client.log_artifacts, self._run_id, str(p), artifact_path)
        elif p.is_file():
            self._retrying(self.client.log_artifact, self._run_id, str(p), artifact_path)
        else:
            raise FileNotFoundError(f"artifact {p} does not exist")

    def log_dict(self, obj: Any, name: str) -> None:
        """Writes `obj` as JSON (``.json``) or YAML (``.yaml``/``.yml``) artifact `name` (may contain folders)."""
        self._retrying(self.client.log_dict, self._run_id, _to_plain(obj), name)

    def log_datasets(self, datasets: Iterable[Mapping[str, Any]]) -> None:
        """Records what the run read as MLflow dataset inputs (the UI's Datasets column): each a mapping with
        ``name``, ``digest`` (the split manifest's sha256), ``source`` (its path or URL), ``context`` (train / val /
        test) and optionally ``profile`` (e.g. the sample count). Logging the same dataset again (a resumed run) adds
        nothing: MLflow keys inputs by name and digest."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(
                    name=str(d["name"]),
                    digest=str(d["digest"])[:36],
                    source_type="webdataset_shards",
                    source=json.dumps({"uri": str(d["source"])}),
                    profile=json.dumps(d["profile"]) if d.get("profile") is not None else None,
                ),
                tags=[InputTag("mlflow.data.context", str(d.get("context") or "train"))],
            )
            for d in datasets
        ]
        for attempt in range(5):
            if not inputs:
                return
            try:
                self._retrying(self.client.log_inputs, self._run_id, inputs)
                return
            except Exception as e:
                # two trials starting together both find the dataset row absent and both insert it: the loser's
                # transaction fails on the store's unique key (MLflow's sqlalchemy store checks, then inserts). The
                # row exists now, so the same call again only links this run to it.
                if attempt == 4 or not is_unique_violation(e):
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _retrying(self, fn: Any, *args: Any) -> Any:
        """Calls `fn`, retrying with backoff while the store is unavailable (up to :attr:`retry_s`); used where the
        call cannot be buffered (artifacts, closing the run)."""
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                return fn(*args)
            except Exception as e:
                if not is_transient_store_error(e):
                    raise
                if time.monotonic() >= deadline or self._gave_up:
                    self._gave_up = True
                    raise TrackingUnavailable(self._give_up_message()) from e
                self._store_down(e)
                time.sleep(max(0.05, min(self._next_try, deadline) - time.monotonic()))

    def log_system_metrics(self, interval_s: float = 10.0, node_id: str | None = None) -> None:
        """Samples CPU, memory, disk, network (and GPU when present) every `interval_s` into the run's ``system/*``
        metrics, through MLflow's own system-metrics monitor (a background thread; stopped by :meth:`finish`). A
        resumed run continues its step count."""
        if self._system_monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system_monitor = SystemMetricsMonitor(
            self._run_id,
            sampling_interval=float(interval_s),
            samples_before_logging=1,
            resume_logging=self.resumed,
            node_id=node_id,
            tracking_uri=self.client.tracking_uri,
        )
        self._system_monitor.start()

    def finish(self, status: RunStatus = "FINISHED") -> None:
        """Logs everything buffered (waiting for the store up to :attr:`retry_s`), then ends the run with `status`."""
        _check_status(status)
        if self._system_monitor is not None:
            monitor, self._system_monitor = self._system_monitor, None
            monitor.finish()
        self.flush()
        self._retrying(self.client.set_terminated, self._run_id, status)
        self._finished = True

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")


class RunLifecycle:
    """How a run ends, the same for ``harness train``, every sweep trial and the sweep's parent run::

        with RunLifecycle(tracker) as run:
            ...                        # the run's work
            run.status = "KILLED"      # optional: how a normal exit ends the run (default FINISHED)

    A normal exit ends the run with :attr:`status`; an exception of a `killed_by` type ends it KILLED (resumable, no
    error tag: Ctrl-C, and in a Ray trial also SystemExit, Ray stopping the trial); any other exception ends it
    FAILED, with ``harness.error = "<type>: <message>"`` unless `record_error` is false. The tags of `close_tags()`
    are set first, whatever the outcome. The exception always propagates.
    """

    def __init__(
        self,
        tracker: Tracker,
        *,
        killed_by: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
        record_error: bool = True,
        close_tags: Callable[[], Mapping[str, Any]] | None = None,
    ):
        self.tracker, self.killed_by, self.record_error, self.close_tags = tracker, killed_by, record_error, close_tags
        self.status: RunStatus = "FINISHED"

    def __enter__(self) -> RunLifecycle:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.close_tags is not None:
            self.tracker.set_tags(self.close_tags())
        if exc_type is None:
            self.tracker.finish(self.status)
        elif issubclass(exc_type, self.killed_by):
            self.tracker.finish("KILLED")
        else:
            if self.record_error:
                self.tracker.set_tags({ERROR_TAG: f"{exc_type.__name__}: {exc}"[:5000]})
            self.tracker.finish("FAILED")
        return False


def _to_float(key: Any, v: Any) -> float:
    try:
        return float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {key!r}: value {v!r} is not a number") from e


def _tag_value(v: Any) -> str:
    s = v if isinstance(v, str) else (json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    return s[:MAX_TAG_VAL_LENGTH]


def make_tracker(
    rank: int,
    *,
    tracking_uri: str | None,
    experiment: str,
    run_name: str,
    trial_key: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    enabled: bool = True,
    system_metrics_s: float | None = None,
) -> Tracker:
    """The tracker for one worker process: :class:`MLflowTracker` on rank 0, :class:`NoopTracker` elsewhere (and
    when `enabled` is false or `tracking_uri` is None). `system_metrics_s`: sample system metrics at that interval
    (:meth:`MLflowTracker.log_system_metrics`); None: off."""
    if rank != 0 or not enabled or tracking_uri is None:
        return NoopTracker()
    tracker = MLflowTracker.open(
        tracking_uri, experiment, run_name, trial_key, parent_run_id=parent_run_id, tags=tags, params=params
    )
    if system_metrics_s:
        tracker.log_system_metrics(system_metrics_s)
    return tracker


__all__ = [
    "HTTP_CLIENT_LIMITS",
    "MLflowTracker",
    "NoopTracker",
    "ParamConflictError",
    "RunLifecycle",
    "Tracker",
    "TrackingUnavailable",
    "default_artifact_location",
    "default_tracking_uri",
    "ensure_experiment",
    "flatten_config",
    "is_http_uri",
    "is_transient_store_error",
    "limit_http_retries",
    "make_tracker",
    "wait_for_store",
]
