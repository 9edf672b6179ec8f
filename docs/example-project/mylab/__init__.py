"""A small project of one's own: a model and a dataset that mprun trains without knowing them (docs/your-model.md)."""
