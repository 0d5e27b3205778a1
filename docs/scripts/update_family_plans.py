"""Regenerate the plan tables in docs/families.md (run: python docs/scripts/update_family_plans.py).

Each block is the output of `autosplit plan <flags>` on a family's tiny built-in pipeline, planned
from a fake-tensor profile; tests/test_docs.py checks that the blocks are current.
"""

from __future__ import annotations

import re
from pathlib import Path

from autosplit.cli import build_parser, config_from_args
from autosplit.report import plan_table
from autosplit.session import open_session

DOC = Path(__file__).resolve().parents[1] / "families.md"
BLOCK = re.compile(r"(^\$ autosplit plan([^\n]*)\n```\n\n```text\n)(.*?)(```)", flags=re.M | re.S)


def table_for(flags: str) -> str:
    args = build_parser().parse_args(["plan", *flags.split()])
    return plan_table(open_session(config_from_args(args)).plan()) + "\n"


def main() -> None:
    text = DOC.read_text()
    DOC.write_text(BLOCK.sub(lambda m: m.group(1) + table_for(m.group(2)) + m.group(4), text))


if __name__ == "__main__":
    main()
