"""Metric points buffered and written in flushes, by one background thread, in order, off the training thread.

Each write to the tracking store has a fixed cost, in CPU time and the GIL (SQLAlchemy, a request), far above the
rows it carries (docs/benchmarks.md, "What MLflow tracking costs the default run"). A background write per log step
would take that from training; the points are buffered instead, and written together when the oldest has waited
`interval_s` (checked as points are added), or when the caller flushes (a checkpoint, the end of the run).

What a failed write means (lost points, or a store gone away) is for the caller to decide; the writer only says
which flushes failed. It knows nothing of MLflow: each flush is given the function that writes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass

Write = Callable[[list["MetricBatch"]], None]


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
    """A buffer of metric batches and one writer thread; flushes are written in the order they were made."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mprun-metrics")
        self._buffer: list[MetricBatch] = []
        self._oldest = 0.0  # clock() when the oldest buffered batch was added
        self._pending: list[tuple[Future, list[MetricBatch]]] = []  # flushes not yet looked at by failed()

    def add(self, batch: MetricBatch) -> None:
        """Buffer one step's metrics until the next flush."""
        if not self._buffer:
            self._oldest = self._clock()
        self._buffer.append(batch)

    def due(self) -> bool:
        """Whether the oldest buffered batch has waited interval_s: time for a flush."""
        return bool(self._buffer) and self._clock() - self._oldest >= self.interval_s

    def flush(self, write: Write) -> None:
        """Queue write(the buffered batches), as one call, behind the flushes already queued."""
        if self._buffer:
            self.submit(write, self._buffer)
            self._buffer = []

    def submit(self, write: Write, batches: list[MetricBatch]) -> None:
        """Queue write(batches) behind the flushes already queued, leaving the buffer as it is."""
        self._pending.append((self._pool.submit(write, batches), batches))

    def failed(self, wait: bool = False) -> list[tuple[list[MetricBatch], BaseException]]:
        """The flushes whose write has failed, with its error, in order; all queued writes are waited for with `wait`.
        Finished writes, failed or not, are forgotten: each failure is reported once."""
        if wait:
            wait_all([f for f, _ in self._pending])
        done = [(f, b) for f, b in self._pending if f.done()]
        self._pending = [(f, b) for f, b in self._pending if not f.done()]
        return [(b, f.exception()) for f, b in done if not f.cancelled() and f.exception() is not None]

    def unsent(self) -> list[MetricBatch]:
        """Cancel the queued writes (each would spend its retries on a store that went away) and return the batches
        not yet written: buffered, queued, or still in flight."""
        for f, _ in self._pending:
            f.cancel()
        unsent = [
            b for f, bs in self._pending if f.cancelled() or not f.done() or f.exception() is not None for b in bs
        ]
        unsent += self._buffer
        self._pending, self._buffer = [], []
        return unsent

    def close(self) -> None:
        """Stop the thread; writes still queued and batches still buffered are dropped (flush, then call
        failed(wait=True) first to have them written)."""
        self._buffer = []
        self._pool.shutdown(wait=False, cancel_futures=True)
