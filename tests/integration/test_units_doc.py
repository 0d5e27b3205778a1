"""docs/units.md's example runs as written and prints what the page says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "units.md"


def test_the_units_page_example_runs_and_prints_what_it_says(tmp_path, monkeypatch):
    text = DOC.read_text()
    code = text.split("```python\n")[1].split("```")[0]
    expected = text.split("It prints")[1].split("```text\n")[1].split("```")[0].splitlines()
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "__main__"})
    printed = out.getvalue().splitlines()
    assert len(printed) == len(expected)
    for got, want in zip(printed[:-1], expected[:-1]):
        assert got == want
    loss = r"last loss [0-9.]+"
    assert re.sub(loss, "", printed[-1]) == re.sub(loss, "", expected[-1])
    assert (tmp_path / "units-out" / "unet_lora" / "adapter_model.safetensors").is_file()
