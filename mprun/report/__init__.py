"""The precision comparison report of a sweep: the recommendation, one row per precision (its seeds together), and
one row per job.

Written at the end of every tracked multirun (into <sweep dir>/report/ and the parent run's
artifacts), or on demand:

    python -m mprun.report <parent run id | experiment name> [--uri URI] [--out DIR] [--tolerance-pp PP]

A job's baseline is the FINISHED fp32 job with the same other overrides: all but the precision option and
the settings that change nothing in fp32 (the loss scaler's, fp32_modules; precision.HALF_ONLY). Jobs that differ
only in trainer.seed form a group, compared with its fp32 group (groups.py). Rows are read back from the tracking
store (tracking.store.Store), so the report shows what was recorded, nothing else.
"""

from mprun.report.cli import build, default_out, find_parent, main, write
from mprun.report.notes import notes_for
from mprun.report.plots import plot
from mprun.report.rows import Row, close_running, collect
from mprun.report.tables import Report, columns, group_columns, group_rows, table_rows

__all__ = [
    "Report",
    "Row",
    "build",
    "close_running",
    "collect",
    "columns",
    "default_out",
    "find_parent",
    "group_columns",
    "group_rows",
    "main",
    "notes_for",
    "plot",
    "table_rows",
    "write",
]
