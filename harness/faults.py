"""Fault injection for the reliability suite (``tests/reliability/test_faults.py``). Off unless asked for.

``HARNESS_FAULT_INJECT`` (set on the sweep driver, which hands it to every trial, or in a ``harness train``
environment) holds ``;``-separated faults, each ``KIND@STEP`` plus optional ``:key=value`` fields::

    kill@4:match=mope:once=/tmp/killed     SIGKILL the training process during step 4 (its loss computed, not yet
                                           applied: mid-epoch),
                                           in runs whose run name contains "mope", only if /tmp/killed does not
                                           exist yet (it is created first: the retried trial runs clean)
    nan@2:match=vanilla                    the loss of step 2 becomes NaN (the run must fail naming step 2)

A real ``SIGKILL`` of the worker process, at a chosen step, makes "killed mid-epoch" reproducible: the tests compare
the resumed run with an uninterrupted one step by step.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

ENV = "HARNESS_FAULT_INJECT"
KINDS = ("kill", "nan")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    match: str = ""
    once: str | None = None


def parse(text: str | None) -> list[Fault]:
    """Parses a ``HARNESS_FAULT_INJECT`` value; a malformed one is a ValueError naming the variable and the item."""
    faults = []
    for item in filter(None, (t.strip() for t in (text or "").split(";"))):
        head, *fields = item.split(":")
        kind, _, step = head.partition("@")
        opts = dict(f.split("=", 1) for f in fields if "=" in f)
        bad = [f for f in fields if "=" not in f] + sorted(set(opts) - {"match", "once"})
        if kind not in KINDS or not step.isdigit() or bad:
            raise ValueError(
                f"{ENV}: cannot read {item!r}; expected KIND@STEP[:match=SUBSTRING][:once=PATH] with "
                f"KIND one of {KINDS}"
            )
        faults.append(Fault(kind, int(step), opts.get("match", ""), opts.get("once")))
    return faults


def for_run(run_name: str) -> list[Fault]:
    """The faults of ``$HARNESS_FAULT_INJECT`` that apply to `run_name` (usually none)."""
    return [f for f in parse(os.environ.get(ENV)) if f.match in run_name]


def after_step(faults: list[Fault], step: int, loss):
    """Applies the faults due at global `step` (1-based: the step being computed, called with its loss before the
    finiteness check and the update): returns the loss,
    replaced by NaN for a ``nan`` fault; a ``kill`` fault SIGKILLs this process."""
    for f in faults:
        if f.step != step:
            continue
        if f.once is not None:
            marker = Path(f.once)
            if marker.exists():
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{f.kind}@{step} pid {os.getpid()}\n")
        if f.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.kind == "nan":
            loss = loss * float("nan")
    return loss
