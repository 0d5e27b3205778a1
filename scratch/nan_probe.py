"""Temporary: where does tiny FLUX training on CUDA (bf16) produce non-finite values?"""
import torch

import autosplit.graph as g
names = {}
from autosplit.cli import main

orig = g.Unit.__call__
seen = {"n": 0}


def checked(self, values, ctx):
    out = orig(self, values, ctx)
    for k, v in out.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            if seen["n"] < 12:
                print("NONFINITE", self.name, k, v.dtype, tuple(v.shape), flush=True)
            seen["n"] += 1
    return out


g.Unit.__call__ = checked
step = torch.optim.AdamW.step


import autosplit.trainer as tr
orig_make = tr.make_trainable


def make(session, model, component):
    params = orig_make(session, model, component)
    for n, p in model.named_parameters():
        names[id(p)] = n
    return params


tr.make_trainable = make


def checked_step(self, *a, **k):
    nan = [names.get(id(p), "?") for grp in self.param_groups for p in grp["params"]
           if p.grad is not None and not torch.isfinite(p.grad).all()]
    print("NAN GRADS", nan[:12], flush=True)
    bad = [p.shape for grp in self.param_groups for p in grp["params"] if p.grad is not None and not torch.isfinite(p.grad).all()]
    big = max((p.grad.abs().max().item() for grp in self.param_groups for p in grp["params"] if p.grad is not None), default=0)
    print("optimizer step: non-finite grads", len(bad), "max |grad|", big, flush=True)
    return step(self, *a, **k)


torch.optim.AdamW.step = checked_step
orig_adamw = torch.optim.AdamW.__init__
for flags, backend in (([], "no_cudnn"), ([], "math_only")):
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_flash_sdp(backend == "no_cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(backend == "no_cudnn")
    print("=== backend", backend, flush=True)
    print("=== flux", flags, flush=True)
    main(["run", "--pipeline", "flux", "--num_epochs", "1", "--dataset_repeat", "1", "--max_steps", "2", "--lora_rank", "4",
          "--seed", "7", "--output_path", f"/tmp/fx{backend}", *flags])
    print(open(f"/tmp/fx{backend}/train_log.jsonl").read(), flush=True)
