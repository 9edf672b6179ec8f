"""python -m mprun.report <parent run id | experiment name>"""

import sys

from mprun.report.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
