"""Regenerate the plan tables in docs/families.md (run: python docs/scripts/update_family_plans.py).

Two kinds of blocks, each the output of `autosplit plan <flags>`:
- without `--fake`: a family's tiny built-in pipeline, planned from a fake-tensor profile;
  tests/test_docs.py checks that these blocks are current;
- with `--fake`: the family's full-size configuration (fake tensors, no weights). These take
  tens of seconds each on a CPU, so no test re-plans them; this script regenerates them (pass
  `--tiny` to regenerate only the tiny blocks) and prints each one's wall time.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from autosplit.cli import build_parser, config_from_args
from autosplit.planning.report import plan_table
from autosplit.workflow.session import open_session

DOC = Path(__file__).resolve().parents[1] / "families.md"
#: tiny-pipeline blocks (flags without --fake)
BLOCK = re.compile(r"(^\$ autosplit plan((?:(?!--fake)[^\n])*)\n```\n\n```text\n)(.*?)(```)", flags=re.M | re.S)
#: full-size blocks (flags with --fake)
FULL_BLOCK = re.compile(r"(^\$ autosplit plan([^\n]*--fake[^\n]*)\n```\n\n```text\n)(.*?)(```)", flags=re.M | re.S)


#: the tiny blocks are fp32 plans made on the CPU, on any machine
TINY = ["--device", "cpu", "--dtype", "float32"]


def args_fake(flags: str) -> bool:
    return "--fake" in flags.split()


def table_for(flags: str) -> str:
    """The plan table of `autosplit plan <flags>`, profiled fake (full size when --fake is given)."""
    from autosplit.cli import _profile
    from autosplit.planning.memory import replace_predicted
    from autosplit.planning.report import with_budget
    from autosplit.workflow.profiling import plan_run

    args = build_parser().parse_args(["plan", *flags.split(), *([] if args_fake(flags) else TINY)])
    config = config_from_args(args)
    session = open_session(config)
    if not args.fake:
        return plan_table(plan_run(session)) + "\n"
    plan = session.plan(_profile(args, session))  # as plan_command does
    return plan_table(replace_predicted(plan, with_budget(plan.predicted, config.plan.vram_budget_gib))) + "\n"


def _regenerate(match: re.Match) -> str:
    start = time.perf_counter()
    table = table_for(match.group(2))
    print(f"autosplit plan{match.group(2)}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return match.group(1) + table + match.group(4)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    text = BLOCK.sub(_regenerate, DOC.read_text())
    if "--tiny" not in argv:
        text = FULL_BLOCK.sub(_regenerate, text)
    import torch

    version = torch.__version__.split("+")[0]  # tests/test_docs.py re-plans only under this torch
    text = re.sub(r"`autosplit plan` \(torch [0-9.]+\)", f"`autosplit plan` (torch {version})", text)
    DOC.write_text(text)


if __name__ == "__main__":
    main()
