"""Gaussian blobs: `classes` clusters in `dim` dimensions, made in memory (no download)."""

import torch
from torch.utils.data import TensorDataset


def blobs(n: int = 1000, classes: int = 4, dim: int = 16, spread: float = 0.5, seed: int = 0):
    """(train, val) TensorDatasets of float inputs and integer labels; the last fifth is validation."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * spread
    labels = torch.randint(0, classes, (n,), generator=g)
    inputs = centres[labels] + torch.randn(n, dim, generator=g)
    cut = n * 4 // 5
    return TensorDataset(inputs[:cut], labels[:cut]), TensorDataset(inputs[cut:], labels[cut:])
