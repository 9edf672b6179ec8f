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
import stat
import sys

from mprun.interrupts import GracefulStop, stop_now


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (`mprun --help | head -1`, a `| tee` that a Ctrl-C ended)."""
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # a tty or socket may report a hang-up too: not this
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll on this platform, or no stdout
        return False


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # stderr's reader has gone too (`2>&1 | tee`): the exit code still says it
        pass


def main() -> None:
    for s in GracefulStop.SIGNALS:
        signal.signal(s, stop_now)
    code = None
    try:
        from mprun import cli  # after the handlers: a signal while Hydra and the config load is handled too

        cli.main()
    except KeyboardInterrupt as e:  # what was open has been closed on the way out
        signum = getattr(e, "signum", signal.SIGINT)  # a StopNow says which signal it was
        _say(f"mprun: interrupted ({signal.Signals(signum).name})")
        code = 128 + signum
    except SystemExit as e:  # Hydra ends --help and its errors with an exit, mprun its own
        code = e.code
    except BrokenPipeError:
        if not _stdout_gone():
            raise
    if _stdout_gone():
        # What is still buffered goes to /dev/null, not into a BrokenPipeError when Python flushes at exit (exit
        # 120). The exit code stays the run's (130 after a Ctrl-C that also ended `| tee`); a run that had no
        # other end than its lost output ends as SIGPIPE would have ended it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE if code in (0, None) else code
    sys.exit(code)


if __name__ == "__main__":
    main()
