"""Validation images during training (docs/training.md, "Validation images").

The prompts are encoded once, by the family's own prompt unit, and cached beside the training
data as `CACHE/validation.safetensors` (tensors only, never pickle; the prompts, the text
encoders' fingerprints and the settings in its metadata), so stage 2 samples them without ever
building a text encoder. Unsplit runs encode them in-process with the stage-1 text encoder, and a
run that trains a text encoder encodes them in stage 2 with it, every round.

Stage 2 samples with the trained denoiser (the family's `denoise` unit) in a diffusers scheduler's
loop as the family's pipeline does (`Adapter.sampling`), decodes with the VAE on the device the
plan chose, and writes `OUTPUT/samples/step-N/NN.png` and the trackers' images. A round runs
under `torch.no_grad()` in eval mode and draws from its own generators, seeded by the validation
seed: the training's RNG stream, and so its weights, are the same with and without it.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autosplit.adapters.base import Adapter, Sampling
from autosplit.errors import CacheError, ConfigError
from autosplit.graph import Unit, UnitContext
from autosplit.tasks import _seq_len, _shift_mu, objective

log = logging.getLogger(__name__)

#: the file beside the cache's arrays holding the validation prompts' encodings
FILE = "validation.safetensors"
FORMAT = "autosplit.validation/1"
#: the metadata entries a cached encoding must share with the run that reads it
_ENCODING_KEYS = ("format", "pipeline", "dtype", "prompts", "negative_prompt", "components")


@dataclass(frozen=True)
class ValidationSettings:
    """A run's validation images, resolved: guidance is the family's default where not given, the
    size in pixels, `decoder_device` where the VAE decodes."""

    prompts: tuple[str, ...]
    negative_prompt: str
    #: a round every this many optimizer steps (0: only after the last step)
    every_steps: int
    num_images: int
    num_steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    decoder_device: torch.device


@dataclass(frozen=True)
class ValidationJob:
    """What stage 2 samples: the settings and the prompts' encodings (rows: the prompts, then the
    negative prompt for a CFG family), or None for stage 2 to encode them with the text encoders
    it holds (unsplit, or a trained text encoder)."""

    settings: ValidationSettings
    encodings: Mapping[str, torch.Tensor] | None = None


def sampling_of(adapter: Adapter) -> Sampling:
    """The family's sampling recipe; ConfigError for a family that has none."""
    if adapter.sampling is None:
        raise ConfigError(
            f"--validation_prompt: the {adapter.name} family has no sampling recipe for validation images "
            f"(the built-in families have); drop --validation_prompt"
        )
    return adapter.sampling


def prompt_unit(adapter: Adapter) -> Unit:
    """The family's prompt-encoding unit (the one that reads only `prompt`)."""
    unit = next((u for u in adapter.family_units() if u.inputs == ("prompt",)), None)
    if unit is None:
        raise ConfigError(f"--validation_prompt: the {adapter.name} family has no prompt unit to encode it with")
    return unit


def prompt_rows(adapter: Adapter, prompts: Sequence[str], negative_prompt: str) -> list[str]:
    """The texts that are encoded, in row order: the prompts, then the negative prompt for a family
    that samples with classifier-free guidance (always encoded, so the cache is the same at any
    guidance scale)."""
    return [*prompts, *([negative_prompt] if sampling_of(adapter).guidance == "cfg" else [])]


@torch.no_grad()
def encode_prompts(
    adapter: Adapter, rows: Sequence[str], components: Mapping[str, Any], *, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The prompt unit's outputs on `rows` (one batch), with `components` holding its text encoders."""
    unit = prompt_unit(adapter)
    ctx = UnitContext(components, device, dtype)
    with eval_mode([c for c in components.values() if isinstance(c, torch.nn.Module)]):
        return {k: v for k, v in unit({"prompt": list(rows)}, ctx).items() if v is not None}


def encoding_metadata(
    adapter: Adapter, settings: ValidationSettings, *, dtype: torch.dtype, fingerprints: Mapping[str, str]
) -> dict[str, str]:
    """What a cached encoding depends on (checked) and the settings it was made for (recorded)."""
    recorded = {
        "width": settings.width,
        "height": settings.height,
        "num_inference_steps": settings.num_steps,
        "guidance_scale": settings.guidance_scale,
        "seed": settings.seed,
        "num_images": settings.num_images,
    }
    return {
        "format": FORMAT,
        "pipeline": adapter.name,
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": json.dumps(list(settings.prompts)),
        "negative_prompt": settings.negative_prompt,
        "components": json.dumps(dict(sorted(fingerprints.items()))),
        "settings": json.dumps(recorded),
    }


def write_encodings(path: Path, encodings: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write the encodings and their metadata to `path` (safetensors; replaced whole)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in encodings.items()}, str(tmp), metadata=dict(metadata))
    tmp.replace(path)


def read_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of the cached encodings at `path` (None if there is no such file)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # a damaged file: safetensors raises its own error types
        raise CacheError(f"{path}: not a readable safetensors file ({exc}); delete it and re-run stage 1") from None


def stale_entry(found: Mapping[str, str] | None, expected: Mapping[str, str]) -> str | None:
    """What differs between cached encodings' metadata and this run's (None: they are current)."""
    if found is None:
        return "stage 1 encoded none (no such file)"
    for key in _ENCODING_KEYS:
        if found.get(key) != expected[key]:
            if key == "components":
                names = json.loads(found.get(key) or "{}"), json.loads(expected[key])
                changed = sorted(k for k in {*names[0], *names[1]} if names[0].get(k) != names[1].get(k))
                return f"it was made with other text encoder weights ({', '.join(changed)})"
            what = key.replace("_", " ")
            return f"it was made for {what} {_shown(key, found.get(key))}, this run has {_shown(key, expected[key])}"
    return None


def _shown(key: str, value: str | None) -> str:
    """A metadata entry as the error shows it: the prompts as a list, text quoted, cut at 100."""
    text = repr(json.loads(value)) if key == "prompts" and value else repr(value) if value is not None else "(none)"
    return text if len(text) <= 100 else text[:97] + "..."


def read_encodings(path: Path, expected: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The cached encodings at `path`; CacheError (one line: what changed and the fix) when they
    are missing or were made for other prompts, another negative prompt, text encoder, dtype or family."""
    from safetensors.torch import load_file

    problem = stale_entry(read_metadata(path), expected)
    if problem is not None:
        raise CacheError(
            f"{path}: the cached validation prompts do not fit this run: {problem}; re-run stage 1 with this "
            f"run's --validation_prompt flags (--task sft:data_process, or `autosplit run`, which encodes them "
            f"again), or pass the prompts stage 1 encoded"
        )
    return load_file(str(path))


def recorded_size(path: Path) -> tuple[int, int] | None:
    """The (width, height) the cached encodings were made for, if there are any."""
    meta = read_metadata(path)
    if not meta or "settings" not in meta:
        return None
    recorded = json.loads(meta["settings"])
    return int(recorded["width"]), int(recorded["height"])


@contextmanager
def eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Every submodule of `modules` in eval mode inside, each back in its own mode after."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def used_length(t: torch.Tensor) -> int:
    """One row's length along its first axis: the last position that is non-zero."""
    nonzero = t.reshape(t.shape[0], -1).ne(0).any(dim=1).nonzero()
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """Decoded images (B,3,H,W in [-1, 1]) -> H x W x 3 uint8 arrays, as diffusers' image
    processor makes its PIL images."""
    images = (images * 0.5 + 0.5).clamp(0, 1)
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return list((array * 255).round().astype(np.uint8))


def sampling_scheduler(scheduler: Any) -> Any:
    """The scheduler validation samples with, a copy (the training's keeps its own state): the
    family's own class for flow matching (FlowMatchEuler, Wan's UniPC), Euler for DDPM families."""
    if objective(scheduler) == "flow":
        return type(scheduler).from_config(scheduler.config)
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(scheduler.config)


def set_timesteps(scheduler: Any, num_steps: int, latents: torch.Tensor, *, patch_size: int) -> None:
    """Timesteps as the family's pipeline sets them: FlowMatchEuler (Qwen-Image, FLUX) on
    linspace(1, 1/n, n) shifted by the image's token count; any other scheduler with n steps."""
    device = latents.device
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        mu = _shift_mu(scheduler, _seq_len(latents, patch_size))
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    else:
        scheduler.set_timesteps(num_steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)


class Validator:
    """Stage 2's validation rounds (main process only). `components` hold the trained denoiser
    (unwrapped) and whatever else the run has loaded (stage 2's components, and unsplit's stage-1
    ones); the VAE decoder is taken from them, or loaded by `load_vae` (on the host, moved to the
    decoder's device for each decode)."""

    def __init__(
        self,
        job: ValidationJob,
        *,
        adapter: Adapter,
        components: Mapping[str, Any],
        trained: tuple[str, ...],
        load_vae: Any,
        device: torch.device,
        dtype: torch.dtype,
        output: Path,
        unit_settings: Mapping[str, Any],
    ):
        self.settings, self.adapter, self.sampling = job.settings, adapter, sampling_of(adapter)
        self.components, self.trained = dict(components), trained
        self.device, self.dtype, self.output = device, dtype, output
        self.unit_settings = dict(unit_settings)
        units = {u.name: u for u in adapter.family_units()}
        self.denoise, self.encode = units["denoise"], prompt_unit(adapter)
        self.extra_units = [u for u in units.values() if u.inputs and set(u.inputs) <= {"image_size"}]
        self.encodings = dict(job.encodings) if job.encodings is not None else None
        #: a trained text encoder changes every step: its prompts are encoded again every round
        self.encode_every_round = any(c in trained for c in self.encode.components)
        self.vae, self.vae_home = self._decoder(load_vae)
        self.scheduler = sampling_scheduler(self.components["scheduler"])
        self.last_step: int | None = None

    def _decoder(self, load_vae: Any) -> tuple[Any, torch.device]:
        """The VAE to decode with and where it lives between rounds: the run's own if it has one on
        the decoder's device (unsplit, or a VAE in stage 2), else one loaded on the host."""
        vae = self.components.get("vae")
        target = self.settings.decoder_device
        if vae is not None and next(vae.parameters()).device.type == target.type:
            return vae, target
        vae = load_vae()
        return vae, next(vae.parameters()).device

    def due(self, step: int) -> bool:
        every = self.settings.every_steps
        return bool(every) and step % every == 0

    def run(self, step: int, run_log: Any) -> None:
        """One round at optimizer step `step`: sample every prompt, write the PNGs, log the images."""
        from PIL import Image

        start = time.perf_counter()
        s = self.settings
        modules = [self.components[name] for name in self.trained]
        with torch.no_grad(), eval_mode(modules):
            encodings = self._encodings()
            cond_rows, uncond = self._conditions(encodings)
            latents = [self._sample(cond, uncond, seed=s.seed + k) for cond in cond_rows for k in range(s.num_images)]
            arrays = self._decode(latents)
        folder = self.output / "samples" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, array in enumerate(arrays):
            Image.fromarray(array).save(folder / f"{i:02d}.png")
        captions = [prompt for prompt in s.prompts for _ in range(s.num_images)]
        run_log.log_images("validation", arrays, step=step, captions=captions)
        self.last_step = step
        peak = ""
        if self.device.type == "cuda":
            peak = f", peak allocated so far {torch.cuda.max_memory_allocated(self.device) / (1 << 30):.2f} GiB"
        log.info(
            "validation at step %d: %d images of %dx%d in %.1f s (VAE decoder on %s)%s; %s",
            step,
            len(arrays),
            s.width,
            s.height,
            time.perf_counter() - start,
            s.decoder_device,
            peak,
            folder,
        )

    def _encodings(self) -> dict[str, torch.Tensor]:
        if self.encodings is not None and not self.encode_every_round:
            return self.encodings
        rows = prompt_rows(self.adapter, self.settings.prompts, self.settings.negative_prompt)
        encoders = {name: self.components[name] for name in self.encode.components}
        encodings = encode_prompts(self.adapter, rows, encoders, device=self.device, dtype=self.dtype)
        if not self.encode_every_round:
            self.encodings = encodings
        return encodings

    def _conditions(self, encodings: Mapping[str, torch.Tensor]) -> tuple[list[dict[str, Any]], dict | None]:
        """Each prompt's conditioning (its row, cut to its own length as stage 1 caches text), and the
        negative prompt's when the family guides with CFG at a scale above 1."""
        ragged = set(self.adapter.value_layouts())
        s = self.settings
        extra = self._extra_values()

        def row(i: int) -> dict[str, Any]:
            values = {k: v[i : i + 1].to(self.device) for k, v in encodings.items()}
            cut = [k for k in values if k in ragged]
            if cut:
                length = max(used_length(values[k][0]) for k in cut)
                values = {k: v[:, :length] if k in cut else v for k, v in values.items()}
            return {**values, **extra}

        conds = [row(i) for i in range(len(s.prompts))]
        if self.sampling.guidance != "cfg" or s.guidance_scale <= 1:
            return conds, None
        uncond = row(len(s.prompts))
        if self.sampling.zero_empty_negative and s.negative_prompt == "":
            uncond = {k: torch.zeros_like(v) if k in encodings else v for k, v in uncond.items()}
        return conds, uncond

    def _extra_values(self) -> dict[str, Any]:
        """Conditioning the denoiser reads besides the text (SDXL's size ids), from the image size."""
        values: dict[str, Any] = {"image_size": [(self.settings.width, self.settings.height)]}
        ctx = UnitContext(self.components, self.device, self.dtype, settings=self.unit_settings)
        for unit in self.extra_units:
            values.update(unit(values, ctx))
        del values["image_size"]
        return values

    def _sample(self, cond: dict[str, Any], uncond: dict[str, Any] | None, *, seed: int) -> torch.Tensor:
        """One image's latents: the scheduler's loop from the noise of `seed`, as the pipeline runs it."""
        s, scheduler = self.settings, self.scheduler
        vae_config = self.vae.config
        shape = (1, *self.sampling.latent_shape(vae_config, s.width, s.height))
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        set_timesteps(scheduler, s.num_steps, latents, patch_size=self.unit_settings.get("patch_size", 2))
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        guidance = None
        denoiser = self.components[self.trained[0]]
        if self.sampling.guidance == "embedded" and getattr(denoiser.config, "guidance_embeds", False):
            guidance = torch.full([1], s.guidance_scale, dtype=torch.float32)
        ctx = UnitContext(self.components, self.device, self.dtype, settings=self.unit_settings)
        # a stochastic step (Euler with churn) draws from this image's generator, never torch's global one
        draws = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
            step = {"noisy_latents": x, "timestep": t.expand(1).to(self.device), "guidance": guidance}
            pred = self.denoise.fn({**cond, **step}, ctx)["model_pred"].float()
            if uncond is not None:
                negative = self.denoise.fn({**uncond, **step}, ctx)["model_pred"].float()
                combine = self.sampling.combine
                pred = (
                    combine(pred, negative, s.guidance_scale)
                    if combine
                    else negative + s.guidance_scale * (pred - negative)
                )
            latents = scheduler.step(pred, t, latents, return_dict=False, **draws)[0]
        return latents

    def _decode(self, latents: list[torch.Tensor]) -> list[np.ndarray]:
        """Decode each image alone, as the plan measured it, on the decoder's device (the VAE comes
        there for the round's decodes and goes back after)."""
        target = self.settings.decoder_device
        moved = self.vae_home.type != target.type
        vae = self.vae.to(target) if moved else self.vae
        try:
            ctx = UnitContext({"vae": vae}, target, vae.dtype)
            return [to_uint8(self.sampling.decode({"latents": one.to(target)}, ctx)["image"])[0] for one in latents]
        finally:
            if moved:
                self.vae.to(self.vae_home)


def measure_decode_peak(adapter: Adapter, vae: torch.nn.Module, latent_shape: tuple[int, ...]) -> int:
    """Peak bytes of decoding one image of `latent_shape` with `vae` (a fake module, built inside a
    FakeTensorMode), measured by the profiler's storage tracker above the latents."""
    from autosplit.planning.tracer import profile_unit

    sampling = sampling_of(adapter)
    unit = Unit("decode_image", ("latents",), ("image",), sampling.decode, components=("vae",))
    dtype = next(vae.parameters()).dtype
    ctx = UnitContext({"vae": vae}, torch.device("cpu"), dtype)
    latents = torch.zeros((1, *latent_shape), dtype=dtype)
    with torch.no_grad():
        measured, _ = profile_unit(unit, {"latents": latents}, ctx, set())
    return int(measured.peak_bytes)
