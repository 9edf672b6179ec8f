"""The model group's schemas: every option's defaults and checks, and the tasks it serves. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from omegaconf import MISSING

from mprun.errors import require
from mprun.schema import Buildable


@dataclass
class ModelConfig(Buildable):
    """A model: built with what its dataset's DataBundle.model_inputs() gives (an image classifier: in_chans,
    image_size and num_classes)."""

    TASKS = ("classification",)  # the tasks (mprun.tasks) it can serve; a class attribute, not a setting


@dataclass
class SimpleMLPConfig(ModelConfig):
    _target_: str = "mprun.models.vision.SimpleMLP"
    hidden: int = 256
    depth: int = 2
    # Multiplies the gradient flowing back from the logits (forward unchanged). 1e-6 builds a model whose
    # gradients underflow in fp16 without loss scaling: the loss_scaling experiment.
    grad_scale: float = 1.0

    def __post_init__(self) -> None:
        require(self.hidden >= 1, f"hidden={self.hidden} must be >= 1")
        require(self.depth >= 1, f"depth={self.depth} must be >= 1")
        require(self.grad_scale > 0, f"grad_scale={self.grad_scale} must be > 0")


@dataclass
class SimpleCNNConfig(ModelConfig):
    _target_: str = "mprun.models.vision.SimpleCNN"
    width: int = 32

    def __post_init__(self) -> None:
        require(self.width >= 1, f"width={self.width} must be >= 1")


@dataclass
class TimmModelConfig(ModelConfig):
    _target_: str = "mprun.models.vision.timm_model"
    name: str = MISSING
    pretrained: bool = False  # True downloads weights from the Hugging Face hub
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TorchvisionModelConfig(ModelConfig):
    _target_: str = "mprun.models.vision.torchvision_model"
    name: str = MISSING
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class GPTConfig(ModelConfig):
    TASKS = ("language_model",)
    _target_: str = "mprun.models.gpt.GPT"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64  # the positions the model has: the longest window it can read (pycode's default)
    dropout: float = 0.0
    bias: bool = False  # biases in the linear layers and LayerNorms (GPT-2 has them; most recent models do not)
    # The fp16-overflow experiment (experiment=fp16_overflow): block ff_gain_block's feed-forward hidden activations
    # are multiplied by ff_gain, and its output divided by it. In exact arithmetic the model is the same (GELU of a
    # large input is the input); in float16 activations past 65504 are inf, as in T5's feed-forward layers.
    ff_gain: float = 1.0
    ff_gain_block: int = 0

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        require(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        require(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")
        require(self.ff_gain > 0, f"ff_gain={self.ff_gain} must be > 0")
        require(
            0 <= self.ff_gain_block < self.n_layer,
            f"ff_gain_block={self.ff_gain_block} must name a block, 0 to n_layer-1={self.n_layer - 1}",
        )


@dataclass
class LSTMConfig(ModelConfig):
    TASKS = ("text_classification", "language_model")
    _target_: str = "mprun.models.lstm.LSTM"
    embed: int = 64
    hidden: int = 128
    layers: int = 1
    bidirectional: bool = False  # true reads each text both ways (a classifier only: an LM would see its targets)
    dropout: float = 0.0  # on the embeddings, between stacked layers and before the head

    def __post_init__(self) -> None:
        for key in ("embed", "hidden", "layers"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        require(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")
