"""An MLP whose width and depth the project's config sets; mprun gives it what the data decides."""

from torch import nn


class Wide(nn.Module):
    """in_features -> depth x (Linear, GELU) of `hidden` units -> num_classes logits.

    in_features and num_classes come from the data: mprun passes them because the signature names them.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))
