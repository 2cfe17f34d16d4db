"""``harness train`` run in the test process with its console captured (the e2e tests' one way to call it)."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout


def run_train(argv: list[str]) -> tuple[int, str]:
    """``(exit code, stdout + stderr)`` of ``harness train ARGV``."""
    from harness.train_cmd import main as train_main

    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(buf):
        rc = train_main(argv)
    return rc, buf.getvalue()
