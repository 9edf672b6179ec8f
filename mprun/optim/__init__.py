"""Optimizers and LR schedules: config.py (the schemas, no torch), factories.py (fused kernels, the schedules)."""
