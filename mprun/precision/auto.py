"""Which precision a run gets: `auto` resolved to what this device runs fast (on a CPU, by timing the run's own
model), and an explicit request checked against what the device can run."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

import torch

from mprun import hardware
from mprun.errors import ConfigError
from mprun.precision.names import PrecisionName

log = logging.getLogger("mprun.precision")


# fp8 runs what it does not swap under bf16 autocast; bf16_pure has no autocast (its weights are bf16).
_AUTOCAST_DTYPE = {
    PrecisionName.fp16: torch.float16,
    PrecisionName.bf16: torch.bfloat16,
    PrecisionName.fp8: torch.bfloat16,
}
# The autocast precision whose probe speaks for a CPU run's matmuls: bf16_pure's are bf16 ones.
_PROBED = {
    PrecisionName.fp16: PrecisionName.fp16,
    PrecisionName.bf16: PrecisionName.bf16,
    PrecisionName.bf16_pure: PrecisionName.bf16,
}


# precision=auto on a CPU takes a half dtype only if its measured step is this much faster than fp32's (a tie, or
# noise, keeps fp32's numerics), and only if its loss on the probe batch agrees with fp32's within LOSS_AGREEMENT
# (relative): a dtype that changes the model's output that much is not the same training.
AUTO_MIN_SPEEDUP = 1.1
LOSS_AGREEMENT = 0.02

# Measures on the run's own model: {dtype name: torch dtype} -> mprun.precision.probe.measure's result.
Measure = Callable[[dict[str, torch.dtype]], dict[str, Any]]


def resolve(
    requested: PrecisionName, device: torch.device, measure: Optional[Measure] = None
) -> tuple[PrecisionName, str]:
    """Map `auto` to what this device really runs fast, and reject what it cannot run; returns (name, why). On a CPU,
    `measure` times the candidates on the run's model (precision/probe.py); without it, the CPU's AMX units decide."""
    return _on_gpu(requested, device) if device.type == "cuda" else _on_cpu(requested, measure)


def _on_gpu(requested: PrecisionName, device: torch.device) -> tuple[PrecisionName, str]:
    """resolve() on a CUDA device: its compute capability decides."""
    name, major, minor = hardware.gpu_capability(device)
    if requested is PrecisionName.auto:
        if major >= 8:
            return PrecisionName.bf16, f"{name} (sm_{major}{minor}) has bf16 tensor cores"
        if major == 7:
            return PrecisionName.fp16, f"{name} (sm_{major}{minor}) has fp16 but no bf16 tensor cores"
        return PrecisionName.fp32, f"{name} (sm_{major}{minor}) has no fast half precision"
    if requested in (PrecisionName.bf16, PrecisionName.bf16_pure) and major < 8:
        raise ConfigError(
            f"precision={requested.value} is not supported by {name} (sm_{major}{minor}); "
            "choose precision=fp16 (with loss scaling), tf32 or fp32"
        )
    if requested is PrecisionName.fp8 and (major, minor) < (8, 9):
        raise ConfigError(
            f"precision=fp8 needs float8 tensor cores (Ada or Hopper, sm_89+); {name} is sm_{major}{minor}. "
            f"Use precision=bf16{'' if major >= 8 else ' (Ampere+) or fp16'}"
        )
    if requested is PrecisionName.tf32 and major < 8:
        raise ConfigError(f"precision=tf32 needs an Ampere or newer GPU; {name} is sm_{major}{minor}. Use fp32 or fp16")
    return requested, "requested"


def _on_cpu(requested: PrecisionName, measure: Optional[Measure]) -> tuple[PrecisionName, str]:
    """resolve() on a CPU: measured on the run's model where `measure` is given, else by the CPU's AMX units."""
    if requested is PrecisionName.tf32:  # TF32 is a GPU tensor-core format: a CPU computes in full fp32
        return requested, "requested; on a CPU tf32 runs as plain fp32"
    if requested is PrecisionName.auto:
        if measure is not None:
            # fp16 only where the CPU has a unit for it (AMX-FP16): elsewhere it is emulated, and needs a loss scale.
            names = [PrecisionName.bf16] + ([PrecisionName.fp16] if "amx_fp16" in hardware.cpu_amx_units() else [])
            return pick_measured(measure({n.value: _AUTOCAST_DTYPE[n] for n in names}))
        if "amx_bf16" in hardware.cpu_amx_units():
            return PrecisionName.bf16, "CPU has AMX-BF16"
        return PrecisionName.fp32, "CPU without fast bf16 (autocast would be emulated and slower)"
    if requested is PrecisionName.fp8:
        log.warning(
            "precision=fp8 on a CPU: torch._scaled_mm runs float8 matmuls in emulation, correct but slower than bf16. "
            "Useful to test the fp8 path; fp8 pays on Ada/Hopper GPUs, on transformer-sized Linear layers."
        )
        return requested, "requested; on a CPU float8 matmuls are emulated"
    autocast = _PROBED.get(requested)
    if autocast is not None:
        probed = autocast.value
        if measure is not None:
            times = measure({probed: _AUTOCAST_DTYPE[autocast]})
            speedup = times["fp32"]["ms"] / times[probed]["ms"]
            if speedup < 1:
                log.warning(
                    "precision=%s: %s autocast measured %.2fx fp32's speed on this CPU for this model (%s): correct, "
                    "but slower (emulated here). Useful for numerics experiments; precision=auto picks the fastest.",
                    requested.value,
                    probed,
                    speedup,
                    _timings(times),
                )
            return requested, (
                f"requested; {probed} autocast measured {speedup:.2f}x fp32's speed on this CPU ({_timings(times)})"
            )
        if f"amx_{probed}" not in hardware.cpu_amx_units():
            log.warning(
                "precision=%s on a CPU without AMX-%s may run in emulation: correct, but possibly much slower than "
                "fp32 (see docs/precision.md). Useful for numerics experiments; measure before relying on it for "
                "speed.",
                requested.value,
                probed.upper(),
            )
    return requested, "requested"


def _timings(times: dict[str, Any]) -> str:
    """'fp32 7.68 ms/step, bf16 4.19 ms/step (cached)': a probe's result in words."""
    steps = ", ".join(
        f"{k} failed: {v['error']}" if "error" in v else f"{k} {v['ms']:.3g} ms/step"
        for k, v in times.items()
        if isinstance(v, dict)
    )
    return steps + ("; from the cache" if times.get("cached") else "")


def pick_measured(times: dict[str, Any]) -> tuple[PrecisionName, str]:
    """precision=auto on a CPU, from a probe: the fastest half dtype at least AUTO_MIN_SPEEDUP x fp32's speed whose
    loss agrees with fp32's; else fp32. The reason gives the timings."""
    base = times["fp32"]
    fits = [
        (base["ms"] / t["ms"], name)
        for name, t in times.items()
        if name != "fp32"
        and isinstance(t, dict)
        and math.isfinite(t["loss"])
        and abs(t["loss"] - base["loss"]) <= LOSS_AGREEMENT * max(1.0, abs(base["loss"]))
    ]
    speedup, name = max(fits, default=(1.0, "fp32"))
    if name != "fp32" and speedup >= AUTO_MIN_SPEEDUP:
        return PrecisionName(name), f"measured on this CPU: {speedup:.2f}x fp32's speed ({_timings(times)})"
    return PrecisionName.fp32, (
        f"measured on this CPU: no half dtype {AUTO_MIN_SPEEDUP}x faster with a loss within {LOSS_AGREEMENT:.0%} of "
        f"fp32's ({_timings(times)})"
    )
