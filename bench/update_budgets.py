"""Re-measure the built-in pipelines and rewrite profiles/ (profile JSONs and budgets.json).

    python bench/update_budgets.py [PIPELINE-MODE ...]

Commit the result together with the change that justifies it (see bench/README.md).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("AUTOSPLIT_HOME", tempfile.mkdtemp(prefix="autosplit-budgets-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gate_cases import CASES, GATE_SETS, entry_key  # noqa: E402

from autosplit.planning.budget import make_budget, write_budget  # noqa: E402
from autosplit.workflow.measure import measure_pipeline  # noqa: E402

PROFILES = HERE.parent / "profiles"


def main(only: list[str]) -> None:
    for pipeline, mode in CASES:
        key = entry_key(pipeline, mode)
        if only and key not in only:
            continue
        profile, plan, inputs = measure_pipeline(pipeline, profile=mode, sets=GATE_SETS)
        (PROFILES / f"{key}.json").write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
        write_budget(PROFILES / "budgets.json", key, make_budget(profile, plan, inputs=inputs))
        print(
            f"{key}: stage-2 peak {plan.predicted['stage2_peak_bytes']} B, "
            f"unsplit {plan.predicted['unsplit_peak_bytes']} B"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
