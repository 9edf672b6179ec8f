"""Memory as a run reports it: the device's peak (or the process's on a CPU), and what the parameters and the
optimizer state hold."""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from torch import nn

from mprun.distributed import local_shard


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory window, so a process that runs several jobs (a reused sweep worker)
    reports each job's own peak. On Linux, writing 5 to clear_refs resets the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak is the process's lifetime peak (ru_maxrss)


def peak_memory_mib(device: torch.device) -> float:
    """Peak tensor memory on a GPU; on the CPU the process's peak resident set (tensors and all)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):  # peak RSS since the last reset_peak_memory
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def param_state_mib(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """MiB held by the parameters and the optimizer's state tensors: what a storage dtype changes (bf16_pure halves it
    against autocast's fp32 weights), unlike peak memory, where activations and workspaces mix in. Under FSDP2 this
    rank's shards."""
    tensors = {id(p): local_shard(p) for p in model.parameters()}  # a tied weight once
    for state in optimizer.state.values():
        tensors.update({id(v): local_shard(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0})
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
