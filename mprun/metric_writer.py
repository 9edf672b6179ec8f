"""Metric batches written by one background thread, in order, off the training thread.

A write to the tracking store costs ~13 ms for sqlite (more for a remote server): the training thread queues the
batch and goes on. What a failed write means (a lost batch, or a store gone away) is for the caller to decide; the
writer only says which batches failed. It knows nothing of MLflow: it is given the function that writes a batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricBatch:
    """The metrics of one step, as logged."""

    step: int
    values: Mapping[str, float]
    timestamp_ms: int

    @classmethod
    def now(cls, metrics: Mapping[str, float], step: int) -> MetricBatch:
        """A batch stamped with the current time."""
        return cls(step, {k: float(v) for k, v in metrics.items()}, int(time.time() * 1000))


class BatchedWriter:
    """One writer thread; batches are written in the order they were submitted."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mprun-metrics")
        self._pending: list[tuple[Future, MetricBatch]] = []  # writes not yet looked at by failed()

    def submit(self, write: Callable[[MetricBatch], None], batch: MetricBatch) -> None:
        """Queue write(batch) behind the writes already queued."""
        self._pending.append((self._pool.submit(write, batch), batch))

    def failed(self, wait: bool = False) -> list[tuple[MetricBatch, BaseException]]:
        """The batches whose write has failed, with its error, in order; all writes are waited for with `wait`.
        Finished writes, failed or not, are forgotten: each failure is reported once."""
        if wait:
            wait_all([f for f, _ in self._pending])
        done = [(f, b) for f, b in self._pending if f.done()]
        self._pending = [(f, b) for f, b in self._pending if not f.done()]
        return [(b, f.exception()) for f, b in done if not f.cancelled() and f.exception() is not None]

    def unsent(self) -> list[MetricBatch]:
        """Cancel the queued writes (each would spend its retries on a store that went away) and return the batches
        not yet written: queued, or still in flight."""
        for f, _ in self._pending:
            f.cancel()
        unsent = [b for f, b in self._pending if f.cancelled() or not f.done() or f.exception() is not None]
        self._pending = []
        return unsent

    def close(self) -> None:
        """Stop the thread; writes still queued are dropped (call failed(wait=True) first to have them written)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
