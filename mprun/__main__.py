"""`python -m mprun` and the `mprun` script. Torch, Hydra and MLflow take seconds to import, and a Ctrl-C in
those seconds is a stop like any other: one line and exit 130, not a traceback from inside an import."""

import signal
import sys


def main() -> None:
    try:
        from mprun import cli
    except KeyboardInterrupt:
        print("mprun: interrupted (SIGINT)", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    cli.main()


if __name__ == "__main__":
    main()
