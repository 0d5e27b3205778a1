"""Emulate a smaller card: with $AUTOSPLIT_GPU_CAP_GIB set, every Python process started with this
folder on PYTHONPATH caps its CUDA caching allocator at that many GiB before its first allocation
(`torch.cuda.set_per_process_memory_fraction`; used by bench/gpu/memory_placement.sh). With
$AUTOSPLIT_DETERMINISTIC set, torch's deterministic algorithms are on (with CUBLAS_WORKSPACE_CONFIG
set by the caller), so two runs can be compared bit for bit."""

import os

_cap = os.environ.get("AUTOSPLIT_GPU_CAP_GIB")
if _cap:
    import torch

    if torch.cuda.is_available():
        _total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(float(_cap) * (1 << 30) / _total, 0)

if os.environ.get("AUTOSPLIT_DETERMINISTIC"):
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
