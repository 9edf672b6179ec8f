"""The end of a run in numbers and words: summary.json's contents, the final/* metrics, and the closing block
printed on stdout."""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from mprun import hardware
from mprun.tracking.base import Tracker
from mprun.training.state import FitResult, TrainState

if TYPE_CHECKING:
    from mprun.build import Components
    from mprun.sweep import JobInfo


def build(result: FitResult, parts: Components, state: TrainState, tracker: Tracker, wall_s: float) -> dict[str, Any]:
    """The end-of-run numbers, as written to summary.json."""
    block = parts.data.context
    tokens_per_s = result.samples_per_s * block if block else None
    parameters = sum(p.numel() for p in parts.module.parameters())  # a tied weight once
    return {
        "task": parts.data.task.name,
        "val_acc": result.val_acc,
        "val_loss": result.val_loss,
        **{f"val_{k}": v for k, v in result.val_extra.items()},  # a language model's ppl, bpb
        "tokens_per_s": tokens_per_s,
        "parameters": parameters,
        "mfu": hardware.mfu(parameters, tokens_per_s, parts.device, parts.precision.name.matmul_dtype),  # a GPU's LM
        "train_loss": result.train_loss,
        "samples_per_s": result.samples_per_s,
        "data_wait_frac": result.data_wait_frac,
        "input": parts.data.train.describe(),
        "peak_mem_mib": result.peak_mem_mib,
        "param_state_mib": result.param_state_mib,
        "peak_mem_kind": "cuda_max_allocated" if parts.device.type == "cuda" else "process_peak_rss",
        "precision": parts.precision.name.value,
        "precision_detail": f"{parts.precision.description}: {parts.precision.reason}",
        "fp8_modules": len(parts.precision.fp8_modules),
        "precision_policy": "; ".join(parts.precision.policy(parts.fp32_modules)),  # "" when nothing is set
        "loss_scale": parts.precision.scale_value(),
        "loss_scaling": parts.precision.loss_scale.value,  # dynamic, static or none
        **parts.precision.counters(),
        "epochs": state.epoch,
        "steps": state.step,
        "train_time_s": state.train_time_s,  # every segment of a resumed run
        "epoch_time_s": result.epoch_time_s,
        "timed_epochs": len(result.epoch_rates),  # epochs timed in this process; the first is left out when others are
        "wall_time_s": wall_s,
        "device": str(parts.device),
        "mlflow_run_id": tracker.run_id,
    }


# Summary numbers also logged as metrics: the MLflow UI compares runs on them, the sweep report reads them.
FINAL_METRICS = (
    "val_acc",
    "val_loss",
    "train_loss",
    "samples_per_s",
    "data_wait_frac",
    "peak_mem_mib",
    "param_state_mib",
    "loss_scale",
    "skipped_steps",
    "train_time_s",
    "epoch_time_s",
)


def final_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The summary numbers logged as final/* metrics."""
    # And whatever else the task measured (a language model's val_ppl, val_bpb) and tokens_per_s, where there are.
    extra = [k for k in results if k.startswith("val_") and k not in FINAL_METRICS] + ["tokens_per_s", "mfu"]
    return {f"final/{k}": float(results[k]) for k in (*FINAL_METRICS, *extra) if results.get(k) is not None}


def json_text(obj: Any) -> str:
    """Strict JSON for the files mprun writes (summary.json, diagnosis.json, nan_traces.json): a number that is NaN
    or infinite (not measured, or what went wrong) becomes null, since bare NaN breaks most JSON readers."""

    def strict(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Mapping):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return x

    return json.dumps(strict(obj), indent=2, default=str, allow_nan=False)


def write_to_log_file(text: str, level: int = logging.INFO) -> None:
    """text into the run's log file (Hydra's mprun.log), not the console: for what the console already shows."""
    record = logging.getLogger("mprun").makeRecord("mprun", level, __file__, 0, text, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def job_line(s: Mapping[str, Any], run_dir: Path, job: JobInfo) -> str:
    """A finished sweep job in one line: the sweep's report has the table."""
    return (
        f"job {job.num} {job.name}: {' '.join(_headline(s))}  {s['samples_per_s']:,.0f} samples/s  "
        f"{s['peak_mem_mib']:,.0f} MiB  {s['precision_detail'].split(':')[0]}  skipped {s['skipped_steps']}  "
        f"{s['train_time_s']:.1f} s  ({run_dir})"
    )


def print_summary(s: Mapping[str, Any], run_dir: Path, tracker: Tracker, job: Optional[JobInfo]) -> None:
    """Human-readable closing block on stdout, and in the run's log; a sweep job that finished gets one line (its
    block is in its log)."""
    block = summary_block(s, run_dir, tracker, job)
    write_to_log_file(block)
    print(job_line(s, run_dir, job) if job is not None and not s.get("interrupted") else block, flush=True)


def summary_block(s: Mapping[str, Any], run_dir: Path, tracker: Tracker, job: Optional[JobInfo]) -> str:
    """The closing block: results, precision, time, where things are."""
    mem = "GPU tensors, peak allocated" if s["peak_mem_kind"] == "cuda_max_allocated" else "process peak RSS"
    stopped = []
    if s.get("interrupted"):  # numbers not measured before the stop (NaN) are printed as such
        # A sweep job continues with its sweep: the sweep command with trainer.resume=<this job's dir> would
        # resume every job of the sweep from this one's checkpoint.
        again = (
            f"launch the sweep again into its directory: the same command with hydra.sweep.dir={job.sweep_dir} "
            "trainer.resume=auto"
            if job
            else f"run the same command with trainer.resume={run_dir}"
        )
        stopped = [
            f"stopped     by {signal.Signals(s['interrupted']).name} after step {s['steps']}, before the end: "
            f"{run_dir / 'checkpoints' / 'interrupted.pt'}; to continue, {again}"
        ]
    lines = [
        "",
        "── mprun summary " + "─" * 44,
        *stopped,
        _val_line(s),
        _throughput_line(s),
        f"input       waited for data {s['data_wait_frac']:.0%} of training time  ({s['input']})",
        f"peak memory {s['peak_mem_mib']:,.0f} MiB  ({mem}); parameters and optimizer state "
        f"{s['param_state_mib']:,.1f} MiB",
        f"precision   {s['precision_detail']}",
        *([f"policy      {s['precision_policy']}"] if s.get("precision_policy") else []),
        _scale_line(s),
        f"time        {s['train_time_s']:.1f} s training in all, "
        f"{s['wall_time_s']:.1f} s in this process (since start), "
        f"{s['steps']} steps on {s['device']}",
        *_best_line(s),
        f"run dir     {run_dir}",
        *tracker.describe(),
    ]
    return "\n".join(lines)


def _best_line(s: Mapping[str, Any]) -> list[str]:
    """Where the best evaluation's checkpoint is, when the run kept one (trainer.keep_best)."""
    best = s.get("best")
    if not best:
        return []
    return [
        f"best        {best['metric']} {best['score']:.4g} at epoch {best['epoch']}, step {best['step']}: "
        f"{best['checkpoint']}"
    ]


def _headline(s: Mapping[str, Any]) -> tuple[str, str]:
    """The run's headline validation figure: ('val/acc', '0.9916'); a language model's bits per byte (or
    perplexity)."""
    if "val_bpb" in s:
        return "val/bpb", f"{s['val_bpb']:.3f}"
    if "val_ppl" in s:
        return "val/ppl", f"{s['val_ppl']:.2f}"
    return "val/acc", f"{s['val_acc']:.4f}"


def _val_line(s: Mapping[str, Any]) -> str:
    """The summary's validation line: the headline, then the loss (and a language model's next-token accuracy)."""
    name, value = _headline(s)
    if name == "val/acc":
        return f"val/acc     {value}   (val/loss {s['val_loss']:.4f})"
    return f"{name:<12}{value}   (val/loss {s['val_loss']:.4f} nats/token, next-token acc {s['val_acc']:.4f})"


def _throughput_line(s: Mapping[str, Any]) -> str:
    """The summary's throughput line, saying which epochs its median is over."""
    n = s.get("timed_epochs", 0)
    if not n:
        return "throughput  not measured (no epoch was timed in this process)"
    over = {1: "one epoch, warm-up included", 2: "the second epoch; the first (warm-up) left out"}.get(
        n, f"median of {n - 1} epochs; the first (warm-up) left out"
    )
    tokens = f" = {s['tokens_per_s']:,.0f} tokens/s" if s.get("tokens_per_s") else ""
    tokens += f", MFU {s['mfu']:.1%}" if s.get("mfu") else ""
    return f"throughput  {s['samples_per_s']:,.0f} samples/s{tokens}  ({over})"


def _scale_line(s: Mapping[str, Any]) -> str:
    """The summary's loss-scale line: what the scaler did, or that there was none."""
    scaling = s.get("loss_scaling", "dynamic")
    skipped = f"skipped steps {s['skipped_steps']}"
    if scaling == "dynamic":
        return (
            f"loss scale  {s['loss_scale']:g}   {skipped}   growth/backoff events {s['growth_events']}/"
            f"{s['backoff_events']}   steps since overflow {s['steps_since_overflow']}"
        )
    if scaling == "static":
        return f"loss scale  {s['loss_scale']:g} (static)   {skipped}"
    # No loss scale; with precision.on_nonfinite=skip a scaler pinned at 1.0 still skips non-finite steps.
    return "loss scale  none" + (f"   {skipped} (non-finite, on_nonfinite=skip)" if s["skipped_steps"] else "")
