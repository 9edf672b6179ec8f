"""What the machine has, and the process-global math flags a run sets: device choice, CPU matrix units, GPU
capability, TF32 and cuDNN flags. Facts only; what precision to run on them is mprun.precision's decision."""

from __future__ import annotations

import contextlib
import platform
from typing import Any, Callable, Iterator

import torch

from mprun.errors import require
from mprun.training.config import DeviceName


def resolve_device(name: DeviceName, local_rank: int = 0) -> torch.device:
    """auto: the GPU when there is one (this rank's, under torchrun). Asking for cuda without one is an
    error, not a silent CPU run."""
    require(
        name is not DeviceName.cuda or torch.cuda.is_available(),
        "trainer.device=cuda but no CUDA GPU is visible; choose trainer.device=cpu or auto",
    )
    if name is DeviceName.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def device_name(device: torch.device) -> str:
    """The hardware in words, for tags and benchmark tables: the GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def gpu_capability(device: torch.device) -> tuple[str, int, int]:
    """(name, major, minor) of a CUDA device's compute capability, e.g. ('NVIDIA H200', 9, 0)."""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), major, minor


def cpu_amx_units() -> set[str]:
    """The AMX units this CPU has (`amx_bf16`, `amx_fp16`); without one, CPU autocast to that dtype is emulated.
    AMX-BF16 Xeons before Granite Rapids have no AMX-FP16."""
    if platform.system() != "Linux":
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return set()
    return {unit for unit in ("amx_bf16", "amx_fp16") if unit in flags}


def set_math_flags(tf32_matmul: bool, cudnn_tf32: bool, cudnn_benchmark: bool) -> None:
    """Set the process-global math flags explicitly every run, so none leaks from one job into the next.

    Matmuls through torch.set_float32_matmul_precision, which sets cuBLAS and oneDNN alike: setting only the legacy
    cuBLAS flag over a caller's set_float32_matmul_precision("high") leaves torch unable to read the precision back
    (a RuntimeError from torch.get_float32_matmul_precision(), which max-autotune compilation calls)."""
    torch.set_float32_matmul_precision("high" if tf32_matmul else "highest")
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark


def _readable(flag: Callable[[], object]) -> object:
    """A TF32 flag's value, or None where torch cannot read it (a caller mixed its legacy and new TF32 APIs)."""
    try:
        return flag()
    except RuntimeError:
        return None


def _precision_knobs() -> list[Any]:
    """torch >= 2.9's per-backend TF32 settings (`.fp32_precision`) that the run's flags touch; [] before 2.9."""
    b = torch.backends
    knobs = [b.cuda.matmul, b.mkldnn.matmul, b.cudnn.conv, b.cudnn.rnn]
    return knobs if all(hasattr(k, "fp32_precision") for k in knobs) else []


@contextlib.contextmanager
def math_flags_restored() -> Iterator[None]:
    """Around a run: put back the flags set_math_flags sets, so a caller's later work (a notebook, the next job of a
    joblib worker) runs as it did before the run.

    Restored through the APIs the run sets them with, then each backend's own setting (torch >= 2.9), which those
    APIs set more widely (set_float32_matmul_precision sets oneDNN's too). A flag torch cannot read through its
    legacy API (a caller mixed the legacy and new TF32 APIs) is put back through the per-backend setting alone."""
    cudnn, knobs = torch.backends.cudnn, _precision_knobs()
    matmul = _readable(torch.get_float32_matmul_precision)
    tf32, benchmark = _readable(lambda: cudnn.allow_tf32), cudnn.benchmark
    per_backend = [k.fp32_precision for k in knobs]
    try:
        yield
    finally:
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)  # it also sets torch.backends.cuda.matmul.allow_tf32
        if tf32 is not None:
            cudnn.allow_tf32 = tf32
        for knob, value in zip(knobs, per_backend):
            knob.fp32_precision = value
        cudnn.benchmark = benchmark


# Dense (no sparsity) peak TFLOP/s by compute dtype, from NVIDIA's data sheets (SXM boards where there are two):
# the denominator of the MFU estimate. fp32 is the CUDA cores' rate; tf32, bf16, fp16 and fp8 the tensor cores'. The
# first entry whose key is in the GPU's name wins: "H100 PCIe" stands before "H100".
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1, "fp16": 362.1, "fp8": 733.0}),
    ("V100", {"fp32": 15.7, "fp16": 125.0}),
)


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    """The data-sheet peak of this GPU for this compute dtype (fp32, tf32, bf16, fp16, fp8); None on a CPU or a GPU
    the table does not hold."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks.get(dtype) for key, peaks in GPU_PEAK_TFLOPS if key in name), None)


def mfu(parameters: int, tokens_per_s: float | None, device: torch.device, dtype: str) -> float | None:
    """Model FLOPs utilisation: 6 * parameters FLOPs per token trained (forward and backward, attention's own
    FLOPs left out), times tokens/s, over the GPU's peak for the dtype. None where either is unknown."""
    peak = peak_tflops(device, dtype)
    if not peak or not tokens_per_s:
        return None
    return 6 * parameters * tokens_per_s / (peak * 1e12)
