"""Models: what a run trains.

- config.py  the model group's schemas (imports no torch)
- vision.py  SimpleMLP, SimpleCNN, any timm or torchvision classifier
- gpt.py     the GPT-2-style language model (model=gpt)
- lstm.py    embedding, LSTM, head: a text classifier or a language model (model=lstm)
- fit.py     the check that a built model fits its data, before training
A project's own model is built by mprun/guest.py from its _target_.
"""
