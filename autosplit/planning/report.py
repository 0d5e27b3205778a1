"""Plans and profiles as text tables and as an HTML page with per-unit memory bars."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from autosplit.plan import Plan
from autosplit.planning.profile import Profile


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_flops(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} FLOP"


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(len(widths))) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * min(150, max(len(line) for line in lines)))
    return lines


def stage_label(u: Any) -> str:
    """ "1", "2", or "1+2" for a unit split inside (stage 1 caches, stage 2 replays its random part)."""
    return "1+2" if u.replays else str(u.stage)


def plan_table(plan: Plan) -> str:
    """The plan as a terminal table followed by the predicted memory and what each stage builds."""
    cached: dict[str, list[int]] = {v.producer: [] for v in plan.cached}
    for v in plan.cached:
        cached[v.producer].append(v.bytes_per_sample or 0)
    rows = [("unit", "stage", "peak mem", "FLOPs", "time", "grad", "random", "cached/sample", "reason")]
    timed = plan.predicted.get("profile_mode") not in (None, "fake")  # fake tracing time means nothing
    for u in plan.units:
        measured = u.peak_bytes is not None and timed
        rows.append(
            (
                u.name,
                stage_label(u),
                format_bytes(u.peak_bytes),
                format_flops(u.flops),
                f"{u.seconds * 1000:.1f} ms" if measured and u.seconds is not None else "-",
                ("yes" if u.needs_grad else "no") if u.needs_grad is not None else "-",
                ",".join(u.random_ops) or "no",
                format_bytes(sum(cached[u.name])) if u.name in cached else "-",
                u.reason,
            )
        )
    lines = _table(rows)
    lines.append("")
    lines += plan_summary(plan)
    return "\n".join(lines)


def plan_summary(plan: Plan) -> list[str]:
    lines = [
        f"stage 1 builds: {', '.join(plan.components(1)) or 'nothing'}"
        f"{'  (computed inline every step: --no-split)' if not plan.split else ''}",
        f"stage 2 builds: {', '.join(plan.components(2))}; trains {', '.join(plan.trainable)}",
    ]
    for v in plan.cached:
        shape = f", shape {list(v.shape)} {v.dtype}" if v.shape is not None else ""
        ragged = ", ragged axis 0" if v.ragged_axis is not None else ""
        lines.append(f"cached: {v.name} ({format_bytes(v.bytes_per_sample)}/sample{shape}{ragged})")
    p = plan.predicted
    if "stage2_peak_bytes" in p:
        stage2, unsplit = p["stage2_peak_bytes"], p["unsplit_peak_bytes"]
        lines.append(
            f"predicted peak memory ({p['profile_mode']} profile, batch {p['batch_size']}): stage 2 "
            f"{format_bytes(stage2)} vs unsplit {format_bytes(unsplit)} "
            f"({stage2 / unsplit:.1%}, saves {format_bytes(unsplit - stage2)}); stage 1 "
            f"{format_bytes(p['stage1_peak_bytes'])}"
        )
        lines.append(
            f"stage 2 = weights {format_bytes(p['stage2_resident_bytes'])} + optimizer "
            f"{format_bytes(p['optimizer_bytes'])} + batch {format_bytes(p['cached_batch_bytes'])} + "
            f"activations {format_bytes(p['stage2_activation_bytes'])}"
        )
    lines += placement_lines(plan)
    if p.get("vram_budget_bytes"):
        budget = p["vram_budget_bytes"]
        placed = p.get("placement") or {}
        judged = placed.get("judged_reserved_bytes")  # what the allocator is predicted to reserve
        what = placed.get("judged", "stage 2")
        if judged is None and "stage2_peak_bytes" in p:  # a plan without a placement
            judged, what = (p["stage2_peak_bytes"], "stage 2") if plan.split else (p["unsplit_peak_bytes"], "unsplit")
        if judged is not None:
            verdict = (
                f"fits with {format_bytes(budget - judged)} to spare"
                if judged <= budget
                else f"does NOT fit: {format_bytes(judged - budget)} over"
            )
            if placed.get("judged_reserved_bytes") is not None:
                verdict += " (predicted reserved memory)"
            if judged <= budget and placed.get("fits") is False:
                verdict += ", but the host memory does not (see placement)"
            lines.append(f"budget {format_bytes(budget)}: {what} {verdict}")
    return lines


def placement_lines(plan: Plan) -> list[str]:
    """Stage 2's weight placement (`predicted["placement"]`): what is where, its cost, and why;
    nothing for the default (every block resident in the run's dtype, no budget)."""
    placed = plan.predicted.get("placement")
    asked = placed and (
        placed["blocks_to_swap"] or placed["base_precision"] != "dtype" or placed.get("vram_budget_bytes")
    )
    if not placed or not asked:  # every block resident in the run's dtype, as nobody asked otherwise
        return []
    n = placed["blocks_to_swap"]
    precision = "fp8 (e4m3, per-channel scales)" if placed["base_precision"] == "fp8" else "the run's dtype"
    where = (
        f"{n} of {placed.get('num_blocks', '?')} repeated blocks in pinned host memory, copied to the GPU "
        f"{'ahead of use' if placed['slots'] > 1 else 'as needed'} ({placed['slots']} on the GPU at a time)"
        if n
        else "every block resident on the GPU"
    )
    lines = [f"stage 2 weights: {where}; frozen weights in {precision}"]
    if placed.get("predicted"):
        rate = placed["h2d_bytes_per_s"] / 1e9
        host = (
            f"host {format_bytes(placed['host_pinned_bytes'])} pinned (peak "
            f"{format_bytes(placed['host_peak_bytes'])} while loading), "
            if placed["host_peak_bytes"]
            else ""
        )
        lines.append(
            f"placement predicted: {placed['judged']} peak {format_bytes(placed['judged_peak_bytes'])} "
            f"allocated ({format_bytes(placed['judged_reserved_bytes'])} reserved), "
            f"{host}step {placed['step_s']:.2f} s "
            f"({placed['step_s'] / placed['resident_step_s']:.2f}x every block resident; {rate:g} GB/s, "
            f"{placed['train_flops_per_s'] / 1e12:.1f} TFLOP/s)"
        )
    lines.append(f"placement: {placed['reason']}")
    return lines


def profile_table(profile: Profile) -> str:
    rows = [("unit", "peak mem", "FLOPs", "time", "grad", "random ops", "outputs")]
    for u in profile.units:
        outs = ", ".join(f"{v.name}{list(v.shape)}" for v in u.outputs)
        rows.append(
            (
                u.name,
                format_bytes(u.peak_bytes),
                format_flops(u.flops),
                f"{u.seconds * 1000:.1f} ms",
                "yes" if u.needs_grad else "no",
                ",".join(u.random_ops) or "no",
                outs,
            )
        )
    lines = _table(rows)
    step = profile.grad_step
    lines.append(
        f"training step ({', '.join(step.units)}): peak {format_bytes(step.peak_bytes)}, {format_flops(step.flops)}"
    )
    for c in profile.components:
        lines.append(
            f"component {c.name}: {c.num_params / 1e6:.1f} M parameters, frozen "
            f"{format_bytes(c.frozen_bytes)}, trainable {format_bytes(c.trainable_bytes)}"
        )
    return "\n".join(lines)


def plan_html(plan: Plan) -> str:
    """A self-contained HTML page: per-unit peak memory bars coloured by stage, the cut marked."""
    peaks = [u.peak_bytes or 0 for u in plan.units]
    top = max(peaks + [1])
    bar_rows = []
    y = 30
    for i, u in enumerate(plan.units):
        if i and plan.units[i - 1].stage == 1 and u.stage == 2:
            bar_rows.append(
                f'<line x1="0" x2="900" y1="{y - 4}" y2="{y - 4}" stroke="#c00" stroke-dasharray="6 4"/>'
                f'<text x="905" y="{y}" fill="#c00" font-size="12">cut</text>'
            )
        width = 1 + 560 * (u.peak_bytes or 0) / top
        color = "#8a6db1" if u.replays else "#4a90d9" if u.stage == 1 else "#e8912d"
        bar_rows.append(
            f'<text x="0" y="{y + 13}" font-size="13">{html.escape(u.name)}</text>'
            f'<rect x="180" y="{y}" width="{width:.1f}" height="18" fill="{color}">'
            f"<title>{html.escape(u.reason)}</title></rect>"
            f'<text x="{190 + width:.1f}" y="{y + 13}" font-size="12">{format_bytes(u.peak_bytes)}</text>'
        )
        y += 26
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in plan_summary(plan))
    reasons = "".join(
        f"<tr><td>{html.escape(u.name)}</td><td>{stage_label(u)}</td><td>{html.escape(u.reason)}</td></tr>"
        for u in plan.units
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>autosplit plan: {plan.pipeline} "
        f"{plan.task}</title></head><body style='font-family:sans-serif'>"
        f"<h1>{html.escape(plan.pipeline)} / {html.escape(plan.task)}</h1>"
        "<p>Peak memory of each unit (blue: stage 1, orange: stage 2, purple: split, its random part "
        "replayed in stage 2).</p>"
        f"<svg width='960' height='{y + 10}' xmlns='http://www.w3.org/2000/svg'>{''.join(bar_rows)}</svg>"
        f"<ul>{summary}</ul><table border='1' cellpadding='4'><tr><th>unit</th><th>stage</th>"
        f"<th>reason</th></tr>{reasons}</table></body></html>\n"
    )


def with_budget(predicted: dict[str, Any], budget_gib: float) -> dict[str, Any]:
    """`predicted` with the budget and whether the run fits it: the peak of the run about to be done
    (its placement's: stage 2, or unsplit for --no-split), else stage 2's."""
    if not budget_gib or "stage2_peak_bytes" not in predicted:
        return predicted
    budget = int(budget_gib * (1 << 30))
    placed = predicted.get("placement") or {}
    judged = placed.get("judged_peak_bytes", predicted["stage2_peak_bytes"])
    return {
        **predicted,
        "vram_budget_bytes": budget,
        "fits_budget": judged <= budget and placed.get("fits", True) is not False,
    }


def budget_table(checks: list[Any]) -> str:
    """`autosplit bench`'s table: each budgeted number (gate.Check), its budget, measurement, status."""

    def fmt(kind: str, n: int | float | None) -> str:
        if n is None:
            return "-"
        return format_bytes(n) if kind == "memory" else format_flops(int(n)) if kind == "flops" else str(int(n))

    rows = [("metric", "budget", "measured", "change", "status")]
    for c in checks:
        change = "-"
        if c.kind != "stage" and c.measured is not None and c.budget:
            change = f"{(c.measured / c.budget - 1) * 100:+.2f}%"
        rows.append((c.name, fmt(c.kind, c.budget), fmt(c.kind, c.measured), change, c.status))
    return "\n".join(_table(rows))
