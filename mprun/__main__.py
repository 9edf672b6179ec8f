"""`python -m mprun` and the `mprun` script: the process's signal handling and how it ends.

Outside training (the seconds torch, Hydra and MLflow take to import, set-up, between sweep jobs, the report),
SIGINT and SIGTERM unwind at once as interrupts.StopNow: one line, exit 128+signal. While a job trains,
interrupts.GracefulStop handles them and puts this handler back after. Both are installed explicitly: by default
SIGTERM (a scheduler's stop) ends the process on the spot, leaving a sweep's parent run RUNNING, and a job that a
script starts in the background with `&` inherits SIGINT ignored.
"""

import os
import select
import signal
import sys

from mprun.interrupts import GracefulStop, stop_now


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (`mprun --help | head -1`)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll on this platform, or no stdout
        return False


def _end_as_sigpipe() -> None:
    """End as a process SIGPIPE stopped would (exit 141), not with a BrokenPipeError traceback when Python flushes
    the rest of stdout at exit: that now goes to /dev/null."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)


def main() -> None:
    for s in GracefulStop.SIGNALS:
        signal.signal(s, stop_now)
    try:
        from mprun import cli

        cli.main()
    except KeyboardInterrupt as e:  # what was open has been closed on the way out
        signum = getattr(e, "signum", signal.SIGINT)  # a StopNow says which signal it was
        print(f"mprun: interrupted ({signal.Signals(signum).name})", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    except (SystemExit, BrokenPipeError):  # Hydra ends --help and errors with an exit
        if _stdout_gone():
            _end_as_sigpipe()
        raise
    if _stdout_gone():
        _end_as_sigpipe()


if __name__ == "__main__":
    main()
