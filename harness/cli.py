"""`harness` command line: one entry point, subcommands dispatched to their modules.

harness inspect --preset paper/mope_swin_b_k4 [--json]
harness prep DATASET --src RAW_DIR --out SHARD_DIR      (converters: food101, mmimdb, snli_ve, mustard, demo)
harness prep --verify SHARD_DIR
harness prep --fewshot SHARD_DIR --shots 100,1000 --seed 0
harness sweep SPEC.yaml [overrides...] [--dry-run]
harness validate SPEC.yaml [overrides...]            (every trial of a sweep spec)
harness report --sweep NAME [--out DIR]              (figures, tables, claims of a sweep, from MLflow)
"""

from __future__ import annotations

import os
import sys

COMMANDS = {
    "inspect": ("harness.inspect_cmd", "main", "parameter counts and attention lengths of a model preset"),
    "prep": ("datasets_prep.cli", "main", "convert raw datasets to WebDataset shards, verify, few-shot subsets"),
    "validate": ("harness.compose", "main", "compose and check one training configuration (Hydra overrides)"),
    "train": ("harness.train_cmd", "main", "train one configuration (DeepSpeed or torch engine), tracked in MLflow"),
    "sweep": ("harness.sweep_cmd", "main", "run a sweep spec on Ray Tune (resumable; --dry-run for the trial table)"),
    "report": ("harness.report_cmd", "main", "figures, tables and claim verdicts of a sweep, from MLflow"),
}


def _usage() -> str:
    lines = ["usage: harness COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10}{doc}" for name, (_, _, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
        hint = f" (did you mean `harness {close[0]}`?)" if close else ""
        print(f"harness: unknown command {cmd!r}{hint}; use one of the commands below\n\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    mod_name, fn_name, _ = COMMANDS[cmd]
    if cmd == "prep" and "--fewshot" in rest:
        mod_name, fn_name = "datasets_prep.fewshot", "fewshot_main"
    if cmd == "validate" and rest and rest[0].endswith((".yaml", ".yml")):  # a sweep spec: every trial
        mod_name, fn_name = "harness.sweep_cmd", "validate_main"
    fn = getattr(importlib.import_module(mod_name), fn_name)
    return int(fn(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
