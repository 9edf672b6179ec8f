"""Training: the trainer group's schema (config.py, no torch) and the loop (loop.py: fit -> train_epoch ->
train_step, evaluate)."""
