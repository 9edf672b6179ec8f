"""Training: the trainer group's schema and the loop.

- config.py  the trainer group's schema (imports no torch)
- state.py   where training stands (TrainState, checkpointed), what it trains with (Training), what fit returns
- loop.py    fit -> train_epoch -> train_step, evaluate
- memory.py  peak memory (the device's, or the process's on a CPU) and the parameters' and optimizer state's bytes
"""
