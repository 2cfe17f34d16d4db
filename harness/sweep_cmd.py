"""`harness sweep SPEC [overrides...]`: run a sweep spec on Ray Tune (resumable), tracked in MLflow.

    harness sweep sweeps/expert_vs_length.yaml --dry-run       # the trial table, nothing launched
    harness sweep sweeps/expert_vs_length.yaml                 # run; re-run the same command to resume
    harness sweep sweeps/expert_vs_length.yaml profile=paper data=mmimdb
    harness validate sweeps/expert_vs_length.yaml [profile=paper ...] [--no-path-check]

SPEC is a YAML sweep spec (see harness/spec.py and sweeps/). `profile=NAME` selects one of the spec's profiles (e.g.
`paper`: Swin-B + BERT-base on GPUs); every other `key=value` is a Hydra override added to all trials. Overrides and
the profile are part of the sweep's identity (sweep_id = name-spec_hash8): the same command resumes the same sweep
(finished trials are not re-run, errored and interrupted ones continue from their last checkpoint), a changed spec or
override starts a new one and never overwrites the old.

Options:
  --dry-run             expand, compose and validate every trial, print the trial table, launch nothing
  --num-cpus N          CPUs of the local Ray cluster (default: all); ignored on an existing cluster
  --progress-every S    seconds between progress tables (default 30)
  --verbose             stream the trials' logs to this console (default: Ray's log files only)
  --no-report           do not write the sweep's report at the end (default: `harness report` runs on it, and its
                        folder <run_root>/reports/<sweep_id>/ is printed and logged to the parent run)
  --no-path-check       (validate) do not require the data / weights to exist on this machine
  --no-resource-check   launch even when one trial asks for more CPUs / GPUs than this machine has (by default such
                        a sweep is refused before launch, exit 2; --dry-run only warns)

Cluster mode (nodes that share no disk; README "Run on a cluster"):
  --address HOST:PORT   join an existing Ray cluster (default $RAY_ADDRESS; none: a local cluster); the project
                        code travels to the workers as the job's runtime_env (py_modules), the nodes need only
                        the dependencies
  --storage URL         Tune state and the trials' checkpoints (default $MOPE_STORAGE, else <run_root>/ray); an
                        object-store URL (s3://BUCKET/PREFIX) makes trials work in node-local scratch ($MOPE_SCRATCH)
  --shared-fs           every node mounts the same file system: allow local paths on a multi-node cluster
  On a cluster of several nodes the sweep is refused (exit 2) while anything a trial reads or writes is a path on
  this machine: MLFLOW_TRACKING_URI must name an MLflow tracking server (http://HOST:PORT), data.shard_dir
  (MOPE_DATA_ROOT) and encoder weights URLs, --storage a URL. The resource check then uses the cluster's live nodes.
Results: `mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///<run_root>/mlflow.db` (local only; the harness
never starts a tracking server itself).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from typing import Any

from harness.compose import ConfigValidationError, compose, validate
from harness.spec import SpecError, SweepSpec, config_lookup, load_spec


def plan(
    path: str, overrides: list[str] | tuple[str, ...] = (), *, check_paths: bool = True
) -> tuple[SweepSpec, list[dict[str, Any]]]:
    """Loads the spec, expands it, composes and validates every trial.

    Returns:
        (spec, trials): each trial is ``Trial.to_dict()`` plus ``cfg``, its resolved configuration.

    Raises:
        SpecError: a malformed spec. ConfigValidationError: a trial that does not compose or validate (named).
    """
    spec = load_spec(path, list(overrides))
    base: list[Any] = []

    def lookup(key: str) -> Any:  # a name an expression reads that the spec does not set: the composed base config
        if not base:
            try:
                base.append(config_lookup(compose(spec.base_overrides())))
            except ConfigValidationError as e:
                raise ConfigValidationError(f"{spec.name}: the shared overrides do not compose: {e}") from e
        return base[0](key)

    trials = []
    per_point: dict[str, dict[str, Any]] = {}
    try:
        expanded = spec.expand(lookup=lookup)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from e
    for t in expanded:
        try:
            if t.point_id not in per_point:
                cfg = compose(t.overrides)
                validate(cfg, check_paths=check_paths)
                per_point[t.point_id] = cfg
            else:  # seeds of a point differ only in `seed` and `run_name` (Hydra composes slowly: ~0.3 s each)
                cfg = copy.deepcopy(per_point[t.point_id])
                cfg.update(seed=t.seed, run_name=t.run_name, overrides=list(t.overrides))
        except ConfigValidationError as e:
            raise ConfigValidationError(f"{path}: trial {t.index} ({t.label}, seed {t.seed}): {e}") from e
        if spec.mlflow_experiment:
            cfg["tracking"]["experiment"] = spec.mlflow_experiment
        trials.append({**t.to_dict(), "cfg": cfg})
    return spec, trials


def local_resources(num_cpus: int | None = None, *, need_gpus: bool = True) -> tuple[float, float]:
    """CPUs and GPUs of the local cluster a sweep would start: `--num-cpus` (else os.cpu_count()) and
    torch.cuda.device_count() (only asked when a trial wants GPUs: importing torch takes seconds)."""
    cpus = float(num_cpus if num_cpus else (os.cpu_count() or 1))
    gpus = 0.0
    if need_gpus:
        try:
            import torch

            gpus = float(torch.cuda.device_count())
        except Exception:  # noqa: BLE001 - no usable CUDA: no GPUs
            gpus = 0.0
    return cpus, gpus


def resource_problem(spec: SweepSpec, num_cpus: int | None = None) -> str | None:
    """Why the spec's trials can never be scheduled on the local cluster, or None (also None with RAY_ADDRESS: an
    existing cluster's resources are only known once connected, see :func:`cluster_problems`)."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    r = spec.resources
    cpus, gpus = local_resources(num_cpus, need_gpus=bool(r.trial_gpus))
    where = f"the local cluster (--num-cpus {num_cpus})" if num_cpus else "this machine"
    return r.unschedulable_reason(cpus, gpus, where)


def cluster_problems(
    spec: SweepSpec,
    trials: list[dict[str, Any]],
    address: str,
    storage: str | None,
    *,
    shared_fs: bool,
    check_resources: bool = True,
    verbose: bool = False,
) -> list[str]:
    """Connects to the cluster at `address` and says what would keep the sweep from running there: a trial that no
    live node can hold, and (several nodes, no `shared_fs`) every path on this machine a trial would need."""
    from harness.cluster import alive_nodes, cluster_resource_problem, local_path_problems, unreachable
    from harness.launch import ray_init, sweep_storage

    if problem := unreachable(address):
        return [problem]
    ray_init(verbose=verbose, address=address)
    nodes = alive_nodes()
    out = []
    if check_resources and (problem := cluster_resource_problem(spec.resources, nodes)):
        out.append(problem)
    if len(nodes) > 1 and not shared_fs:
        cfg = trials[0]["cfg"]
        found = local_path_problems(cfg, sweep_storage(cfg, storage))
        if found:
            out.append(
                f"the cluster at {address} has {len(nodes)} nodes that share no disk with this machine (else pass "
                "--shared-fs), but a trial would need:\n  - " + "\n  - ".join(found)
            )
    return out


def header_lines(spec: SweepSpec, trials: list[dict[str, Any]]) -> list[str]:
    cfg = trials[0]["cfg"]
    r = spec.resources
    n_points = len({t["point_id"] for t in trials})
    if r.trial_gpus:
        local = f"cluster GPUs / {r.trial_gpus:g}" + (f", at most {r.max_concurrent}" if r.max_concurrent else "")
    else:
        local = f"{r.max_concurrent_for(os.cpu_count() or 1)} on this machine's {os.cpu_count()} CPUs"
    axes = "; ".join(f"{k} {v}" for k, v in spec.axes.items()) or "-"
    gpu = f" + {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else ""
    how = " (Ray Train TorchTrainer)" if r.workers > 1 else " (in-process)"
    tr = cfg["trainer"]
    lines = [
        f"sweep {spec.sweep_id}  (spec {spec.source or spec.name}, profile {spec.profile or '-'}, "
        + f"hash {spec.spec_hash[:16]})",
        f"  {len(trials)} trials = {n_points} points x {len(spec.seeds)} seeds {spec.seeds}; "
        + f"arms: {', '.join(spec.arms) or '-'}; axes: {axes}",
        f"  base: {' '.join(spec.base_overrides()) or '(train.yaml defaults)'}",
        f"  resources per trial: {r.workers} worker(s) x {r.cpus_per_worker:g} CPU{gpu}{how}; "
        + f"trials at a time: {local}",
        f"  objective: {spec.objective.mode} {spec.objective.metric}; MLflow experiment "
        + f"{cfg['tracking']['experiment']!r}; run root {cfg['paths']['run_root']}",
        f"  trainer: epochs {tr['epochs']}, batch {tr['batch_size']}, max_steps_per_epoch "
        + f"{tr.get('max_steps_per_epoch')}, threads {tr.get('threads')}; data {cfg['data']['name']} "
        + f"({cfg['data']['shard_dir']})",
    ]
    return lines


def trial_table(trials: list[dict[str, Any]]) -> list[str]:
    """One row per trial: index, arm, every varying value, seed, point_id, run name."""
    keys: list[str] = []
    for t in trials:
        for k in t["values"]:
            if k not in keys:
                keys.append(k)
    cols = ["#", "arm", *keys, "seed", "point_id", "run_name"]
    rows = [
        [
            str(t["index"]),
            t["arm"] or "-",
            *[_cell(t["values"].get(k, "")) for k in keys],
            str(t["seed"]),
            t["point_id"],
            t["run_name"],
        ]
        for t in trials
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*cols), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows]


def _cell(v: Any) -> str:
    return "null" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def _split_args(argv: list[str], flags: dict[str, bool]) -> tuple[str | None, list[str], dict[str, Any]]:
    """SPEC, overrides, options (flags: name -> takes a value)."""
    spec, overrides, opts = None, [], {}
    it = iter(argv)
    for a in it:
        if a.startswith("--"):
            name, _, val = a[2:].partition("=")
            if name not in flags:
                raise SpecError(f"unknown option --{name} (see --help)")
            if flags[name]:
                opts[name] = val if val else next(it, None)
                if opts[name] is None:
                    raise SpecError(f"--{name} needs a value")
            else:
                opts[name] = True
        elif spec is None and "=" not in a:
            spec = a
        elif "=" in a:
            overrides.append(a)
        else:
            raise SpecError(f"unexpected argument {a!r}: overrides look like key=value")
    return spec, overrides, opts


def _help_exit(argv: list[str]) -> int | None:
    """Prints the usage for no arguments / -h (exit code returned); otherwise sets the offline default and returns
    None."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return None


def validate_main(argv: list[str] | None = None) -> int:
    """`harness validate SPEC.yaml [overrides...] [--no-path-check]`."""
    argv = list(argv or [])
    if (rc := _help_exit(argv)) is not None:
        return rc
    t0 = time.perf_counter()
    try:
        spec_path, overrides, opts = _split_args(argv, {"no-path-check": False, "table": False})
        spec, trials = plan(spec_path, overrides, check_paths=not opts.get("no-path-check"))
    except (SpecError, ConfigValidationError) as e:
        print(f"harness validate: {e}", file=sys.stderr)
        return 2
    print("\n".join(header_lines(spec, trials)))
    if problem := resource_problem(spec):
        print(f"harness validate: warning: {problem}", file=sys.stderr)
    if opts.get("table"):
        print("\n".join(trial_table(trials)))
    print(
        f"OK: {len(trials)} trials expanded, composed and validated in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if (rc := _help_exit(argv)) is not None:
        return rc
    try:
        spec_path, overrides, opts = _split_args(
            argv,
            {
                "address": True,
                "storage": True,
                "shared-fs": False,
                "dry-run": False,
                "num-cpus": True,
                "progress-every": True,
                "verbose": False,
                "no-report": False,
                "no-resource-check": False,
            },
        )
        if spec_path is None:
            raise SpecError("missing SPEC (a sweep YAML, e.g. sweeps/expert_vs_length.yaml)")
        num_cpus = opts.get("num-cpus")
        if num_cpus is not None and (not str(num_cpus).isdigit() or int(num_cpus) < 1):
            raise SpecError(f"--num-cpus {num_cpus!r} must be a positive integer")
        spec, trials = plan(spec_path, overrides)
    except (SpecError, ConfigValidationError) as e:
        print(f"harness sweep: {e}", file=sys.stderr)
        return 2
    address = opts.get("address") or os.environ.get("RAY_ADDRESS")
    local_check = not opts.get("no-resource-check") and not address
    problem = resource_problem(spec, int(num_cpus) if num_cpus else None) if local_check else None
    print("\n".join(header_lines(spec, trials)))
    if opts.get("dry-run"):
        print("\n".join(trial_table(trials)))
        if problem:
            print(f"harness sweep: warning: {problem}", file=sys.stderr)
        return 0
    if problem:
        print(f"harness sweep: {spec.source or spec.name}: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if opts.get("verbose") else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from harness.launch import run_sweep

    if address:
        found = cluster_problems(
            spec,
            trials,
            address,
            opts.get("storage"),
            shared_fs=bool(opts.get("shared-fs")),
            check_resources=not opts.get("no-resource-check"),
            verbose=bool(opts.get("verbose")),
        )
        if found:
            for problem in found:
                print(f"harness sweep: {spec.source or spec.name}: {problem}", file=sys.stderr)
            return 2
    try:
        rc = run_sweep(
            spec,
            trials,
            num_cpus=int(opts["num-cpus"]) if opts.get("num-cpus") else None,
            progress_every_s=float(opts.get("progress-every") or 30.0),
            verbose=bool(opts.get("verbose")),
            address=address,
            storage=opts.get("storage"),
        )
    except KeyboardInterrupt:
        print(f"\nharness sweep: interrupted; run the same command again to resume {spec.sweep_id}", file=sys.stderr)
        return 130
    if not opts.get("no-report"):
        report_after_sweep(spec, trials)
    return rc


def report_after_sweep(spec: SweepSpec, trials: list[dict[str, Any]]) -> bool:
    """Writes the sweep's report (figures, tables, claims) into <run_root>/reports/<sweep_id>/; a failure is printed
    and never changes the sweep's exit code (the runs are in MLflow: `harness report` can be re-run)."""
    from pathlib import Path

    from harness.report_cmd import report_sweeps
    from harness.sweep_runs import tracking_target

    cfg = trials[0]["cfg"]
    try:
        report_sweeps(
            tracking_target(cfg)[0],
            name=spec.name,
            sweep_id=spec.sweep_id,
            run_root=Path(cfg["paths"]["run_root"]).expanduser().resolve(),
        )
        return True
    except Exception as e:  # noqa: BLE001 - the sweep's result stands; say how to retry
        print(
            f"harness sweep: the report was not written ({type(e).__name__}: {e}); retry with "
            f"`harness report --sweep {spec.name} --sweep-id {spec.sweep_id}`",
            file=sys.stderr,
        )
        return False
