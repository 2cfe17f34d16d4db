"""Sweep specs: a small YAML format, its validation, and its expansion into trials with stable identities.

A spec names a base Hydra experiment, fixed overrides, axes (cartesian product), paired **arms**, constraints, seeds,
per-trial resources, the objective and the MLflow experiment (``shared/docs/architecture.md`` §10)::

    name: expert_vs_length
    experiment: demo_mope                  # Hydra experiment preset (harness/configs/experiment/)
    overrides:                             # fixed for every trial (Hydra override paths -> values)
      mope.prompt_len: 6
      trainer.epochs: 1
    axes:                                  # cartesian product
      mope.num_experts: [16, 8, 4, 2]
    arms:                                  # every axis point is run once per arm
      mope: {method: mope}
      vanilla:                             # "=..." is an arithmetic expression over the point's values
        method: vanilla_prompt
        model.vanilla_prompt_len: "=tunable_prompts(mope.num_experts, mope.prompt_len)"
    constraints: ["mope.num_experts * mope.prompt_len <= 256"]
    seeds: [0, 1, 2]                       # or a count: 3 -> [0, 1, 2]
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    objective: {metric: objective, mode: max}   # the task's selection metric (val acc or micro-F1), best so far
    tracking: {experiment: mope-expert-vs-length}
    profiles:                              # named overlays, selected with `profile=NAME` on the command line;
      default: {overrides: {trainer.epochs: 1}}              # `default` applies when none is named
      paper: {experiment: paper_food101_mope_swin_b_k4, overrides: {...}, resources: {...}}

A profile overlays the spec: its `overrides`, `resources`, `objective` and `tracking` are merged key by key, its
`axes` replace the axes they name, other fields replace the spec's. On the command line, ``profile=NAME`` selects a
profile, ``resources.KEY=VALUE`` sets a resource, and every other ``key=value`` is a fixed Hydra override.

Expressions (``"=..."`` values in arms, and constraints) are parsed with :mod:`ast` and evaluated over a whitelist:
numbers, strings, ``+ - * / // % **``, comparisons, ``and/or/not``, ``x if c else y``, tuples/lists for ``in``, and
``min max abs int float round``. Names are dotted override keys (``mope.num_experts``) and ``arm`` (the arm's
name); a key the spec does not set is looked up in the composed base configuration when a lookup is given. Nothing
else runs.

Identities (all stable across runs and machines):

* ``spec_hash``: sha256 of the normalized spec (after the profile and command-line overrides are applied) over
  the fields that define the trials (name, experiment, overrides, axes, arms, constraints, seeds) and the profile
  name. Resources, objective, tracking and description are not part of it: editing them in place resumes the same
  sweep (Tune keeps the resources it started the trials with; use a profile to run the same trials differently).
* ``sweep_id = f"{name}-{spec_hash[:8]}"``; ``point_id`` = hash of the point's sorted overrides (axes + arm values,
  seed excluded); ``trial_key = f"{sweep_id}/{point_id}/{seed}"``; ``run_name = f"{sweep_id}/{label}-s{seed}"``.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import itertools
import json
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mope.config import tunable_prompts_per_layer

SPEC_KEYS = (
    "name",
    "description",
    "experiment",
    "overrides",
    "axes",
    "arms",
    "constraints",
    "seeds",
    "resources",
    "objective",
    "tracking",
    "profiles",
)
PROFILE_KEYS = (
    "description",
    "experiment",
    "overrides",
    "axes",
    "arms",
    "constraints",
    "seeds",
    "resources",
    "objective",
    "tracking",
)
RESERVED_OVERRIDES = ("seed", "run_name", "resume", "experiment")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY_RE = re.compile(r"^[+~]{0,2}[A-Za-z_][A-Za-z0-9_]*(?:[./][A-Za-z_][A-Za-z0-9_]*)*$")


class SpecError(ValueError):
    """A sweep spec is malformed; the message names the field and the fix."""


# -- safe expressions -------------------------------------------------------------------------------------------------
_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_FUNCS: dict[str, Callable[..., Any]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "int": int,
    "float": float,
    "round": round,
    "tunable_prompts": tunable_prompts_per_layer,  # (k, l) -> (k+1)*l+1, MoPE's tunable prompts per layer
}
_MAX_EXPR_LEN = 500


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def expression_names(expr: str) -> list[str]:
    """The dotted names an expression reads (in order of appearance, unique)."""
    tree = _parse(expr)
    out: list[str] = []

    def walk(n: ast.AST) -> None:
        d = _dotted(n) if isinstance(n, (ast.Name, ast.Attribute)) else None
        if d is not None:
            if d not in out:
                out.append(d)
            return
        if isinstance(n, ast.Call):  # the function name is not a variable
            for a in n.args:
                walk(a)
            return
        for c in ast.iter_child_nodes(n):
            walk(c)

    walk(tree)
    return out


def _parse(expr: str) -> ast.Expression:
    if not isinstance(expr, str) or not expr.strip():
        raise SpecError(f"empty expression {expr!r}")
    if len(expr) > _MAX_EXPR_LEN:
        raise SpecError(f"expression longer than {_MAX_EXPR_LEN} characters: {expr[:60]!r}...")
    try:
        return ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise SpecError(f"expression {expr!r} is not valid: {e.msg}") from e


def safe_eval(expr: str, names: Mapping[str, Any], lookup: Callable[[str], Any] | None = None) -> Any:
    """Evaluates a whitelisted arithmetic/boolean expression.

    Args:
        expr: e.g. ``"tunable_prompts(mope.num_experts, mope.prompt_len)"`` or ``"2 * mope.prompt_len + 1"``.
        names: values of dotted names (``{"mope.num_experts": 2, "mope.prompt_len": 6}``).
        lookup: called for a name not in `names` (e.g. the composed base config); raises KeyError when unknown.

    Raises:
        SpecError: a construct outside the whitelist, an unknown name, or an evaluation error (named).
    """
    tree = _parse(expr)

    def ev(n: ast.AST) -> Any:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant):
            if n.value is None or isinstance(n.value, (bool, int, float, str)):
                return n.value
            raise SpecError(f"{expr!r}: constant {n.value!r} is not allowed")
        if isinstance(n, (ast.Name, ast.Attribute)):
            key = _dotted(n)
            if key is None:
                raise SpecError(f"{expr!r}: only dotted names like mope.num_experts may be read")
            if key in names:
                return names[key]
            if key in ("true", "false", "null"):
                return {"true": True, "false": False, "null": None}[key]
            if lookup is not None:
                try:
                    return lookup(key)
                except KeyError:
                    pass
            raise SpecError(
                f"{expr!r}: unknown name {key!r}; set it in the spec's `overrides`, `axes` or arm "
                f"(known here: {sorted(names)})"
            )
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            a, b = ev(n.left), ev(n.right)
            if isinstance(n.op, ast.Pow) and (not isinstance(b, (int, float)) or abs(b) > 64):
                raise SpecError(f"{expr!r}: exponent {b!r} is not allowed (|exponent| <= 64)")
            return _BINOPS[type(n.op)](a, b)
        if isinstance(n, ast.UnaryOp):
            v = ev(n.operand)
            if isinstance(n.op, ast.USub):
                return -v
            if isinstance(n.op, ast.UAdd):
                return +v
            if isinstance(n.op, ast.Not):
                return not v
        if isinstance(n, ast.BoolOp):
            if isinstance(n.op, ast.And):
                v: Any = True
                for x in n.values:
                    v = ev(x)
                    if not v:
                        return v
                return v
            v = False
            for x in n.values:
                v = ev(x)
                if v:
                    return v
            return v
        if isinstance(n, ast.Compare):
            left = ev(n.left)
            for op, right_node in zip(n.ops, n.comparators):
                if type(op) not in _CMPOPS:
                    raise SpecError(f"{expr!r}: comparison {type(op).__name__} is not allowed")
                right = ev(right_node)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(n, ast.IfExp):
            return ev(n.body) if ev(n.test) else ev(n.orelse)
        if isinstance(n, (ast.Tuple, ast.List)):
            return tuple(ev(x) for x in n.elts)
        if isinstance(n, ast.Call):
            if not isinstance(n.func, ast.Name) or n.func.id not in _FUNCS or n.keywords:
                raise SpecError(f"{expr!r}: only calls to {sorted(_FUNCS)} with positional arguments are allowed")
            return _FUNCS[n.func.id](*[ev(a) for a in n.args])
        raise SpecError(f"{expr!r}: {type(n).__name__} is not allowed in sweep expressions")

    try:
        return ev(tree)
    except SpecError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        read = [k for k in expression_names(expr) if k in names]
        vals = ", ".join(f"{k}={names[k]!r} ({type(names[k]).__name__})" for k in read)
        hint = (
            f" with {vals}: check the type of each value it reads (numbers for arithmetic) in the spec's axes / "
            "overrides"
            if vals
            else ""
        )
        raise SpecError(f"{expr!r}: {type(e).__name__}: {e}{hint}") from e


def is_expression(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("=")


# -- Hydra override rendering -----------------------------------------------------------------------------------------
_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./:@+-]*$")


def hydra_value(v: Any) -> str:
    """A Python value rendered in Hydra's override grammar (quoted where needed)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return {True: "nan"}.get(math.isnan(v), "inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, str):
        if _PLAIN.match(v) and v.lower() not in ("null", "true", "false", "nan", "inf"):
            return v
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    raise SpecError(f"value {v!r} of type {type(v).__name__} cannot be a Hydra override")


def override(key: str, value: Any) -> str:
    return f"{key}={hydra_value(value)}"


def parse_override(s: str) -> tuple[str, Any]:
    """``"a.b=3"`` → ``("a.b", 3)`` (the value YAML-parsed, as Hydra would type it)."""
    import yaml

    if "=" not in s:
        raise SpecError(f"override {s!r} must look like key=value")
    k, v = s.split("=", 1)
    k = k.strip()
    try:
        val = yaml.safe_load(v) if v.strip() else ""
    except yaml.YAMLError:
        val = v
    if isinstance(val, (dict, list)) or val is None or isinstance(val, (bool, int, float, str)):
        return k, val
    return k, v  # dates etc.: keep the text


# -- the spec ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resources:
    """Per-trial resources. workers > 1 runs the trial through Ray Train's TorchTrainer (one driver + N workers)."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent: int | None = None  # None: derived from the cluster's resources

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise SpecError(f"resources.workers={self.workers!r} must be an integer >= 1")
        if not isinstance(self.cpus_per_worker, (int, float)) or self.cpus_per_worker <= 0:
            raise SpecError(f"resources.cpus_per_worker={self.cpus_per_worker!r} must be > 0")
        g = self.gpus_per_worker
        if not isinstance(g, (int, float)) or g < 0 or (g > 1 and g != int(g)):
            raise SpecError(f"resources.gpus_per_worker={g!r} must be >= 0; fractions only below 1 (e.g. 0.25)")
        if self.max_concurrent is not None and (not isinstance(self.max_concurrent, int) or self.max_concurrent < 1):
            raise SpecError(f"resources.max_concurrent={self.max_concurrent!r} must be a positive integer or null")

    @property
    def trial_cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    @property
    def trial_gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    def unschedulable_reason(self, cpus: float, gpus: float, where: str = "this machine") -> str | None:
        """Why one trial can never be scheduled on `cpus` CPUs and `gpus` GPUs (all of a trial's workers are placed
        at once), or None when it fits. The message names the resources and the fixes."""
        short = []
        if self.trial_cpus > cpus + 1e-9:
            short.append(
                f"{self.trial_cpus:g} CPUs ({self.workers} worker(s) x {self.cpus_per_worker:g}) but "
                f"{where} has {cpus:g}"
            )
        if self.trial_gpus > gpus + 1e-9:
            short.append(
                f"{self.trial_gpus:g} GPU(s) ({self.workers} worker(s) x {self.gpus_per_worker:g}) but "
                f"{where} has {gpus:g}"
            )
        if not short:
            return None
        return (
            "resources: a trial needs " + " and ".join(short) + ", so it can never be scheduled here (Ray would "
            "wait forever). Fix: lower resources.workers / resources.cpus_per_worker / resources.gpus_per_worker "
            "(e.g. `resources.gpus_per_worker=0 resources.cpus_per_worker=1` on the command line), choose a "
            "profile sized for this machine, or run on a cluster that has them (RAY_ADDRESS=head:port; "
            "--no-resource-check skips this check)"
        )

    def max_concurrent_for(self, cluster_cpus: float, cluster_gpus: float = 0.0) -> int:
        """How many trials fit at once (gang scheduling: all of a trial's workers at the same time)."""
        n = int(cluster_cpus // self.trial_cpus) if self.trial_cpus else 10**6
        if self.trial_gpus:
            n = min(n, int(round(cluster_gpus / self.trial_gpus, 6)))
        n = max(1, n)
        return min(n, self.max_concurrent) if self.max_concurrent else n


@dataclass(frozen=True)
class Objective:
    """What Tune ranks trials by. ``objective`` (the default) is the worker's selection metric, best so far:
    validation accuracy for single-label tasks, validation micro-F1 for multi-label ones (any reported metric,
    e.g. ``val/acc_best``, may be named instead)."""

    metric: str = "objective"
    mode: str = "max"

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise SpecError(f"objective.mode={self.mode!r}: allowed values max, min")
        if not isinstance(self.metric, str) or not self.metric:
            raise SpecError("objective.metric must be a metric name such as val/acc_best")


@dataclass(frozen=True)
class Trial:
    """One trial: a point (axes × arm) and a seed, with everything needed to compose and identify it."""

    index: int
    sweep_id: str
    point_id: str
    seed: int
    arm: str | None
    values: dict[str, Any]  # axis + arm values (resolved), the point's identity
    overrides: list[str]  # the full Hydra override list, in order
    label: str
    run_name: str

    @property
    def trial_key(self) -> str:
        return f"{self.sweep_id}/{self.point_id}/{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "sweep_id": self.sweep_id,
            "point_id": self.point_id,
            "seed": self.seed,
            "arm": self.arm,
            "values": dict(self.values),
            "overrides": list(self.overrides),
            "label": self.label,
            "run_name": self.run_name,
            "trial_key": self.trial_key,
        }


@dataclass
class SweepSpec:
    name: str
    experiment: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    constraints: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    resources: Resources = field(default_factory=Resources)
    objective: Objective = field(default_factory=Objective)
    tracking: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    profile: str | None = None
    profiles: tuple[str, ...] = ()
    source: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # the YAML as loaded (for the MLflow artifact)

    # -- identity -----------------------------------------------------------------------------------------------------
    def normalized(self) -> dict[str, Any]:
        """The fields that define the trials, in a canonical form (what `spec_hash` hashes)."""
        return {
            "name": self.name,
            "experiment": self.experiment,
            "overrides": {k: self.overrides[k] for k in sorted(self.overrides)},
            "axes": {k: list(self.axes[k]) for k in sorted(self.axes)},
            "arms": {a: {k: v[k] for k in sorted(v)} for a, v in sorted(self.arms.items())},
            "constraints": list(self.constraints),
            "seeds": list(self.seeds),
            "profile": self.profile,
        }

    @property
    def spec_hash(self) -> str:
        blob = json.dumps(self.normalized(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def sweep_id(self) -> str:
        return f"{self.name}-{self.spec_hash[:8]}"

    @property
    def mlflow_experiment(self) -> str | None:
        return self.tracking.get("experiment")

    def base_overrides(self) -> list[str]:
        """Experiment + fixed overrides (what every trial shares); expressions are not allowed here."""
        out = [override("experiment", self.experiment)] if self.experiment else []
        return out + [override(k, v) for k, v in self.overrides.items()]

    # -- expansion ----------------------------------------------------------------------------------------------------
    def expand(self, lookup: Callable[[str], Any] | None = None) -> list[Trial]:
        """All trials: for each axis point (cartesian product, in axis order) × arm × seed.

        Args:
            lookup: resolves a dotted name an expression reads that the spec does not set (e.g. from the composed
                base config); raises KeyError when unknown.

        Raises:
            SpecError: an expression fails, or two trials would be identical (the duplicates are named).
        """
        sweep_id = self.sweep_id
        keys = list(self.axes)
        arms: list[tuple[str | None, dict[str, Any]]] = list(self.arms.items()) or [(None, {})]
        points: list[tuple[str | None, dict[str, Any]]] = []
        for combo in itertools.product(*[self.axes[k] for k in keys]):
            axis_vals = dict(zip(keys, combo))
            for arm, arm_vals in arms:
                ns: dict[str, Any] = {**self.overrides, **axis_vals}
                if arm is not None:
                    ns["arm"] = arm
                values = dict(axis_vals)
                for k, v in arm_vals.items():
                    if is_expression(v):
                        try:
                            v = safe_eval(v[1:], ns, lookup)
                        except SpecError as e:
                            raise SpecError(f"arms.{arm}.{k}: {e}") from e
                    ns[k] = v
                    values[k] = v
                if all(self._constraint(c, ns, lookup) for c in self.constraints):
                    points.append((arm, values))
        if not points:
            raise SpecError(
                f"spec {self.name!r}: the constraints {self.constraints} exclude every point; relax them "
                f"or change the axes"
            )

        def short(k: str) -> str:
            return k.split(".")[-1].split("/")[-1]

        derived = {k for _, vals in arms for k, v in vals.items() if is_expression(v)}

        def label_of(arm: str | None, values: dict[str, Any]) -> str:
            shown = keys + [k for k in values if k in derived]  # axes, then values computed by the arm
            parts = ([arm] if arm else []) + [f"{short(k)}{_label_value(values[k])}" for k in shown]
            if not keys and not arm:
                parts = ["point"]
            return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join(parts))[:100]

        pids = [_point_id(v) for _, v in points]
        seen: dict[str, int] = {}
        for i, pid in enumerate(pids):
            if pid in seen:
                j = seen[pid]
                raise SpecError(
                    f"spec {self.name!r}: points {points[j]} and {points[i]} have the same overrides "
                    f"(duplicate trials); make the arms differ or drop an axis value"
                )
            seen[pid] = i
        labels = [label_of(a, v) for a, v in points]
        if len(set(labels)) < len(labels):
            labels = [f"{lab}-{pid[:6]}" for lab, pid in zip(labels, pids)]

        base = self.base_overrides()
        trials: list[Trial] = []
        for (arm, values), pid, lab in zip(points, pids, labels):
            for seed in self.seeds:
                run_name = f"{sweep_id}/{lab}-s{seed}"
                ovr = (
                    base
                    + [override(k, v) for k, v in values.items()]
                    + [override("seed", seed), override("run_name", run_name)]
                )
                trials.append(
                    Trial(
                        index=len(trials),
                        sweep_id=sweep_id,
                        point_id=pid,
                        seed=int(seed),
                        arm=arm,
                        values=dict(values),
                        overrides=ovr,
                        label=lab,
                        run_name=run_name,
                    )
                )
        return trials

    def _constraint(self, expr: str, ns: dict[str, Any], lookup) -> bool:
        try:
            v = safe_eval(expr, ns, lookup)
        except SpecError as e:
            raise SpecError(f"constraints: {e}") from e
        if not isinstance(v, bool):
            raise SpecError(f"constraint {expr!r} must be a comparison (true/false), got {v!r}")
        return v

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sweep_id": self.sweep_id,
            "spec_hash": self.spec_hash,
            "profile": self.profile,
            "experiment": self.experiment,
            "seeds": list(self.seeds),
            "axes": {k: list(v) for k, v in self.axes.items()},
            "arms": list(self.arms),
            "resources": self.resources.__dict__,
            "objective": self.objective.__dict__,
        }


def _label_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if v is None:
        return "null"
    return str(v)


def _point_id(values: Mapping[str, Any]) -> str:
    """Hash of the point's sorted override strings (seed excluded): stable whatever the key order."""
    items = sorted(override(k, v) for k, v in values.items())
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:12]


# -- loading ----------------------------------------------------------------------------------------------------------
def _as_mapping(value: Any, where: str) -> dict[str, Any]:
    """Overrides as a mapping; a list of ``key=value`` strings is accepted too."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            out[_check_key(str(k), where)] = v
        return out
    if isinstance(value, list):
        out = {}
        for s in value:
            if not isinstance(s, str):
                raise SpecError(f"{where}: entries must be 'key=value' strings, got {s!r}")
            k, v = parse_override(s)
            if k in out:
                raise SpecError(f"{where}: {k!r} is given twice")
            out[_check_key(k, where)] = v
        return out
    raise SpecError(f"{where} must be a mapping of override keys to values (or a list of key=value strings)")


def _check_key(k: str, where: str) -> str:
    if not _KEY_RE.match(k):
        raise SpecError(f"{where}: {k!r} is not a Hydra override key (like mope.num_experts or data)")
    if k.lstrip("+~") in RESERVED_OVERRIDES:
        hint = {"seed": "use `seeds:`", "experiment": "use `experiment:`"}.get(k.lstrip("+~"), "set by the sweep")
        raise SpecError(f"{where}: {k!r} is reserved ({hint})")
    return k


def _seeds(v: Any) -> list[int]:
    if isinstance(v, bool):
        raise SpecError(f"seeds={v!r} must be a list of integers or a count")
    if isinstance(v, int):
        if v < 1:
            raise SpecError(f"seeds={v} must be >= 1 (a count) or a list of integers")
        return list(range(v))
    if isinstance(v, list) and v and all(isinstance(s, int) and not isinstance(s, bool) for s in v):
        if len(set(v)) != len(v):
            raise SpecError(f"seeds={v} has duplicates")
        return list(v)
    raise SpecError(f"seeds={v!r} must be a non-empty list of integers or a count")


def _axes(v: Any) -> dict[str, list[Any]]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise SpecError("axes must be a mapping of override keys to lists of values")
    out: dict[str, list[Any]] = {}
    for k, vals in v.items():
        k = _check_key(str(k), "axes")
        if not isinstance(vals, list) or not vals:
            raise SpecError(f"axes.{k} must be a non-empty list of values, got {vals!r}")
        if any(is_expression(x) for x in vals):
            raise SpecError(f"axes.{k}: expressions ('=...') are only allowed in arms")
        if len({json.dumps(x, sort_keys=True, default=str) for x in vals}) != len(vals):
            raise SpecError(f"axes.{k} has duplicate values: {vals}")
        out[k] = list(vals)
    return out


def _arms(v: Any, axes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if v is None:
        return {}
    if not isinstance(v, Mapping) or not v:
        raise SpecError("arms must be a non-empty mapping of arm names to override mappings")
    out = {}
    for name, ovr in v.items():
        name = str(name)
        if not _NAME_RE.match(name):
            raise SpecError(f"arms: arm name {name!r} must match {_NAME_RE.pattern}")
        m = _as_mapping(ovr or {}, f"arms.{name}")
        clash = sorted(set(m) & set(axes))
        if clash:
            raise SpecError(f"arms.{name} sets {clash}, which are axes; an arm may only set other keys")
        for x in m.values():
            if is_expression(x):
                _parse(x[1:])  # syntax errors now, not at expansion
        out[name] = m
    return out


def build_spec(
    data: Mapping[str, Any],
    *,
    profile: str | None = None,
    extra_overrides: list[str] | None = None,
    source: str | None = None,
) -> SweepSpec:
    """A :class:`SweepSpec` from a loaded YAML mapping, with `profile` and command-line overrides applied."""
    if not isinstance(data, Mapping):
        raise SpecError("a sweep spec must be a YAML mapping")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise SpecError(f"unknown top-level key(s) {unknown}; allowed: {list(SPEC_KEYS)}")
    raw = copy.deepcopy(dict(data))
    d = copy.deepcopy(dict(data))
    profiles = d.pop("profiles", None) or {}
    if not isinstance(profiles, Mapping):
        raise SpecError("profiles must be a mapping of profile names to overlays")
    if profile is None and "default" in profiles:
        profile = "default"  # the embedded-default sizing; `profile=paper` etc. replace it
    if profile is not None:
        if profile not in profiles:
            raise SpecError(f"profile={profile!r} is not defined in this spec; available: {sorted(profiles)}")
        overlay = profiles[profile] or {}
        bad = sorted(set(overlay) - set(PROFILE_KEYS))
        if bad:
            raise SpecError(f"profiles.{profile}: unknown key(s) {bad}; allowed: {list(PROFILE_KEYS)}")
        for k, v in overlay.items():
            if k in ("overrides", "resources", "tracking", "objective"):  # merged key by key
                base = _as_mapping(d.get(k), k) if k == "overrides" else dict(d.get(k) or {})
                add = _as_mapping(v, f"profiles.{profile}.{k}") if k == "overrides" else dict(v or {})
                d[k] = {**base, **add}
            elif k == "axes":  # replaced axis by axis
                d[k] = {**(d.get(k) or {}), **(v or {})}
            else:
                d[k] = copy.deepcopy(v)
    name = d.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpecError(f"name={name!r} must be a short identifier matching {_NAME_RE.pattern}")
    experiment = d.get("experiment")
    if experiment is not None and not (isinstance(experiment, str) and _NAME_RE.match(experiment)):
        raise SpecError(f"experiment={experiment!r} must name a preset in harness/configs/experiment/")
    overrides = _as_mapping(d.get("overrides"), "overrides")
    for k, v in overrides.items():
        if is_expression(v):
            raise SpecError(f"overrides.{k}: expressions ('=...') are only allowed in arms")
    axes = _axes(d.get("axes"))
    res_cli: dict[str, Any] = {}
    for ov in extra_overrides or []:
        k, v = parse_override(ov)
        if k.startswith("resources."):  # a spec field, not a Hydra key (not part of the identity)
            res_cli[k.split(".", 1)[1]] = v
            continue
        k = _check_key(k, "command-line override")
        if k in axes:
            raise SpecError(f"command-line override {ov!r} sets an axis of the spec; edit the spec's axes instead")
        overrides[k] = v
    clash = sorted(set(overrides) & set(axes))
    if clash:
        raise SpecError(f"{clash} are both fixed overrides and axes; keep each key in one place")
    arms = _arms(d.get("arms"), axes)
    constraints = d.get("constraints") or []
    if not isinstance(constraints, list) or not all(isinstance(c, str) for c in constraints):
        raise SpecError("constraints must be a list of expression strings")
    for c in constraints:
        _parse(c)
    res = {**(d.get("resources") or {}), **res_cli}
    if not isinstance(res, Mapping):
        raise SpecError("resources must be a mapping (workers, cpus_per_worker, gpus_per_worker, max_concurrent)")
    bad = sorted(set(res) - {"workers", "cpus_per_worker", "gpus_per_worker", "max_concurrent"})
    if bad:
        raise SpecError(
            f"resources: unknown key(s) {bad}; allowed: workers, cpus_per_worker, gpus_per_worker, max_concurrent"
        )
    obj = d.get("objective") or {}
    if not isinstance(obj, Mapping) or set(obj) - {"metric", "mode"}:
        raise SpecError("objective must be a mapping with metric and mode")
    tracking = dict(d.get("tracking") or {})
    if set(tracking) - {"experiment"}:
        raise SpecError(
            f"tracking: unknown key(s) {sorted(set(tracking) - {'experiment'})}; allowed: experiment "
            f"(the URI comes from MLFLOW_TRACKING_URI or tracking.uri)"
        )
    desc = d.get("description") or ""
    return SweepSpec(
        name=name,
        experiment=experiment,
        overrides=overrides,
        axes=axes,
        arms=arms,
        constraints=list(constraints),
        seeds=_seeds(d.get("seeds", [0])),
        resources=Resources(**res),
        objective=Objective(**obj),
        tracking=tracking,
        description=str(desc).strip(),
        profile=profile,
        profiles=tuple(profiles),
        source=source,
        raw=raw,
    )


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Loads a spec (YAML safe-load). ``profile=NAME`` in `overrides` selects a profile; the other ``key=value``
    entries become fixed overrides (they take part in the spec hash, so they define another sweep)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"sweep spec {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))  # safe: no Python tags, nothing is constructed
    except UnicodeDecodeError as e:
        raise SpecError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save the spec as UTF-8") from None
    except yaml.constructor.ConstructorError as e:
        mark = f" at line {e.problem_mark.line + 1}" if e.problem_mark else ""
        raise SpecError(
            f"{p}: tag refused{mark} ({e.problem}): sweep specs are loaded with yaml.safe_load, which "
            "builds no Python objects; write plain values instead"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(
            f"{where}: not valid YAML ({problem}); fix the syntax at that line (indentation, quotes, a missing ':')"
        ) from None
    profile, extra = None, []
    for o in overrides:
        if o.startswith("profile="):
            profile = o.split("=", 1)[1] or None
        else:
            extra.append(o)
    try:
        return build_spec(data or {}, profile=profile, extra_overrides=extra, source=str(p.resolve()))
    except SpecError as e:
        raise SpecError(f"{p}: {e}") from e


def config_lookup(cfg: Mapping[str, Any]) -> Callable[[str], Any]:
    """A `lookup` for :meth:`SweepSpec.expand` reading dotted keys of a composed config (group choices by name)."""

    def lookup(key: str) -> Any:
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise KeyError(key)
            node = node[part]
        if isinstance(node, Mapping) and "name" in node and "." not in key:
            return node["name"]  # a config group (method, data, ...): compare by its name
        return node

    return lookup


__all__ = [
    "Objective",
    "Resources",
    "SpecError",
    "SweepSpec",
    "Trial",
    "build_spec",
    "config_lookup",
    "expression_names",
    "hydra_value",
    "load_spec",
    "override",
    "parse_override",
    "safe_eval",
]
