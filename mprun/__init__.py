"""mprun: a declarative, config-driven experiment runner for mixed-precision training."""

__version__ = "0.1.0"
