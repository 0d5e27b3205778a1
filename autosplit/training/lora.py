"""What trains: LoRA adapters on the trained components (peft), or every weight for full
fine-tuning; how the trained weights are written so diffusers, transformers and peft load them;
and LoRA files in other tools' key formats (kohya-ss, ComfyUI), written, read and converted.

A LoRA file in any format is read into `LoraLayer`s by diffusers module path (what peft trains)
and written from them; the family's adapter says how its format names each layer
(`Adapter.lora_naming`), this module does the rest the same way for every family.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autosplit.adapters.base import Adapter, LoraNaming, empty_component, save_lora
from autosplit.config import LORA_FORMATS, LoraConfig
from autosplit.errors import ConfigError

LORA_WEIGHT_NAME = "lora.safetensors"
#: where diffusers keeps the peft config of each component in a LoRA file's safetensors header
METADATA_KEY = "lora_adapter_metadata"
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_PEFT_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".alpha": "alpha",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
}
#: components a diffusers LoRA file may hold besides the denoiser
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

#: a text encoder's LoRA targets when `lora.text_encoder_target_modules` is empty: the attention
#: projections it has (Qwen2.5-VL and CLIP: q/k/v_proj + o_proj/out_proj; T5: q, k, v, o)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "q", "k", "v", "o")


def check_lora_targets(model: torch.nn.Module, targets: list[str], *, component: str) -> None:
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"--lora_target_modules: {unknown} match no module of {component}; "
            f"Linear module names there include {leaves[:12]}"
        )


def lora_targets(
    lora: LoraConfig, adapter: Adapter, *, denoiser: bool, model: torch.nn.Module | None = None
) -> list[str]:
    """`--lora_target_modules` (the denoiser) or `lora.text_encoder_target_modules`, or the default
    list when empty: the family's for the denoiser; for a text encoder, the projections `model` has."""
    given = lora.target_modules if denoiser else lora.text_encoder_target_modules
    targets = [t.strip() for t in given.split(",") if t.strip()]
    if targets:
        return targets
    if denoiser:
        return list(adapter.default_lora_targets)
    names = {
        name.rsplit(".", 1)[-1]
        for name, m in (model.named_modules() if model is not None else ())
        if isinstance(m, torch.nn.Linear)
    }
    return [t for t in TEXT_ENCODER_TARGETS if t in names]


#: module types peft wraps with a LoRA (the ones autosplit's families target)
_LORA_MODULE_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)


def targeted_modules(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The modules of `model` peft gives a LoRA for `targets` (name suffixes), by path."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, _LORA_MODULE_TYPES) and any(name == t or name.endswith("." + t) for t in targets)
    ]


def check_trainable_early(lora: LoraConfig, adapter: Adapter, root: Path, trained: tuple[str, ...]) -> None:
    """Check the LoRA target modules on a weightless copy of each trained component, so a typo
    fails before stage 1 rather than after it; and that `lora.format` can name every LoRA layer
    and the `lora.checkpoint` file fits them (modules, rank, alpha)."""
    if lora.full_finetune:
        if lora.format != "diffusers" or lora.checkpoint:
            raise ConfigError("--lora_format and --lora_checkpoint are about LoRA files; drop them or --full_finetune")
        return
    modules, config = {}, None
    for name in trained:
        model = empty_component(adapter, root, name)
        targets = lora_targets(lora, adapter, denoiser=name == trained[0], model=model)
        check_lora_targets(model, targets, component=name)
        modules[name] = targeted_modules(model, targets)
        config = getattr(model, "config", None) if name == trained[0] else config
    if lora.format != "diffusers":
        naming = adapter.lora_naming(lora.format, denoiser_config=config)
        native_groups(
            {c: m for c, m in modules.items() if c in naming.prefixes},
            naming,
            flag=f"--lora_format {lora.format}",
            family=adapter.name,
        )
    if lora.checkpoint:
        for name, names in modules.items():
            layers = _component_start(Path(lora.checkpoint), name, adapter, config)
            check_start(
                layers,
                names,
                component=name,
                rank=lora.rank,
                alpha=lora.alpha or lora.rank,
                source=Path(lora.checkpoint),
            )


def make_trainable(
    module: torch.nn.Module,
    component: str,
    *,
    lora: LoraConfig,
    adapter: Adapter,
    denoiser: bool,
    seed: int,
    gradient_checkpointing: bool,
) -> list[torch.nn.Parameter]:
    """Attach the LoRA (or unfreeze for full fine-tuning); return the trainable parameters (fp32)."""
    model: Any = module  # a diffusers or transformers model: add_adapter, peft_config, checkpointing hooks
    if lora.full_finetune:
        model.requires_grad_(True)
    else:
        from peft import LoraConfig as PeftLoraConfig

        targets = lora_targets(lora, adapter, denoiser=denoiser, model=model)
        check_lora_targets(model, targets, component=component)
        torch.manual_seed(seed)  # LoRA init draws from the global RNG
        config = PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha or lora.rank,  # type: ignore[arg-type]
            target_modules=targets,
        )  # (peft annotates int; a float alpha works)
        if denoiser and hasattr(model, "add_adapter"):
            model.add_adapter(config)  # diffusers' PEFT integration
        else:  # a text encoder, or a plain module: peft directly (transformers' add_adapter wants a newer peft)
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, model, adapter_name="default")
            model.peft_config = {"default": config}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # train in fp32 even when the frozen weights are bf16
        p.data = p.data.float()
    if lora.checkpoint and not lora.full_finetune and _holds_values(params):  # not a profile's fake copy
        start_from_lora_file(model, component, Path(lora.checkpoint), adapter=adapter)  # no optimizer state
    if gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()  # diffusers models; a text encoder keeps its activations
    model.train()
    return params


def _holds_values(params: list[torch.nn.Parameter]) -> bool:
    """False for the weightless (meta) or fake-tensor copies profiling builds."""
    from torch._subclasses.fake_tensor import FakeTensor

    return bool(params) and not any(p.is_meta or isinstance(p, FakeTensor) for p in params)


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors' dtypes, shapes and bytes, in name order: equal digests mean bit-identical
    weights. Names are not hashed, so the saved LoRA file (its keys prefixed with the component)
    digests as the state dict does. Ranks of a DDP run log theirs to show they agree."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_peft_adapter(folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """A LoRA in PEFT's folder format (`adapter_config.json`, `adapter_model.safetensors`), which
    `peft.PeftModel.from_pretrained(model, folder)` and transformers' `model.load_adapter(folder)` load."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors")


def save_trained(
    models: dict[str, torch.nn.Module],
    output: Path,
    *,
    adapter: Adapter,
    full_finetune: bool,
    write: bool,
    lora_format: str = "diffusers",
) -> str:
    """Write the trained weights (when `write`: the main process); return this rank's digest of them.

    LoRAs go to `lora.safetensors` through the family's diffusers pipeline for every component its
    `save_lora_weights` takes (the denoiser; SD, SDXL and FLUX text encoders too); a text encoder
    it does not take (Qwen-Image's, Wan's) is saved as a PEFT adapter folder, `<component>_lora/`,
    which `model.load_adapter(folder)` loads. With `lora_format` kohya or comfyui, the same LoRA
    is also written as `lora_<format>.safetensors` in that format. Full fine-tuning saves each
    component's folder.
    """
    if full_finetune:
        digest = weights_digest({f"{c}.{n}": p for c, m in models.items() for n, p in m.named_parameters()})
        if write:
            for name, model in models.items():
                saved: Any = model  # diffusers / transformers models save themselves
                saved.save_pretrained(output / name, safe_serialization=True)
        return digest
    from peft.utils import get_peft_model_state_dict

    states = {name: get_peft_model_state_dict(model) for name, model in models.items()}
    if write:
        peft: dict[str, Any] = {name: getattr(model, "peft_config", None) for name, model in models.items()}
        layers: dict[str, tuple[dict[str, torch.Tensor], Any]] = {
            name: (state, peft[name]["default"].to_dict() if peft[name] is not None else None)
            for name, state in states.items()
        }
        for name in save_lora(adapter, output, layers, weight_name=LORA_WEIGHT_NAME):
            save_peft_adapter(output / f"{name}_lora", *layers[name])
        if lora_format != "diffusers":
            config = getattr(next(iter(models.values())), "config", None)  # the denoiser comes first
            convert_lora_file(
                output / LORA_WEIGHT_NAME,
                output / f"lora_{lora_format}.safetensors",
                adapter=adapter,
                to=lora_format,
                denoiser_config=config,
            )
    return weights_digest({f"{c}.{n}": t for c, state in states.items() for n, t in state.items()})


# --- LoRA files in other tools' formats -------------------------------------------------------


@dataclass(frozen=True)
class LoraLayer:
    """One module's LoRA: `down` (lora_A, rank x in_features), `up` (lora_B, out_features x rank)
    and `alpha`; the module's weight moves by up @ down x alpha / rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


#: component -> diffusers module path (as peft names it) -> its LoRA
LoraLayers = dict[str, dict[str, LoraLayer]]


def unflatten(flat: str, words: frozenset[str]) -> str:
    """A kohya key's module name with its dots back: `_` joins the tokens of `words` ("to_q"),
    every other `_` was a dot."""
    tokens, out, i = flat.split("_"), [], 0
    patterns = sorted((tuple(w.split("_")) for w in words), key=len, reverse=True)
    while i < len(tokens):
        word = next((w for w in patterns if tuple(tokens[i : i + len(w)]) == w), (tokens[i],))
        out.append("_".join(word))
        i += len(word)
    return ".".join(out)


def read_safetensors(path: Path, *, flag: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a safetensors file; ConfigError naming `flag` if unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{flag} {path}: not a readable safetensors file ({exc}); give a LoRA .safetensors") from exc


def lora_format_of(
    state: Mapping[str, torch.Tensor], adapter: Adapter, *, where: str, denoiser_config: Mapping[str, Any] | None = None
) -> str:
    """The format a LoRA state dict is in: the first of kohya, comfyui whose key prefixes every key
    has, else diffusers (keys `<component>.<module>.lora_A.weight`, the family's denoiser among the
    components). Raises ConfigError for keys of another family or of no format."""
    prefixes: list[str] = []
    for fmt in LORA_FORMATS[1:]:
        try:
            naming = adapter.lora_naming(fmt, denoiser_config=denoiser_config)
        except ConfigError:
            continue
        prefixes += naming.prefixes.values()
        if state and all(k.startswith(tuple(naming.prefixes.values())) for k in state):
            return fmt
    components = {k.partition(".")[0] for k in state}
    denoiser = adapter.base_model_aliases["dit"]
    if not state or denoiser not in components or not components <= {denoiser, *_TEXT_ENCODERS}:
        example = next(iter(sorted(state)), "(none)")
        raise ConfigError(
            f"{where}: its keys ({example}, ...) are no {adapter.name} LoRA: {adapter.name}'s start with "
            f"{denoiser}. (diffusers) or {', '.join(dict.fromkeys(prefixes))}; pass the --pipeline of "
            f"the family it was trained for"
        )
    return "diffusers"


def load_lora_file(
    path: Path, adapter: Adapter, *, flag: str, denoiser_config: Mapping[str, Any] | None = None
) -> tuple[str, LoraLayers]:
    """(its format, its layers) of a LoRA file in any format `adapter`'s family has. Raises
    ConfigError naming `flag` and the file for an unreadable file or keys of no known place."""
    state, metadata = read_safetensors(path, flag=flag)
    where = f"{flag} {path}"
    fmt = lora_format_of(state, adapter, where=where, denoiser_config=denoiser_config)
    if fmt == "diffusers":
        return fmt, _layers_from_diffusers(state, _peft_configs(metadata), where=where)
    return fmt, _layers_from_native(
        state, adapter.lora_naming(fmt, denoiser_config=denoiser_config), where=where, family=adapter.name
    )


def save_lora_file(
    path: Path,
    layers: LoraLayers,
    *,
    fmt: str,
    adapter: Adapter,
    denoiser_config: Mapping[str, Any] | None = None,
    flag: str = "--lora_format",
) -> None:
    """Write `layers` as a LoRA file in format `fmt` (diffusers: the keys and peft metadata
    `save_lora_weights` writes). Raises ConfigError, naming `flag`, for a layer the format cannot name."""
    from safetensors.torch import save_file

    if fmt == "diffusers":
        state, metadata = _diffusers_state(layers)
    else:
        naming = adapter.lora_naming(fmt, denoiser_config=denoiser_config)
        state, metadata = _native_state(layers, naming, flag=f"{flag} {fmt}", family=adapter.name), {"format": "pt"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for key in sorted(state):  # parts of an unfused layer may share one down weight: safetensors wants copies
        tensor = state[key].contiguous()
        tensors[key] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    save_file(tensors, str(path), metadata=metadata)


def convert_lora_file(
    source: Path, target: Path, *, adapter: Adapter, to: str, denoiser_config: Mapping[str, Any] | None = None
) -> tuple[str, int]:
    """Convert the LoRA file `source` (any format) to format `to` at `target`; returns (the source's
    format, the number of layers). Converting there and back gives the same tensors."""
    fmt, layers = load_lora_file(source, adapter, flag="convert-lora", denoiser_config=denoiser_config)
    save_lora_file(target, layers, fmt=to, adapter=adapter, denoiser_config=denoiser_config, flag="convert-lora --to")
    return fmt, sum(len(m) for m in layers.values())


def _split_suffix(rest: str, *, key: str, where: str) -> tuple[str, str]:
    for suffix, kind in {**_PEFT_SUFFIXES, **_KOHYA_SUFFIXES}.items():
        if rest.endswith(suffix):
            return rest[: -len(suffix)], kind
    raise ConfigError(
        f"{where}: key {key!r} is no LoRA weight autosplit reads (lora_A/lora_B, lora_down/lora_up, "
        f"alpha); DoRA, LoHa and LoKr files are not supported"
    )


def _assemble(parts: Mapping[tuple[str, str], Mapping[str, torch.Tensor]], *, alpha_of: Any, where: str) -> LoraLayers:
    layers: LoraLayers = {}
    for (component, module), found in sorted(parts.items()):
        if "down" not in found or "up" not in found:
            raise ConfigError(
                f"{where}: the LoRA of {component} module {module!r} lacks its "
                f"{'down (lora_A)' if 'down' not in found else 'up (lora_B)'} weight; the file is cut"
            )
        rank = int(found["down"].shape[0])
        alpha = float(found["alpha"].item()) if "alpha" in found else alpha_of(component, module, rank)
        layers.setdefault(component, {})[module] = LoraLayer(found["down"], found["up"], alpha)
    return layers


def _peft_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """component -> its peft config fields, from a diffusers file's header."""
    configs: dict[str, dict[str, Any]] = {}
    for key, value in json.loads(metadata.get(METADATA_KEY) or "{}").items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _config_alpha(config: Mapping[str, Any] | None, module: str, rank: int) -> float:
    """A module's alpha from its component's peft config (alpha_pattern, else lora_alpha); the
    rank (scale 1, as diffusers assumes) without a config."""
    import re

    if not config:
        return float(rank)
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return float(alpha)
    return float(config.get("lora_alpha") or rank)


def _layers_from_diffusers(
    state: Mapping[str, torch.Tensor], configs: Mapping[str, dict[str, Any]], *, where: str
) -> LoraLayers:
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        module, kind = _split_suffix(rest, key=key, where=where)
        parts[(component, module)][kind] = tensor
    return _assemble(parts, alpha_of=lambda c, m, r: _config_alpha(configs.get(c), m, r), where=where)


def _layers_from_native(
    state: Mapping[str, torch.Tensor], naming: LoraNaming, *, where: str, family: str
) -> LoraLayers:
    prefixes = sorted(naming.prefixes.items(), key=lambda item: -len(item[1]))
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, tensor in state.items():
        component, prefix = next((c, p) for c, p in prefixes if key.startswith(p))
        rest = key[len(prefix) :]
        if prefix.endswith("_"):  # kohya: the module's dots are underscores
            flat, _, suffix = rest.partition(".")
            _, kind = _split_suffix(f"x.{suffix}", key=key, where=where)
            module = unflatten(flat, naming.words)
        else:
            module, kind = _split_suffix(rest, key=key, where=where)
        parts[(component, module)][kind] = tensor
    layers: LoraLayers = {}
    for component, modules in _assemble(parts, alpha_of=lambda c, m, r: float(r), where=where).items():
        for native, layer in modules.items():
            try:
                targets = naming.to_diffusers(component, native)
            except KeyError:
                raise ConfigError(
                    f"{where}: its layer {naming.prefixes[component]}{native} names no {component} "
                    f"module of {family}; is it a LoRA of another model family (--pipeline)?"
                ) from None
            for module, part in zip(targets, _unfuse(layer, native, len(targets), naming), strict=True):
                layers.setdefault(component, {})[module] = part
    return layers


def native_groups(
    modules: Mapping[str, Iterable[str]], naming: LoraNaming, *, flag: str, family: str
) -> dict[tuple[str, str], list[str]]:
    """(component, the format's module) -> the diffusers modules it holds, in part order, for the
    LoRA `modules` (component -> module paths). Raises ConfigError, naming `flag` (e.g.
    "--lora_format kohya"), for a module the format cannot name, or a fused layer of which only
    some parts are trained."""
    parts: dict[tuple[str, str], dict[int, str]] = {}
    for component, names in modules.items():
        if component not in naming.prefixes:
            raise ConfigError(
                f"{flag}: {family}'s files in that format hold no {component} LoRA; use the "
                f"diffusers format, or do not train {component}"
            )
        for module in names:
            try:
                native, part = naming.to_native(component, module)
            except KeyError:
                raise ConfigError(
                    f"{flag}: {family}'s {component} module {module!r} has no name in that format; "
                    f"leave it out of --lora_target_modules or use the diffusers format"
                ) from None
            flat = native.replace(".", "_")
            if naming.prefixes[component].endswith("_") and unflatten(flat, naming.words) != native:
                raise ConfigError(
                    f"{flag}: {family}'s {component} module {module!r} ({native}) cannot be read "
                    f"back from its flattened key name {flat!r}; use the diffusers format"
                )
            parts.setdefault((component, native), {})[part] = module
    groups = {}
    for (component, native), found in parts.items():
        expected = naming.to_diffusers(component, native)
        if sorted(found) != list(range(len(expected))):
            raise ConfigError(
                f"{flag}: {family} stores {list(expected)} as one layer ({native}) in that format; "
                f"train all of them or none (this LoRA has {sorted(found.values())})"
            )
        groups[(component, native)] = [found[k] for k in range(len(expected))]
    return groups


def _native_state(layers: LoraLayers, naming: LoraNaming, *, flag: str, family: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for (component, native), members in native_groups(layers, naming, flag=flag, family=family).items():
        parts = [layers[component][m] for m in members]
        layer = _fuse(parts, native=native) if len(parts) > 1 else parts[0]
        prefix = naming.prefixes[component]
        if prefix.endswith("_"):
            key = prefix + native.replace(".", "_")
            state |= {
                f"{key}.lora_down.weight": layer.down,
                f"{key}.lora_up.weight": layer.up,
                f"{key}.alpha": torch.tensor(layer.alpha, dtype=torch.float32),
            }
        else:
            key = prefix + native
            state |= {f"{key}.lora_A.weight": layer.down, f"{key}.lora_B.weight": layer.up}
            if layer.alpha != layer.rank:  # absent means alpha = rank, to every reader
                state[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return state


def _fuse(parts: list[LoraLayer], *, native: str) -> LoraLayer:
    """One LoRA of rank n x r for n parts of rank r: downs stacked, ups block-diagonal, alpha n x
    alpha, so each part's update (and scale alpha / rank) is unchanged."""
    if len({(p.rank, p.alpha) for p in parts}) != 1:
        raise ConfigError(f"the parts of {native} have different ranks or alphas; they cannot be fused")
    return LoraLayer(
        torch.cat([p.down for p in parts]), torch.block_diag(*[p.up for p in parts]), parts[0].alpha * len(parts)
    )


def _unfuse(layer: LoraLayer, native: str, num_parts: int, naming: LoraNaming) -> list[LoraLayer]:
    """The parts of a fused LoRA: block-diagonal (as `_fuse` writes it) splits into its blocks;
    otherwise each part keeps the whole down weight and its rows of the up weight."""
    if num_parts == 1:
        return [layer]
    assert naming.split_rows is not None  # a family with fused layers says how to split them
    rows = naming.split_rows(native, int(layer.down.shape[1]), int(layer.up.shape[0]))
    ups = torch.split(layer.up, rows, dim=0)
    rank = layer.rank // num_parts
    if layer.rank % num_parts == 0 and all(
        not up[:, : k * rank].any() and not up[:, (k + 1) * rank :].any() for k, up in enumerate(ups)
    ):
        downs = torch.split(layer.down, rank, dim=0)
        return [
            LoraLayer(d, up[:, k * rank : (k + 1) * rank], layer.alpha / num_parts)
            for k, (d, up) in enumerate(zip(downs, ups, strict=True))
        ]
    return [LoraLayer(layer.down, up, layer.alpha) for up in ups]


def _diffusers_state(layers: LoraLayers) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keys and header as diffusers' `save_lora_weights` writes them (peft's r, lora_alpha and
    their per-module patterns, by component)."""
    state: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    for component, modules in layers.items():
        for module, layer in modules.items():
            state[f"{component}.{module}.lora_A.weight"] = layer.down
            state[f"{component}.{module}.lora_B.weight"] = layer.up
        rank = collections.Counter(x.rank for x in modules.values()).most_common(1)[0][0]
        alpha = collections.Counter(x.alpha for x in modules.values()).most_common(1)[0][0]
        config |= {
            f"{component}.{k}": v
            for k, v in {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": alpha,
                "target_modules": sorted(modules),
                "rank_pattern": {m: x.rank for m, x in modules.items() if x.rank != rank},
                "alpha_pattern": {m: x.alpha for m, x in modules.items() if x.alpha != alpha},
                "use_dora": False,
                "lora_bias": False,
                "bias": "none",
            }.items()
        }
    return state, {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


# --- starting from a LoRA file (--lora_checkpoint) --------------------------------------------


def _component_start(
    path: Path, component: str, adapter: Adapter, denoiser_config: Mapping[str, Any] | None
) -> dict[str, LoraLayer]:
    """`component`'s layers in the LoRA file `path`, or in the PEFT folder `<component>_lora/`
    beside it (where a text encoder's LoRA goes that the family's pipeline does not load)."""
    _, layers = load_lora_file(path, adapter, flag="--lora_checkpoint", denoiser_config=denoiser_config)
    if component in layers:
        return layers[component]
    folder = path.parent / f"{component}_lora"
    if (folder / "adapter_model.safetensors").is_file():
        state, _ = read_safetensors(folder / "adapter_model.safetensors", flag="--lora_checkpoint")
        config_file = folder / "adapter_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        state = {f"{component}.{k.removeprefix('base_model.model.')}": v for k, v in state.items()}
        return _layers_from_diffusers(state, {component: config}, where=f"--lora_checkpoint {folder}")[component]
    raise ConfigError(
        f"--lora_checkpoint {path} holds no LoRA of {component} (it has {sorted(layers) or 'none'}, and "
        f"there is no {folder}); give the file a run training {component} wrote"
    )


def check_start(
    layers: Mapping[str, LoraLayer], modules: Iterable[str], *, component: str, rank: int, alpha: float, source: Path
) -> None:
    """Raise ConfigError unless the LoRA `layers` fit this run's: the same modules, rank and scale."""
    modules = set(modules)
    missing, extra = sorted(modules - set(layers)), sorted(set(layers) - modules)
    if missing or extra:
        shown = f"lacks {missing[:3]}" if missing else f"has {extra[:3]}, which this run does not train"
        raise ConfigError(
            f"--lora_checkpoint {source}: its {component} LoRA {shown} ({len(missing)} missing, "
            f"{len(extra)} extra); pass the --lora_target_modules of the run that wrote it"
        )
    for module, layer in sorted(layers.items()):
        if layer.rank != rank:
            raise ConfigError(
                f"--lora_checkpoint {source}: {component} module {module!r} has rank {layer.rank}, this "
                f"run trains rank {rank}; pass --lora_rank {layer.rank}"
            )
        if not math.isclose(layer.alpha / layer.rank, alpha / rank, rel_tol=1e-6):
            raise ConfigError(
                f"--lora_checkpoint {source}: {component} module {module!r} has alpha {layer.alpha:g}, "
                f"this run {alpha:g} (rank {rank}); pass --set lora.alpha={layer.alpha:g}"
            )


def start_from_lora_file(model: torch.nn.Module, component: str, path: Path, *, adapter: Adapter) -> None:
    """Set the LoRA weights peft attached to `model` to those of the LoRA file `path` (any format):
    exactly the saved values. Raises ConfigError when the file's modules, rank or alpha differ."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    wrapped: dict[str, Any] = {name: m for name, m in model.named_modules() if isinstance(m, PeftLoraLayer)}
    config = getattr(model, "config", None) if component == adapter.base_model_aliases["dit"] else None
    layers = _component_start(path, component, adapter, config)
    some = next(iter(wrapped.values()))
    rank = int(some.r["default"])
    check_start(layers, wrapped, component=component, rank=rank, alpha=float(some.lora_alpha["default"]), source=path)
    with torch.no_grad():
        for name, module in wrapped.items():
            down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
            if layers[name].down.shape != down.shape or layers[name].up.shape != up.shape:
                raise ConfigError(
                    f"--lora_checkpoint {path}: {component} module {name!r} holds shapes "
                    f"{tuple(layers[name].down.shape)}, {tuple(layers[name].up.shape)}, this run's "
                    f"LoRA {tuple(down.shape)}, {tuple(up.shape)}; is it of another model?"
                )
            down.copy_(layers[name].down)
            up.copy_(layers[name].up)
