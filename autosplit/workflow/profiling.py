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

from autosplit.adapters.base import (
    component_from_config,
    empty_component,
    is_module_component,
)
from autosplit.adapters.components import load_components
from autosplit.config import autosplit_home
from autosplit.errors import ConfigError
from autosplit.graph import UnitContext
from autosplit.plan import Plan
from autosplit.planning.profile import BlockProfile, Profile
from autosplit.planning.tracer import (
    fake_build,
    new_fake_mode,
    profile_graph,
    trace_graph,
)
from autosplit.training.lora import make_trainable
from autosplit.training.precision import frozen_linears
from autosplit.training.rng import step_generator
from autosplit.training.swap import frozen_tensors, layout_bytes
from autosplit.workflow.session import Session


def _all_components(session: Session) -> list[str]:
    names: list[str] = []
    for unit in session.graph:
        names += [c for c in unit.components if c not in names]
    return names


def profile_batch(
    session: Session,
    *,
    image_size: tuple[int, int] | None = None,
    prompt: str | None = None,
    workdir: Path | None = None,
    num_frames: int | None = None,
) -> dict[str, Any]:
    """The sources of one profiling batch: the first `batch_size` samples of the first bucket, or
    a synthetic image of `image_size` (width, height) with `prompt` (a clip of `num_frames` such
    frames, a frame folder, for video families)."""
    batch_size = session.config.train.batch_size
    if image_size is None:
        samples = session.samples()
        first = [s.sources() for s in samples if s.bucket == samples[0].bucket][:batch_size]
        return {key: [value for source in first for value in source[key]] for key in first[0]}
    from PIL import Image

    path = (
        Path(workdir or tempfile.mkdtemp(prefix="autosplit-profile-")) / f"profile_{image_size[0]}x{image_size[1]}.png"
    )
    if not path.exists():
        Image.new("RGB", image_size, (127, 90, 200)).save(path)
    if num_frames and num_frames > 1:
        clip = path.with_name(f"{path.stem}_{num_frames}f")
        clip.mkdir(exist_ok=True)
        for i in range(num_frames):
            frame = clip / f"{i:05d}.png"
            if not frame.exists():
                frame.write_bytes(path.read_bytes())
        path = clip
    return {
        "image_path": [path] * batch_size,
        "image_size": [tuple(image_size)] * batch_size,
        "num_frames": [num_frames or 1] * batch_size,
        "prompt": [prompt or "a purple square"] * batch_size,
        "sample_id": list(range(batch_size)),
    }


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
    cfg = session.config
    for name in session.trainable:
        make_trainable(
            components[name],
            name,
            lora=cfg.lora,
            adapter=session.adapter,
            denoiser=name == session.trainable[0],
            seed=cfg.train.seed,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
        )
    return UnitContext(
        components,
        device,
        session.dtype,
        generator=step_generator(session.config.train.seed, 0),
        settings=session.settings,
    )


def profile_real(
    session: Session,
    *,
    image_size: tuple[int, int] | None = None,
    prompt_tokens: int | None = None,
    num_frames: int | None = None,
) -> Profile:
    """Profile with the model folder's weights on the session's device."""
    components = load_components(
        session.adapter, session.model_root, _all_components(session), device=session.device, dtype=session.dtype
    )
    ctx = _context(session, components, session.device)
    prompt = prompt_with_tokens(components["tokenizer"], prompt_tokens) if prompt_tokens else None
    batch = profile_batch(session, image_size=image_size, prompt=prompt, num_frames=num_frames)
    profile = profile_graph(session.graph, batch, ctx, pipeline=session.adapter.name, task=session.task)
    return dataclasses.replace(profile, blocks=denoiser_blocks(session, components, profile))


def _fake_components(
    session: Session,
    root: Path | None,
    fake_mode: Any,
    overrides: dict[str, dict[str, Any]],
    only: set[str] | None = None,
) -> dict[str, Any]:
    components: dict[str, Any] = {}
    tiny = session.model_root
    for name in _all_components(session):
        if only is not None and name not in only:
            continue
        source = root if root is not None and (root / name).is_dir() else tiny
        if root is None and name == "scheduler" and session.adapter.full_size_scheduler:
            source = _full_size_scheduler_folder(session.adapter)
        if not is_module_component(source, name):  # tokenizers, schedulers: small, load them for real
            components.update(
                load_components(session.adapter, source, [name], device=torch.device("cpu"), dtype=session.dtype)
            )
            continue
        with fake_build(fake_mode, session.dtype):
            module = component_from_config(session.adapter, root, name, overrides=overrides.get(name))
            components[name] = module.requires_grad_(False).eval()
    return components


def _full_size_scheduler_folder(adapter: Any) -> Path:
    """A folder holding only the family's full-size `scheduler/scheduler_config.json`, loaded by the
    adapter as from a pipeline folder (the tiny pipeline's scheduler may differ, e.g. SDXL's)."""
    import json

    folder = Path(tempfile.mkdtemp(prefix=f"autosplit-{adapter.name}-scheduler-"))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(adapter.full_size_scheduler))
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": adapter.pipeline_class,
                "scheduler": ["diffusers", adapter.full_size_scheduler["_class_name"]],
            }
        )
    )
    return folder


def profile_fake(
    session: Session,
    *,
    full_size: bool,
    image_size: tuple[int, int] | None = None,
    prompt_tokens: int | None = None,
    extrapolate: bool = True,
    num_frames: int | None = None,
) -> Profile:
    """Profile from configs alone with fake tensors. `full_size` uses the family's full-size
    configuration when no model folder was given."""
    root = session.model_root if (session.config.model.path or not full_size) else None
    blocks = session.adapter.repeated_blocks if extrapolate else {}
    full_counts = {name: _config_value(session, root, name, key) for name, key in blocks.items()}
    blocks = {name: key for name, key in blocks.items() if full_counts[name] > 2}
    fake_mode = new_fake_mode()
    components = _fake_components(session, root, fake_mode, {n: {k: 1} for n, k in blocks.items()})
    cpu = torch.device("cpu")
    with fake_build(fake_mode, session.dtype):
        ctx = _context(session, components, cpu)
    prompt = prompt_with_tokens(components["tokenizer"], prompt_tokens) if prompt_tokens else None
    batch = profile_batch(session, image_size=image_size, prompt=prompt, num_frames=num_frames)
    trace: dict[str, Any] = dict(pipeline=session.adapter.name, task=session.task, mode="fake")
    with fake_mode:
        one, values = trace_graph(session.graph, batch, ctx, **trace)
    if not blocks:
        return dataclasses.replace(one, blocks=denoiser_blocks(session, components, one))
    # the same fake mode, the repeated components rebuilt with 2 blocks; only their units re-traced
    rebuilt = _fake_components(session, root, fake_mode, {n: {k: 2} for n, k in blocks.items()}, only=set(blocks))
    with fake_build(fake_mode, session.dtype):
        ctx = _context(session, {**components, **rebuilt}, cpu)
    retrace = {u.name for u in session.graph if set(u.components) & set(blocks)}
    with fake_mode:
        two, _ = trace_graph(session.graph, batch, ctx, reuse=(one, values), retrace=retrace, **trace)
    (count,) = {full_counts[n] for n in blocks}
    profile = extrapolate_profiles(one, two, count)
    return dataclasses.replace(
        profile,
        notes={
            **profile.notes,
            "extrapolated": {n: {"config_key": k, "traced": [1, 2], "to": full_counts[n]} for n, k in blocks.items()},
        },
        blocks=denoiser_blocks(session, components, profile, traces=(one, two), count=count),
    )


def denoiser_blocks(
    session: Session,
    components: dict[str, Any],
    profile: Profile,
    *,
    traces: tuple[Profile, Profile] | None = None,
    count: int | None = None,
) -> tuple[BlockProfile, ...]:
    """What block swapping and fp8 storage plan from: each of the trained denoiser's repeated-block
    lists (`Adapter.block_lists`), its bytes measured on the built module (LoRA attached) and its
    FLOPs from `traces` (the extrapolation's 1- and 2-block traces: their difference is one
    block, exactly) or else by the block's share of the denoiser's frozen bytes. `count` is the
    full block count of an extrapolated profile."""
    denoiser = session.trainable[0]
    module = components.get(denoiser)
    lists = session.adapter.block_lists.get(denoiser, ())
    measured = profile.component(denoiser)
    if module is None or measured is None or not lists:
        return ()
    users = [u.name for u in session.graph if denoiser in u.components]
    found = []
    for name in lists:
        blocks = list(getattr(module, name))
        if not blocks:
            continue
        sizes = max((_block_bytes(b) for b in blocks), key=lambda b: b["frozen_bytes"])
        if traces is not None:
            one, two = traces
            forward = sum(two.unit(u).flops - one.unit(u).flops for u in users)
            step, source = two.grad_step.flops - one.grad_step.flops, "traced 1 and 2 blocks"
        else:
            share = sizes["frozen_bytes"] / max(measured.frozen_bytes, 1)
            forward = int(share * sum(profile.unit(u).flops for u in users))
            step, source = int(share * profile.grad_step.flops), "weight share"
        found.append(
            BlockProfile(
                component=denoiser,
                module_list=name,
                count=count or len(blocks),
                **sizes,
                forward_flops=forward,
                step_flops=step,
                flops_from=source,
            )
        )
    return tuple(found)


def _block_bytes(block: torch.nn.Module) -> dict[str, int]:
    """One block's frozen bytes as stored (run dtype) and with its frozen Linear weights in fp8 plus
    a float32 scale per output channel; each also laid out in one 512 B-aligned buffer."""
    frozen = [t for *_, t in frozen_tensors(block)]
    linear = [m.weight for m in frozen_linears(block)]
    linear_ids = {id(w) for w in linear}
    rest = [t for t in frozen if id(t) not in linear_ids]
    fp8 = [torch.empty(w.shape, dtype=torch.uint8, device="meta") for w in linear]
    scales = [torch.empty(w.shape[0], dtype=torch.float32, device="meta") for w in linear]
    return {
        "frozen_bytes": sum(t.nbytes for t in frozen),
        "slot_bytes": layout_bytes(frozen),
        "fp8_frozen_bytes": sum(t.nbytes for t in rest + fp8 + scales),
        "fp8_slot_bytes": layout_bytes(rest + fp8 + scales),
        "linear_weight_elements": sum(w.numel() for w in linear),
        "max_linear_weight_bytes": max((w.nbytes for w in linear), default=0),
    }


def _config_value(session: Session, root: Path | None, name: str, key: str) -> int:
    module: Any = empty_component(session.adapter, root, name)  # a diffusers model: .config is its config
    return int(module.config[key])


def _profile_key(session: Session, batch: dict[str, Any]) -> str:
    """Everything a fake profile depends on: the configs (not the weights), graph, batch shape and
    the settings that change memory."""
    import hashlib
    import json

    import autosplit

    root = session.model_root
    configs = {
        str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.json")) if p.stat().st_size < 1 << 20
    }
    units = [[u.name, list(u.inputs), list(u.outputs), list(u.components), _code_digest(u.fn)] for u in session.graph]
    described = {k: [str(x) for x in v] for k, v in batch.items() if k not in ("image_path", "sample_id")}
    cfg = session.config
    key = {
        "version": autosplit.__version__,
        "torch": torch.__version__,
        "pipeline": session.adapter.name,
        "blocks": 1,  # profiles record the denoiser's repeated blocks (Profile.blocks)
        "task": session.task,
        "dtype": str(session.dtype),
        "configs": configs,
        "units": units,
        "batch": described,
        "lora": dataclasses.asdict(cfg.lora),
        "trainable": list(session.trainable),
        "checkpointing": cfg.train.gradient_checkpointing,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _code_digest(fn: Any) -> str:
    """What a unit's function computes, as far as its code shows: two graphs with the same unit
    names but other functions (a user's fused unit, say) do not share a memoized profile."""
    import hashlib
    import types

    def feed(code: types.CodeType) -> None:
        digest.update(code.co_code + repr((code.co_names, code.co_varnames)).encode())
        for const in code.co_consts:
            feed(const) if isinstance(const, types.CodeType) else digest.update(repr(const).encode())

    digest = hashlib.sha256()
    code = getattr(fn, "__code__", None)
    if code is None:
        return f"{type(fn).__module__}.{type(fn).__qualname__}"
    feed(code)
    for cell in getattr(fn, "__closure__", None) or ():  # wrappers differ by the function they wrap
        inner = getattr(cell.cell_contents, "__code__", None)
        if inner is not None:
            feed(inner)
    return digest.hexdigest()[:16]


def plan_profile(session: Session) -> Profile | None:
    """The profile `autosplit run` plans from: a fake profile of the configured model (memoized in
    $AUTOSPLIT_HOME/profiles by configs, graph, batch and settings), or a real one, or None when
    `plan.profile` is "none" or fake tracing cannot follow the model (data-dependent ops); the
    planner then uses the units' declarations."""
    import json
    import logging

    if session.config.plan.profile == "real":
        return profile_real(session)
    if session.config.plan.profile == "none":
        return None
    path = autosplit_home() / "profiles" / f"{_profile_key(session, profile_batch(session))}.json"
    if path.is_file():
        return Profile.from_dict(json.loads(path.read_text()))
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
    )

    try:
        profile = profile_fake(session, full_size=False)
    except (DataDependentOutputException, DynamicOutputShapeException) as exc:  # .item(), nonzero, ...
        logging.getLogger(__name__).warning(
            "fake profile failed (%s: %s); planning from the units' declarations "
            "(--profile real measures with the weights)",
            type(exc).__name__,
            exc,
        )
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(profile)}")
    tmp.write_text(json.dumps(profile.to_dict()))
    tmp.replace(path)
    return profile


def extrapolate_profiles(one: Any, two: Any, count: int) -> Any:
    """Linear extrapolation of every number from traces with 1 and 2 blocks to `count` blocks."""
    if dataclasses.is_dataclass(one) and not isinstance(one, type):
        return type(one)(
            **{
                f.name: extrapolate_profiles(getattr(one, f.name), getattr(two, f.name), count)
                for f in dataclasses.fields(one)
            }
        )
    if isinstance(one, tuple) and len(one) == len(two) and one and dataclasses.is_dataclass(one[0]):
        return tuple(extrapolate_profiles(a, b, count) for a, b in zip(one, two))
    if isinstance(one, bool) or not isinstance(one, (int, float)) or two is None:
        return two
    value = one + (two - one) * (count - 1)
    return int(value) if isinstance(one, int) else float(value)


def plan_run(session: Session) -> Plan:
    """The plan `autosplit run` executes: from the profile `plan.profile` asks for (see
    `plan_profile`), or from the units' declarations with `--profile none`."""
    if session.config.plan.profile == "none":
        return session.plan(None)
    session.models.check_present(sorted({c for u in session.graph for c in u.components}))
    return session.plan(plan_profile(session))


def profile_dtype(session: Session, *, fake: bool) -> torch.dtype:
    """The dtype a profile is made in: `autosplit plan --fake` with `--dtype auto` plans for a GPU,
    so bfloat16; otherwise the run's."""
    return torch.bfloat16 if fake and session.config.model.dtype == "auto" else session.dtype


def profile_as_asked(
    session: Session,
    *,
    fake: bool,
    image_size: tuple[int, int] | None = None,
    prompt_tokens: int | None = None,
    num_frames: int | None = None,
) -> Profile | None:
    """The profile `autosplit plan`, `profile` and `bench` make: fake and full-size with `fake`,
    else as `plan.profile` says (None for "none"); of a synthetic image (clip) of `image_size`
    (`num_frames`) and a prompt of about `prompt_tokens` tokens if given, else the dataset's first
    sample. Raises ConfigError for a frame count a video family cannot take."""
    if num_frames is not None:
        if session.adapter.media != "video":
            raise ConfigError(f"--num_frames: the {session.adapter.name} family trains on images; drop the flag")
        if image_size is None or num_frames < 1 or num_frames % 4 != 1:
            raise ConfigError(f"--num_frames {num_frames}: give 4k+1 frames (1, 5, ..., 81) with --image_size WxH")
    mode = "fake" if fake else session.config.plan.profile
    if mode == "none":
        return None
    if mode == "fake":
        session = dataclasses.replace(session, dtype=profile_dtype(session, fake=fake))
        return profile_fake(
            session, full_size=fake, image_size=image_size, prompt_tokens=prompt_tokens, num_frames=num_frames
        )
    return profile_real(session, image_size=image_size, prompt_tokens=prompt_tokens, num_frames=num_frames)
