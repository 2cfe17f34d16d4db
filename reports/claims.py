"""The paper's claims, each decided from a sweep's runs by a stated rule (never written by hand).

Every claim the sweep's data can speak to gets one or more rows (one per comparison: a stratum of the other axes, a
shot count, a routing variant), each with its statistic, numbers, n and a verdict; the claim's verdict combines its
rows: ``supported`` when every row is, ``not supported`` when any row is, else ``inconclusive``. Differences and their
95% intervals come from :func:`reports.stats.diff` (paired by seed, Student t). With 3 seeds most intervals are wide
and ``inconclusive`` is the honest answer; the report says so rather than overclaim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from reports.data import SweepData, add_derived, by_seed, fmt_value, groups, is_missing
from reports.stats import Diff, cv, diff, spearman

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
EQUIVALENCE_MARGIN = 0.01  # |frozen − learned| below 1 point of the metric counts as "the same"
IMPORTANCE_TAIL = 0.25  # Fig. 7 claim: importance averaged over the last quarter of the logged steps


@dataclass
class ClaimRow:
    comparison: str
    statistic: str
    verdict: str
    n: int
    notes: list[str] = field(default_factory=list)
    diff: dict[str, Any] | None = None  # the deciding difference: mean, t interval, bootstrap interval, paired, n


@dataclass
class Claim:
    key: str
    text: str  # the paper's claim
    source: str  # where the paper makes it
    rule: str  # how the verdict is decided
    rows: list[ClaimRow]

    @property
    def verdict(self) -> str:
        vs = [r.verdict for r in self.rows]
        if not vs:
            return INCONCLUSIVE
        if any(v == NOT_SUPPORTED for v in vs):
            return NOT_SUPPORTED
        return SUPPORTED if all(v == SUPPORTED for v in vs) else INCONCLUSIVE


def evaluate_claims(data: SweepData, metric: str, *, equivalence_margin: float = EQUIVALENCE_MARGIN) -> list[Claim]:
    """Every claim this sweep can speak to, in the paper's order."""
    runs = add_derived(data.runs)
    ok = runs[(runs["status"] == "FINISHED")]
    if metric in ok:
        ok = ok[pd.to_numeric(ok[metric], errors="coerce").notna()]
    else:
        ok = ok.iloc[0:0]
    strata_keys = [k for k in data.axes if k in runs]  # spec axes only: arm-set keys differ between arms by design
    out: list[Claim] = []
    for fn in (
        _expert_scaling,
        _length_scaling,
        _matched_count,
        _shots,
        _dense_vs_top1,
        _keys,
        _importance,
        _ablation,
        _ris,
    ):
        c = fn(ok, metric, strata_keys, data=data, margin=equivalence_margin)
        if c is not None and c.rows:
            out.append(c)
    return out


# -- helpers ----------------------------------------------------------------------------------------------------------
def _method(df: pd.DataFrame, name: str) -> pd.DataFrame:
    return df[df["method.name"] == name] if "method.name" in df else df.iloc[0:0]


def _distinct(df: pd.DataFrame, col: str) -> list[Any]:
    if col not in df:
        return []
    vals = [v for v in df[col].tolist() if not is_missing(v)]
    return sorted(set(vals), key=lambda v: (str(type(v)), v))


def _strata(df: pd.DataFrame, keys: list[str], exclude: set[str]):
    """Groups of runs that agree on every point key not in `exclude` (one group when nothing else varies)."""
    by = [k for k in keys if k not in exclude and k in df and len(_distinct(df, k)) > 1]
    for vals, g in groups(df, by):
        label = ", ".join(f"{k}={fmt_value(v)}" for k, v in vals.items())
        yield label, g


def _prefix(stratum: str, text: str) -> str:
    return f"{stratum}: {text}" if stratum else text


def _collapse_notes(*frames: pd.DataFrame) -> list[str]:
    n = sum(int(f["collapsed"].fillna(False).astype(bool).sum()) for f in frames if "collapsed" in f)
    return (
        [f"{n} run(s) collapsed to one predicted class (val/pred_class_frac_max ≥ 0.99): not a learnt result"]
        if n
        else []
    )


def _ahead(d: Diff) -> str:
    """Verdict of 'A ahead of B' from the interval of A − B."""
    if d.above_zero:
        return SUPPORTED
    if d.below_zero:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def _versus(
    comparison: str, a_name: str, a_runs: pd.DataFrame, b_name: str, b_runs: pd.DataFrame, metric: str
) -> ClaimRow:
    """A row for the claim 'A ahead of B': the means, A − B paired by seed with its interval, the verdict."""
    a, b = by_seed(a_runs, metric), by_seed(b_runs, metric)
    d = diff(a, b)
    return ClaimRow(
        comparison,
        f"{a_name} {_means(a)} vs {b_name} {_means(b)}; Δ = {d.text()}",
        _ahead(d),
        d.n,
        _collapse_notes(a_runs, b_runs),
        d.as_dict(),
    )


def _num(v: Any) -> str:
    return "–" if is_missing(v) else f"{v:.3f}"


def _means(d: dict[int, float]) -> str:
    return _num(sum(d.values()) / len(d)) if d else "–"


# -- (1) expert scaling -----------------------------------------------------------------------------------------------
def _expert_scaling(ok, metric, keys, **_) -> Claim | None:
    mope = _method(ok, "mope")
    rows = []
    for stratum, g in _strata(mope, keys, {"mope.num_experts", "model.vanilla_prompt_len", "method.name"}):
        ks = _distinct(g, "mope.num_experts")
        if len(ks) < 2:
            continue
        per_k = {k: by_seed(g[g["mope.num_experts"] == k], metric) for k in ks}
        total = diff(per_k[ks[-1]], per_k[ks[0]])
        steps = [(a, b, diff(per_k[b], per_k[a])) for a, b in zip(ks, ks[1:])]
        rho, p = spearman([float(k) for k in g["mope.num_experts"]], [float(v) for v in g[metric]])
        drops = [f"k={a}→{b}" for a, b, d in steps if d.below_zero]
        if drops:
            verdict = NOT_SUPPORTED
        elif total.above_zero:
            verdict = SUPPORTED
        elif total.below_zero:
            verdict = NOT_SUPPORTED
        else:
            verdict = INCONCLUSIVE
        stat = (
            f"Δ(k={ks[-1]} − k={ks[0]}) = {total.text()}; means "
            + " / ".join(f"k={k}: {_means(per_k[k])}" for k in ks)
            + "; steps "
            + ", ".join(
                f"k={a}→{b} {d.mean:+.3f}" + (" (significant drop)" if d.below_zero else "") for a, b, d in steps
            )
            + f"; Spearman ρ(k, {metric}) = {_num(rho)} (p = {_num(p)}, {len(g)} runs)"
        )
        rows.append(
            ClaimRow(
                _prefix(stratum, f"MoPE, k = {', '.join(map(str, ks))}"),
                stat,
                verdict,
                total.n,
                _collapse_notes(g) + ([f"significant drop at {', '.join(drops)}"] if drops else []),
                total.as_dict(),
            )
        )
    return Claim(
        "expert_scaling",
        "Expert scaling improves with k and does not deteriorate as k grows",
        "Fig. 4 (§4.3)",
        "supported: the 95% CI of metric(largest k) − metric(smallest k), paired by seed, lies above 0 and no "
        "step between neighbouring k has a CI below 0; not supported: that CI lies below 0 or some step does; "
        "otherwise inconclusive. Spearman ρ over all runs is shown for context.",
        rows,
    )


# -- (2) length scaling -----------------------------------------------------------------------------------------------
def _length_scaling(ok, metric, keys, **_) -> Claim | None:
    excl = {"mope.num_experts", "model.vanilla_prompt_len", "method.name"}
    rows = []
    for stratum, g in _strata(ok, keys, excl):
        van, mope = _method(g, "vanilla_prompt"), _method(g, "mope")
        Ls = _distinct(van, "tunable_prompts")
        if len(Ls) < 2:
            continue
        per_L = {L: by_seed(van[van["tunable_prompts"] == L], metric) for L in Ls}
        gain_v = _seed_diff(per_L[Ls[-1]], per_L[Ls[0]])
        d_v = diff(per_L[Ls[-1]], per_L[Ls[0]])
        last = diff(per_L[Ls[-1]], per_L[Ls[-2]])
        stat = f"vanilla Δ(L={Ls[-1]:g} − L={Ls[0]:g}) = {d_v.text()}; last step L={Ls[-2]:g}→{Ls[-1]:g} {last.text()}"
        did = None
        cm = _distinct(mope, "tunable_prompts")
        lo_c = Ls[0] if Ls[0] in cm else (cm[0] if cm else None)
        hi_c = Ls[-1] if Ls[-1] in cm else (cm[-1] if cm else None)
        if lo_c is not None and hi_c is not None and lo_c != hi_c:
            m_lo = by_seed(mope[mope["tunable_prompts"] == lo_c], metric)
            m_hi = by_seed(mope[mope["tunable_prompts"] == hi_c], metric)
            did = diff(_seed_diff(m_hi, m_lo), gain_v)
            stat += f"; MoPE gain over the same counts ({lo_c:g}→{hi_c:g}) minus vanilla's = {did.text()}"
        if d_v.below_zero:
            verdict = SUPPORTED  # deteriorates
        elif did is not None and did.above_zero:
            verdict = SUPPORTED  # saturates relative to expert scaling
        elif (did is not None and did.below_zero) or (last.above_zero and not (did is not None and did.above_zero)):
            verdict = NOT_SUPPORTED
        else:
            verdict = INCONCLUSIVE
        rows.append(
            ClaimRow(
                _prefix(stratum, f"vanilla prompt, L = {', '.join(f'{L:g}' for L in Ls)}"),
                stat,
                verdict,
                d_v.n,
                _collapse_notes(van, mope),
                (did or d_v).as_dict(),
            )
        )
    return Claim(
        "length_scaling",
        "Length scaling saturates or deteriorates at the same tunable count",
        "Fig. 4 (§4.3)",
        "supported: the vanilla prompt's Δ(largest L − smallest L) has a 95% CI below 0 (deteriorates), or MoPE's "
        "gain over the same tunable counts exceeds vanilla's (difference-in-differences CI above 0: saturates while "
        "experts keep scaling); not supported: vanilla gains more than MoPE (CI below 0), or vanilla's last step "
        "still improves significantly; otherwise inconclusive.",
        rows,
    )


def _seed_diff(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    return {s: a[s] - b[s] for s in set(a) & set(b)}


# -- (2b) MoPE vs vanilla at matched tunable counts -------------------------------------------------------------------
def _matched_count(ok, metric, keys, **_) -> Claim | None:
    excl = {"mope.num_experts", "model.vanilla_prompt_len", "method.name"}
    rows = []
    for stratum, g in _strata(ok, keys, excl | {"data.shots"}):
        van, mope = _method(g, "vanilla_prompt"), _method(g, "mope")
        counts = sorted(set(_distinct(van, "tunable_prompts")) & set(_distinct(mope, "tunable_prompts")))
        if "data.shots" in g and len(_distinct(g, "data.shots")) > 1:
            continue  # the data-scaling claim compares these per shot count
        for c in counts:
            mv, vv = mope[mope["tunable_prompts"] == c], van[van["tunable_prompts"] == c]
            k = _distinct(mv, "mope.num_experts")
            label = f"{c:g} tunable prompts (MoPE k={fmt_value(k[0]) if k else '?'} vs vanilla L={c:g})"
            rows.append(_versus(_prefix(stratum, label), "MoPE", mv, "vanilla", vv, metric))
    return Claim(
        "matched_count",
        "MoPE is ahead of a vanilla prompt with the same number of tunable prompts",
        "Fig. 4 (§4.3)",
        "per tunable count: supported when the 95% CI of MoPE − vanilla (paired by seed) lies above 0, not "
        "supported when it lies below 0, else inconclusive; the claim is supported only at every count.",
        rows,
    )


# -- (3) data scaling -------------------------------------------------------------------------------------------------
def _shots(ok, metric, keys, **_) -> Claim | None:
    if (
        "data.shots" not in ok
        or len(_distinct(ok, "data.shots") + ([None] if ok["data.shots"].isna().any() else [])) < 2
    ):
        return None
    rows = []
    excl = {"mope.num_experts", "model.vanilla_prompt_len", "method.name", "data.shots"}
    for stratum, g in _strata(ok, keys, excl):
        van, mope = _method(g, "vanilla_prompt"), _method(g, "mope")
        if van.empty or mope.empty:
            continue
        shots = _distinct(g, "data.shots") + ([None] if g["data.shots"].isna().any() else [])
        for s in shots:
            ms = mope[mope["data.shots"].isna()] if s is None else mope[mope["data.shots"] == s]
            vs = van[van["data.shots"].isna()] if s is None else van[van["data.shots"] == s]
            if not by_seed(ms, metric) or not by_seed(vs, metric):
                continue
            rows.append(
                _versus(_prefix(stratum, f"shots = {'full' if s is None else s}"), "MoPE", ms, "vanilla", vs, metric)
            )
    return Claim(
        "data_scaling",
        "MoPE is at least as good as the vanilla prompt at every shot count",
        "Fig. 5 (§4.4)",
        "per shot count: supported when the 95% CI of MoPE − vanilla (paired by seed) lies above 0, not supported "
        "when it lies below 0, else inconclusive; the claim is supported only at every shot count.",
        rows,
    )


# -- (4) dense vs top-1 -----------------------------------------------------------------------------------------------
def _dense_vs_top1(ok, metric, keys, **_) -> Claim | None:
    mope = _method(ok, "mope")
    if len(_distinct(mope, "mope.routing")) < 2 or "dense" not in _distinct(mope, "mope.routing"):
        return None
    rows = []
    for stratum, g in _strata(mope, keys, {"mope.routing"}):
        dense = g[g["mope.routing"] == "dense"]
        for r in [r for r in _distinct(g, "mope.routing") if r != "dense"]:
            other = g[g["mope.routing"] == r]
            if by_seed(dense, metric) and by_seed(other, metric):
                rows.append(_versus(_prefix(stratum, f"dense vs {r}"), "dense", dense, r, other, metric))
    return Claim(
        "dense_vs_top1",
        "Dense routing is better than sparse top-1 routing",
        "Table 3 (§4.5)",
        "per top-1 variant (and per other axis value): supported when the 95% CI of dense − top-1 (paired by seed) "
        "lies above 0, not supported when below 0, else inconclusive.",
        rows,
    )


# -- (5) frozen vs learned keys ---------------------------------------------------------------------------------------
def _keys(ok, metric, keys, margin: float = EQUIVALENCE_MARGIN, **_) -> Claim | None:
    mope = _method(ok, "mope")
    if len(_distinct(mope, "mope.routing_keys")) < 2:
        return None
    routings = _distinct(mope, "mope.routing")
    # a hard one-hot gives the router no gradient (spec §1): its keys never train, so it cannot tell them apart
    use = [r for r in routings if r == "dense"] or [r for r in routings if r != "top1_hard"]
    sub = mope[mope["mope.routing"].isin(use)] if "mope.routing" in mope and use else mope
    rows = []
    for stratum, g in _strata(sub, keys, {"mope.routing_keys"}):
        kv = _distinct(g, "mope.routing_keys")
        if "frozen_orthogonal" not in kv or "learned" not in kv:
            continue
        a = by_seed(g[g["mope.routing_keys"] == "frozen_orthogonal"], metric)
        b = by_seed(g[g["mope.routing_keys"] == "learned"], metric)
        d = diff(a, b)
        if d.has_ci and -margin <= d.lo and d.hi <= margin:
            verdict = SUPPORTED
        elif d.has_ci and (d.lo > margin or d.hi < -margin):
            verdict = NOT_SUPPORTED
        else:
            verdict = INCONCLUSIVE
        rows.append(
            ClaimRow(
                _prefix(stratum, "frozen orthogonal vs learned keys"),
                f"frozen {_means(a)} vs learned {_means(b)}; Δ = {d.text()}; margin ±{margin:g}",
                verdict,
                d.n,
                _collapse_notes(g),
                d.as_dict(),
            )
        )
    return Claim(
        "frozen_vs_learned",
        "Frozen orthogonal routing keys perform on par with learned ones",
        "Table 4 (§4.5)",
        f"equivalence within ±{margin:g} (absolute, metric units), on the dense runs (top-1-hard routers get no "
        "gradient, so their keys cannot differ): supported when the 95% CI of frozen − learned lies inside the "
        "margin, not supported when it lies entirely outside, else inconclusive.",
        rows,
    )


# -- (6) importance loss ----------------------------------------------------------------------------------------------
def importance_matrix(history: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """step x expert matrix of `routing/importance_last/e<j>` for one run (columns sorted by expert index)."""
    h = history[(history["run_id"] == run_id) & history["key"].str.startswith("routing/importance_last/e")]
    if h.empty:
        return pd.DataFrame()
    h = h.assign(expert=h["key"].str.rsplit("e", n=1).str[-1].astype(int))
    m = h.pivot_table(index="step", columns="expert", values="value", aggfunc="last").sort_index()
    return m[sorted(m.columns)]


def importance_cv(history: pd.DataFrame, run_id: str, tail: float = IMPORTANCE_TAIL) -> float:
    """CV over experts of the mean importance over the last `tail` of the logged steps (last routed block)."""
    m = importance_matrix(history, run_id)
    if m.empty:
        return math.nan
    n = max(1, int(math.ceil(len(m) * tail)))
    return cv(m.iloc[-n:].mean(axis=0).to_numpy())


def _importance(ok, metric, keys, data: SweepData, **_) -> Claim | None:
    mope = _method(ok, "mope")
    ws = _distinct(mope, "mope.imp_loss_weight")
    if len(ws) < 2 or 0 not in [float(w) for w in ws]:
        return None
    rows = []
    for stratum, g in _strata(mope, keys, {"mope.imp_loss_weight"}):
        cvs: dict[float, dict[int, float]] = {}
        for w in _distinct(g, "mope.imp_loss_weight"):
            for _, r in g[g["mope.imp_loss_weight"] == w].iterrows():
                v = importance_cv(data.history, r["run_id"])
                if not is_missing(v):
                    cvs.setdefault(float(w), {})[int(r["seed"])] = v
        without = cvs.get(0.0, {})
        for w in sorted(x for x in cvs if x > 0):
            d = diff(without, cvs[w])
            rows.append(
                ClaimRow(
                    _prefix(stratum, f"w_imp = {w:g} vs 0"),
                    f"CV of importance (last routed block, last {IMPORTANCE_TAIL:.0%} of steps): "
                    f"without {_means(without)} vs with {_means(cvs[w])}; Δ(without − with) = {d.text()}",
                    _ahead(d),
                    d.n,
                    diff=d.as_dict(),
                )
            )
        if not without or not [w for w in cvs if w > 0]:
            rows.append(
                ClaimRow(
                    _prefix(stratum, "w_imp > 0 vs 0"),
                    "no routing/importance_last/e* history on one side (old runs, or routing stats not logged)",
                    INCONCLUSIVE,
                    0,
                )
            )
    return Claim(
        "importance_loss",
        "The importance loss balances expert usage",
        "Fig. 7 (§4.5)",
        "per run, CV = std/mean over experts of the importance of the last routed block averaged over the last "
        f"{IMPORTANCE_TAIL:.0%} of the logged steps; supported when the 95% CI of CV(without) − CV(with), paired by "
        "seed, lies above 0, not supported when below 0, else inconclusive.",
        rows,
    )


# -- (7) prompt ablation ----------------------------------------------------------------------------------------------
_FLAGS = ("mope.use_static", "mope.use_dynamic", "mope.use_mapped")
_NAMES = {"mope.use_static": "P_s", "mope.use_dynamic": "P_d", "mope.use_mapped": "P_m"}


def prompt_set(row: pd.Series) -> str:
    """'[P_s, P_d, P_m]' of a run from its use_* flags (all on when not set)."""
    on = [_NAMES[f] for f in _FLAGS if row.get(f, True) is not False]
    return "[" + ", ".join(on) + "]"


def _ablation(ok, metric, keys, **_) -> Claim | None:
    mope = _method(ok, "mope")
    if not any(len(_distinct(mope, f)) > 1 for f in _FLAGS):
        return None
    mope = mope.assign(prompts=mope.apply(prompt_set, axis=1))
    rows = []
    for stratum, g in _strata(mope, keys, set(_FLAGS)):
        full = g[g["prompts"] == "[P_s, P_d, P_m]"]
        if not by_seed(full, metric):
            continue
        for p in [p for p in dict.fromkeys(g["prompts"]) if p != "[P_s, P_d, P_m]"]:
            rows.append(
                _versus(
                    _prefix(stratum, f"[P_s, P_d, P_m] vs {p}"), "all three", full, p, g[g["prompts"] == p], metric
                )
            )
    return Claim(
        "prompt_ablation",
        "All three prompt types [P_s, P_d, P_m] together are best",
        "Table 2 (§4.5)",
        "for every other prompt set: supported when the 95% CI of all-three − that set (paired by seed) lies above "
        "0; not supported when any lies below 0; else inconclusive.",
        rows,
    )


# -- (9) referring segmentation (Table 7) -----------------------------------------------------------------------------
def _ris(ok, metric, keys, **_) -> Claim | None:
    if "data.task" not in ok or "segmentation" not in set(ok["data.task"].dropna()):
        return None
    mope = _method(ok, "mope")
    rows = []
    for other in ("p_sequential_fuse", "sequential_fuse"):
        o = _method(ok, other)
        if by_seed(mope, metric) and by_seed(o, metric):
            rows.append(_versus(f"MoPE vs {other}", "MoPE", mope, other, o, metric))
    split = metric.split("/")[-1].split("_")[0]  # final/test_miou -> test (testA + testB), final/val_miou -> val
    chance = [f"chance/{sp}/{c}" for sp in (("testA", "testB") if split == "test" else (split,)) for c in CHANCE]
    levels = [float(v) for c in chance if c in ok for v in pd.to_numeric(ok[c], errors="coerce").dropna()]
    if levels and by_seed(mope, metric):
        a = by_seed(mope, metric)
        top = max(levels)
        d = diff(a, dict.fromkeys(a, top))
        rows.append(
            ClaimRow(
                "MoPE vs the best text-free answer",
                f"MoPE {_means(a)} vs chance {top:.3f} (the higher of: every object, a random object); Δ = {d.text()}",
                _ahead(d),
                d.n,
                _collapse_notes(mope),
                d.as_dict(),
            )
        )
    return Claim(
        "ris",
        "On referring segmentation MoPE beats P-SequentialFuse and the fully fine-tuned SequentialFuse",
        "Table 7 (App. C)",
        "per comparison: supported when the 95% CI of MoPE − other (paired by seed) lies above 0, not supported when "
        "below 0, else inconclusive; the chance row compares MoPE with the dataset's best text-free IoU.",
        rows,
    )


CHANCE = ("all_objects_miou", "random_object_miou")


def claims_summary(claims: list[Claim]) -> dict[str, int]:
    out = {SUPPORTED: 0, NOT_SUPPORTED: 0, INCONCLUSIVE: 0}
    for c in claims:
        out[c.verdict] += 1
    return out


__all__ = [
    "EQUIVALENCE_MARGIN",
    "INCONCLUSIVE",
    "NOT_SUPPORTED",
    "SUPPORTED",
    "Claim",
    "ClaimRow",
    "claims_summary",
    "evaluate_claims",
    "importance_cv",
    "importance_matrix",
    "prompt_set",
]
