"""Precision: how a run computes and stores its numbers, in one room.

- names.py    the precision options and what a recorded precision means (torch-free: the report reads them)
- config.py   the precision group's schema, checked before anything is built (torch-free)
- auto.py     which precision `auto` and an explicit request resolve to on this device
- probe.py    precision=auto on a CPU: a few timed steps per dtype, cached under the outputs root
- runtime.py  the Precision object: autocast, loss scaling, unscale -> clip -> step -> update, AMP telemetry
- fp8.py      precision=fp8: torchao's Float8Linear swap, as a model transform
- bf16_pure.py  precision=bf16_pure: the bf16 cast and the stochastic-rounding optimizers
- islands.py  fp32 islands: the modules precision.fp32_modules names run outside autocast, in float32
"""
