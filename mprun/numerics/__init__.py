"""Numerics: catch mixed-precision trouble early and say what it is.

- guard.py  the policy: a non-finite loss without a scaler (fp32/bf16) and a collapsing fp16 loss scale stop the run
            (or warn) with a diagnosis
- trace.py  the NaN tracer: the first module whose output or gradient went non-finite, with its dtype and input ranges
- stats.py  underflow/overflow statistics per module against float16's range
"""

from mprun.numerics.guard import Guard
from mprun.numerics.stats import Stats, gradient_stats, stat_units, watch_activations
from mprun.numerics.trace import describe_trace, trace_nonfinite

__all__ = ["Guard", "Stats", "describe_trace", "gradient_stats", "stat_units", "trace_nonfinite", "watch_activations"]
