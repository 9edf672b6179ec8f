"""Graceful stop on SIGINT/SIGTERM: finish the step, checkpoint, close the run as KILLED, exit 128+signal.

Handlers are installed explicitly rather than relying on Python's default SIGINT handler: a job
started in the background by a non-interactive shell inherits SIGINT as *ignored*, and SLURM
preempts with SIGTERM, which Python does not turn into an exception at all.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Iterator, Optional

log = logging.getLogger("mprun")


class StopNow(KeyboardInterrupt):
    """A stop signal that unwinds at once (a run open is still closed KILLED): a second one during training, or any
    outside it (stop_now). It carries the signal, so the process exits 128+signal whichever it was (143 for
    SIGTERM, not Ctrl-C's 130)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


def stop_now(signum: int, frame: Optional[FrameType]) -> None:
    """The handler outside training (set-up, between sweep jobs, the report; mprun.__main__ installs it)."""
    raise StopNow(signum)


class GracefulStop:
    """Context manager: the first signal sets `signum` for the loop to see; a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None:
            raise StopNow(signum)  # second signal: unwind now; the run is still closed as KILLED
        self.signum = signum
        log.warning(
            "%s received: finishing the current step, then checkpointing. Send it again to stop at once.",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the block is done, then reach the handlers in force: for work that must not be
    left half done. Python runs signal handlers in the main thread, whichever thread the signal reached."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in GracefulStop.SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        for signum in dict.fromkeys(arrived):
            handler = previous[signum]
            if callable(handler):  # called here, in this frame: a re-raised signal's handler could run inside a
                handler(signum, None)  # garbage-collection finaliser, which swallows its KeyboardInterrupt
            elif handler != signal.SIG_IGN:
                signal.raise_signal(signum)  # the default action: the process ends
