"""Profiling a configured pipeline: real (the weights of the model folder, CPU or CUDA) or fake
(configs only, no weights, fake CPU tensors), one batch, every unit.

Fake profiles of full-size models trace the repeated blocks of the trained component (the DiT's
60 layers) at 1 and 2 blocks and extrapolate linearly to the real count: memory, FLOPs and
parameter bytes of a stack of identical blocks are linear in the number of blocks (a test checks
the extrapolation against a full trace), and a 20 B-parameter step is planned in seconds.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from autosplit.graph import UnitContext
from autosplit.models import NON_MODULE_COMPONENTS, load_components
from autosplit.profiler import Profile, fake_build, new_fake_mode, profile_graph, trace_graph
from autosplit.session import Session
from autosplit.trainer import make_trainable, step_generator


def _all_components(session: Session) -> list[str]:
    names: list[str] = []
    for unit in session.graph:
        names += [c for c in unit.components if c not in names]
    return names


def profile_batch(session: Session, *, image_size: tuple[int, int] | None = None, prompt: str | None = None,
                  workdir: Path | None = None) -> dict[str, Any]:
    """The sources of one profiling batch: the first `batch_size` samples of the first bucket, or
    a synthetic image of `image_size` (width, height) with `prompt`."""
    batch_size = session.config.train.batch_size
    if image_size is None:
        samples = session.samples()
        first = [s for s in samples if s.bucket == samples[0].bucket][:batch_size]
        return {"image_path": [s.image_path for s in first], "image_size": [s.size for s in first],
                "prompt": [s.prompt for s in first], "sample_id": [s.index for s in first]}
    from PIL import Image

    path = Path(workdir or tempfile.mkdtemp(prefix="autosplit-profile-")) / f"profile_{image_size[0]}x{image_size[1]}.png"
    if not path.exists():
        Image.new("RGB", image_size, (127, 90, 200)).save(path)
    return {"image_path": [path] * batch_size, "image_size": [tuple(image_size)] * batch_size,
            "prompt": [prompt or "a purple square"] * batch_size, "sample_id": list(range(batch_size))}


def prompt_with_tokens(tokenizer: Any, num_tokens: int) -> str:
    """A prompt that `tokenizer` turns into about `num_tokens` tokens (for sizing text in profiles)."""
    words = ("red", "green", "blue", "circle", "square", "light", "shadow", "texture")
    prompt = ""
    i = 0
    while len(tokenizer(prompt).input_ids) < num_tokens:
        prompt += (" " if prompt else "") + words[i % len(words)]
        i += 1
    return prompt


def _context(session: Session, components: dict[str, Any], device: torch.device) -> UnitContext:
    (trainable,) = session.trainable
    make_trainable(session, components[trainable], trainable)
    return UnitContext(components, device, session.dtype, generator=step_generator(session.config.train.seed, 0),
                       settings=session.settings)


def profile_real(session: Session, *, image_size: tuple[int, int] | None = None,
                 prompt_tokens: int | None = None) -> Profile:
    """Profile with the model folder's weights on the session's device."""
    components = load_components(session.adapter, session.model_root, _all_components(session),
                                 device=session.device, dtype=session.dtype)
    ctx = _context(session, components, session.device)
    prompt = prompt_with_tokens(components["tokenizer"], prompt_tokens) if prompt_tokens else None
    batch = profile_batch(session, image_size=image_size, prompt=prompt)
    return profile_graph(session.graph, batch, ctx, pipeline=session.adapter.name, task=session.task)


def _fake_components(session: Session, root: Path | None, fake_mode: Any,
                     overrides: dict[str, dict[str, Any]], only: set[str] | None = None) -> dict[str, Any]:
    components: dict[str, Any] = {}
    tiny = session.model_root
    for name in _all_components(session):
        if only is not None and name not in only:
            continue
        if name in NON_MODULE_COMPONENTS:  # small and weight-free: load them for real
            source = root if root is not None and (root / name).is_dir() else tiny
            components.update(load_components(session.adapter, source, [name], device=torch.device("cpu"),
                                              dtype=session.dtype))
            continue
        with fake_build(fake_mode, session.dtype):
            module = session.adapter.component_from_config(root, name, overrides=overrides.get(name))
            components[name] = module.requires_grad_(False).eval()
    return components


def profile_fake(session: Session, *, full_size: bool, image_size: tuple[int, int] | None = None,
                 prompt_tokens: int | None = None, extrapolate: bool = True) -> Profile:
    """Profile from configs alone with fake tensors. `full_size` uses the family's full-size
    configuration when no model folder was given."""
    root = session.model_root if (session.config.model.path or not full_size) else None
    blocks = getattr(session.adapter, "repeated_blocks", {}) if extrapolate else {}
    full_counts = {name: _config_value(session, root, name, key) for name, key in blocks.items()}
    blocks = {name: key for name, key in blocks.items() if full_counts[name] > 2}
    fake_mode = new_fake_mode()
    components = _fake_components(session, root, fake_mode, {n: {k: 1} for n, k in blocks.items()})
    cpu = torch.device("cpu")
    with fake_build(fake_mode, session.dtype):
        ctx = _context(session, components, cpu)
    prompt = prompt_with_tokens(components["tokenizer"], prompt_tokens) if prompt_tokens else None
    batch = profile_batch(session, image_size=image_size, prompt=prompt)
    trace = dict(pipeline=session.adapter.name, task=session.task, mode="fake")
    with fake_mode:
        one, values = trace_graph(session.graph, batch, ctx, **trace)
    if not blocks:
        return one
    # the same fake mode, the repeated components rebuilt with 2 blocks; only their units re-traced
    rebuilt = _fake_components(session, root, fake_mode, {n: {k: 2} for n, k in blocks.items()}, only=set(blocks))
    with fake_build(fake_mode, session.dtype):
        ctx = _context(session, {**components, **rebuilt}, cpu)
    retrace = {u.name for u in session.graph if set(u.components) & set(blocks)}
    with fake_mode:
        two, _ = trace_graph(session.graph, batch, ctx, reuse=(one, values), retrace=retrace, **trace)
    (count,) = {full_counts[n] for n in blocks}
    profile = extrapolate_profiles(one, two, count)
    return dataclasses.replace(profile, notes={**profile.notes, "extrapolated": {
        n: {"config_key": k, "traced": [1, 2], "to": full_counts[n]} for n, k in blocks.items()}})


def _config_value(session: Session, root: Path | None, name: str, key: str) -> int:
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = session.adapter.component_from_config(root, name)
    return int(module.config[key])


def extrapolate_profiles(one: Any, two: Any, count: int) -> Any:
    """Linear extrapolation of every number from traces with 1 and 2 blocks to `count` blocks."""
    if dataclasses.is_dataclass(one):
        return type(one)(**{f.name: extrapolate_profiles(getattr(one, f.name), getattr(two, f.name), count)
                            for f in dataclasses.fields(one)})
    if isinstance(one, tuple) and len(one) == len(two) and one and dataclasses.is_dataclass(one[0]):
        return tuple(extrapolate_profiles(a, b, count) for a, b in zip(one, two))
    if isinstance(one, bool) or not isinstance(one, (int, float)) or two is None:
        return two
    value = one + (two - one) * (count - 1)
    return int(value) if isinstance(one, int) else float(value)
