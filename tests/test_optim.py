"""Stage 2's optimizers, learning-rate schedules and gradient clipping (autosplit/training/optim.py),
and the one-line errors of their settings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from autosplit.cli import main
from autosplit.config import TrainConfig, load_config
from autosplit.errors import CheckpointError, ConfigError
from autosplit.training.optim import LrSchedule, check_optimizer_device, grad_norm, make_optimizer

LR = 1e-3


def schedule(name: str, total: int = 100, **settings) -> tuple[LrSchedule, torch.optim.Optimizer]:
    param = torch.nn.Parameter(torch.zeros(2))
    train = TrainConfig(learning_rate=LR, lr_scheduler=name, **settings)
    optimizer = make_optimizer([param], train)
    return LrSchedule(optimizer, train, num_training_steps=total), optimizer


def rates(name: str, steps: list[int], total: int = 100, **settings) -> list[float]:
    """The rate of optimizer step k (0-based) for each k in `steps`, stepping the schedule as the
    trainer does: once after each optimizer step."""
    lr_schedule, optimizer = schedule(name, total, **settings)
    seen = []
    for _ in range(max(steps) + 1):
        seen.append(lr_schedule.lr)
        optimizer.step()
        lr_schedule.step()
    return [seen[k] for k in steps]


def test_constant_keeps_the_rate_bit_for_bit():
    assert rates("constant", [0, 1, 50, 99]) == [LR] * 4


def test_constant_with_warmup_ramps_linearly_from_zero():
    assert rates("constant_with_warmup", [0, 5, 10, 60], lr_warmup_steps=10) == pytest.approx([0, LR / 2, LR, LR])


def test_linear_ramps_then_decays_to_zero_at_the_end():
    got = rates("linear", [0, 5, 10, 55, 99], total=100, lr_warmup_steps=10)
    assert got == pytest.approx([0, LR / 2, LR, LR / 2, LR / 90])


def test_cosine_is_a_half_cosine_after_the_warm_up():
    got = rates("cosine", [10, 55, 77, 99], total=100, lr_warmup_steps=10)
    expected = [LR * 0.5 * (1 + math.cos(math.pi * (k - 10) / 90)) for k in (10, 55, 77, 99)]
    assert got == pytest.approx(expected)
    assert got[1] == pytest.approx(LR / 2)  # half-way through the decay


def test_cosine_with_restarts_restarts_each_cycle():
    got = rates("cosine_with_restarts", [0, 25, 49, 50, 75], total=100, lr_num_cycles=2)
    assert got == pytest.approx([LR, LR / 2, LR * 0.5 * (1 + math.cos(math.pi * 49 / 50)), LR, LR / 2])


def test_polynomial_decays_with_its_power_to_1e_7():
    got = rates("polynomial", [0, 50, 99], total=100, lr_power=2.0)
    end = 1e-7
    assert got == pytest.approx([LR, (LR - end) * 0.5**2 + end, (LR - end) * 0.01**2 + end])


def test_a_schedule_resumes_from_its_state_at_the_same_rates():
    first, optimizer = schedule("cosine", total=40, lr_warmup_steps=5)
    for _ in range(12):
        optimizer.step()
        first.step()
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    second, optimizer2 = schedule("cosine", total=40, lr_warmup_steps=5)
    optimizer2.load_state_dict(json.loads(json.dumps(optimizer.state_dict())))
    second.load_state_dict(saved, path="ckpt")
    for _ in range(10):
        assert second.lr == first.lr
        for opt, sched in ((optimizer, first), (optimizer2, second)):
            opt.step()
            sched.step()


def test_a_length_dependent_schedule_refuses_a_run_of_another_length():
    first, _ = schedule("cosine", total=40)
    other, _ = schedule("cosine", total=32)
    with pytest.raises(CheckpointError, match=r"ckpt: its --lr_scheduler cosine was planned over 40 optimizer steps"):
        other.load_state_dict(first.state_dict(), path="ckpt")
    free, _ = schedule("constant_with_warmup", total=32, lr_warmup_steps=3)
    free.load_state_dict(schedule("constant_with_warmup", total=40, lr_warmup_steps=3)[0].state_dict(), path="c")


def test_default_adamw_is_torchs_adamw_with_its_defaults():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = make_optimizer([param], TrainConfig())
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-4)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults == reference.defaults  # what stage 2 ran before the settings existed


def test_each_optimizer_gets_the_runs_settings():
    from prodigyopt import Prodigy
    from transformers.optimization import Adafactor

    param = torch.nn.Parameter(torch.ones(3))
    settings = dict(learning_rate=0.5, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, adam_weight_decay=0.1)
    adamw = make_optimizer([param], TrainConfig(**settings)).defaults
    assert (adamw["lr"], adamw["betas"], adamw["eps"], adamw["weight_decay"]) == (0.5, (0.8, 0.95), 1e-6, 0.1)
    adafactor = make_optimizer([param], TrainConfig(optimizer="adafactor", **settings))
    assert isinstance(adafactor, Adafactor)
    d = adafactor.defaults
    assert (d["lr"], d["weight_decay"], d["relative_step"], d["scale_parameter"]) == (0.5, 0.1, False, False)
    prodigy = make_optimizer([param], TrainConfig(optimizer="prodigy", **settings))
    assert isinstance(prodigy, Prodigy)
    d = prodigy.defaults
    assert (d["betas"], d["eps"], d["weight_decay"], d["use_bias_correction"], d["safeguard_warmup"]) == (
        (0.8, 0.95),
        1e-6,
        0.1,
        True,
        True,
    )


def test_clipping_bounds_the_norm_and_reports_it_before_clipping():
    from accelerate import Accelerator

    from autosplit.training.trainer import _clip_or_measure

    accelerator = Accelerator(cpu=True)
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 3))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0, 0.0])
    params[1].grad = torch.full((2, 3), 2.0)  # norm sqrt(24)
    before = math.sqrt(9 + 24)
    assert grad_norm(params) == pytest.approx(before)
    assert _clip_or_measure(accelerator, params, 1.0) == pytest.approx(before)
    assert grad_norm(params) == pytest.approx(1.0, rel=1e-5)  # clipped to the bound
    grads = [p.grad.clone() for p in params]
    assert _clip_or_measure(accelerator, params, 0.0) == pytest.approx(1.0, rel=1e-5)  # 0: measured only
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params))
    assert _clip_or_measure(accelerator, params, 5.0) == pytest.approx(1.0, rel=1e-5)  # under the bound: kept
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params))


def test_8bit_adamw_on_the_cpu_is_one_line_naming_the_flag_and_the_fix(capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(ConfigError, match=r"^--optimizer adamw8bit: .* CUDA GPUs only .*use --optimizer adamw here"):
        load_config(toml_path=None, sets=[], flags={"optimizer": "AdamW8bit"})
    with pytest.raises(ConfigError, match=r"--optimizer adamw8bit: .*stage 2 runs on cpu; use --optimizer adamw"):
        check_optimizer_device(TrainConfig(optimizer="adamw8bit"), torch.device("cpu"))
    check_optimizer_device(TrainConfig(optimizer="adamw8bit"), torch.device("cuda"))  # the GPU is fine
    assert main(["run", "--optimizer", "adamw8bit", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autosplit: error: --optimizer adamw8bit: bitsandbytes' 8-bit AdamW")


def test_the_optimizer_name_is_case_insensitive():
    assert load_config(toml_path=None, sets=[], flags={"optimizer": "Adafactor"}).train.optimizer == "adafactor"


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("optimizer", "sgd", "train.optimizer='sgd' is not one of adamw, adamw8bit, adafactor, prodigy (--optimizer)"),
        (
            "lr_scheduler",
            "cosin",
            "train.lr_scheduler='cosin' is not one of constant, constant_with_warmup, linear, cosine, "
            "cosine_with_restarts, polynomial (--lr_scheduler)",
        ),
        (
            "timestep_sampling",
            "shift",
            "train.timestep_sampling='shift' is not one of uniform, logit_normal, mode, sigmoid (--timestep_sampling)",
        ),
        (
            "weighting_scheme",
            "min_snr",
            "train.weighting_scheme='min_snr' is not one of none, sigma_sqrt, cosmap, diffsynth (--weighting_scheme)",
        ),
        (
            "weighting_scheme",
            "logit_normal",
            "train.weighting_scheme='logit_normal' is a timestep sampling here: diffusers' --weighting_scheme "
            "logit_normal is --timestep_sampling logit_normal --weighting_scheme none (valid --weighting_scheme "
            "values: none, sigma_sqrt, cosmap, diffsynth)",
        ),
        ("report_to", "mlflow", "train.report_to='mlflow' is not one of none, tensorboard, wandb, all (--report_to)"),
        ("max_grad_norm", "-1", "train.max_grad_norm=-1.0 must be 0 (no clipping) or positive (--max_grad_norm)"),
        ("mode_scale", "2", "train.mode_scale=2.0 must be between -1 and 1.75 (--mode_scale)"),
        ("adam_beta2", "1", "train.adam_beta2=1.0 must be in [0, 1) (--adam_beta2)"),
        (
            "lr_warmup_steps",
            "5",
            "--lr_warmup_steps 5 does nothing with --lr_scheduler constant; use --lr_scheduler "
            "constant_with_warmup (or another schedule) for a warm-up",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag_and_the_choices(capsys, tmp_path, flag, value, expected):
    assert main(["run", f"--{flag}", value, "--output_path", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"autosplit: error: {expected}"]
    assert not (tmp_path / "o").exists()


def test_wandb_asked_for_and_not_installed_is_one_line(capsys, tmp_path):
    from importlib.util import find_spec

    if find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    assert main(["run", "--report_to", "wandb", "--output_path", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "autosplit: error: --report_to wandb needs wandb: pip install wandb, or --report_to tensorboard"
    ]


def test_train_compile_chooses_regional_compilation_only_where_it_was_measured(monkeypatch):
    import torch
    import torch.utils._triton

    from autosplit.adapters.base import get_adapter
    from autosplit.errors import ConfigError
    from autosplit.training.placement import WeightPlacement
    from autosplit.training.trainer import compiles_blocks

    class Blocks(torch.nn.Module):
        _repeated_blocks = ["Linear"]

        def compile_repeated_blocks(self, **kwargs):  # a diffusers model's method, not called here
            raise AssertionError

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plain, swapped = WeightPlacement(), WeightPlacement(blocks_to_swap=2, block_lists=("b",))
    fp8 = WeightPlacement(base_precision="fp8", block_lists=("b",))
    qwen, sd = get_adapter("qwen_image"), get_adapter("sd")

    def auto(device=cuda, placement=plain, adapter=qwen, measured_run=True, model=None):
        return compiles_blocks(
            "auto", model or Blocks(), device=device, placement=placement, adapter=adapter, measured_run=measured_run
        )

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert not auto()  # nothing to compile with
    assert compiles_blocks("blocks", Blocks(), device=cuda, placement=plain)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    assert auto() and auto(adapter=get_adapter("flux"))
    assert not auto(device=cpu)
    assert not auto(placement=swapped) and not auto(placement=fp8)
    assert not auto(adapter=sd) and not auto(adapter=None)  # not measured: SD's UNet, a code adapter
    assert not auto(measured_run=False)  # direct_distill, full fine-tuning, no checkpointing: not measured
    assert not compiles_blocks("auto", Blocks(), device=cuda, placement=plain, adapter=qwen)  # unsaid: not measured
    assert compiles_blocks("blocks", Blocks(), device=cpu, placement=swapped)
    assert not compiles_blocks("none", Blocks(), device=cuda, placement=plain)
    plain_module = torch.nn.Linear(2, 2)
    assert not auto(model=plain_module)
    with pytest.raises(ConfigError, match=r"train.compile=blocks: Linear declares no repeated blocks"):
        compiles_blocks("blocks", plain_module, device=cpu, placement=plain)


def test_cudnn_attention_auto_is_the_familys_measured_choice():
    from autosplit.adapters.base import get_adapter
    from autosplit.config import RunConfig, apply_overrides, validate
    from autosplit.training.trainer import uses_cudnn_attention

    assert uses_cudnn_attention("auto", get_adapter("qwen_image"))
    assert not uses_cudnn_attention("auto", get_adapter("flux"))
    assert not uses_cudnn_attention("auto", object())  # a code adapter says nothing: off
    assert uses_cudnn_attention("true", get_adapter("flux"))
    assert not uses_cudnn_attention("false", get_adapter("qwen_image"))
    config = RunConfig()
    assert config.train.cudnn_attention == "false" and config.train.compile == "auto"
    for given, value in ((True, "true"), (False, "false"), ("off", "false"), ("AUTO", "auto"), ("yes", "true")):
        assert apply_overrides(config, {"train.cudnn_attention": given}, origin="--set") == []
        assert config.train.cudnn_attention == value
    apply_overrides(config, {"train.cudnn_attention": "sometimes"}, origin="--set")
    assert any(
        p == "train.cudnn_attention='sometimes' is not one of auto, true, false (--set train.cudnn_attention=...)"
        for p in validate(config)
    )
