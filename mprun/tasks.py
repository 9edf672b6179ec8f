"""What a model is trained to do: its loss, its evaluation metrics, and the shape of output it must return.

The dataset declares its task; the loop, the fit check and the NaN tracer ask the task, so they never branch on it,
as they never branch on the dtype.
- classification: images in, logits (N, classes), targets (N,): cross-entropy, val/loss and val/acc.
- text_classification: token ids (N, T) in, padded with 0, and the same logits, loss and metrics.
- language_model: logits (N, T, vocab), next-token targets (N, T): cross-entropy per token, val/loss (nats per
  token), val/acc (next-token accuracy), val/ppl and, for a byte-level corpus, val/bpb (bits per byte).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Task:
    name: str
    headline: str  # the metric a sweep report compares ("acc", "bpb"): val/<headline>, final/val_<headline>
    higher_is_better: bool
    per_position: bool = False  # a prediction at every position of a window (a language model), not one per sample
    bytes_per_token: float = 0.0  # a byte-level corpus: 1 (val/bpb is loss in bits); 0: no bits-per-byte
    # What a model of this task is built with (DataBundle's fields of these names): an image classifier's input
    # channels, image size and classes; a text classifier's vocabulary and classes; a language model's vocabulary and
    # context length.
    inputs: tuple[str, ...] = ("in_chans", "image_size", "num_classes")

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean training loss over the batch's targets (every position of every window, for a language model)."""
        return F.cross_entropy(output.flatten(0, -2), target.flatten())

    def output_shape(self, inputs: torch.Tensor, classes: int) -> tuple[int, ...]:
        """The logits' shape a model must return for these inputs: (N, classes), or (N, T, vocab)."""
        return (*inputs.shape[:2], classes) if self.per_position else (inputs.shape[0], classes)

    def sums(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[loss sum, correct, targets] of a batch, in float64 on its device: summed over batches and ranks."""
        flat, target = output.flatten(0, -2).float(), target.flatten()
        return torch.stack(
            [
                F.cross_entropy(flat, target, reduction="sum").double(),
                (flat.argmax(dim=-1) == target).sum().double(),
                torch.full((), float(target.numel()), device=target.device, dtype=torch.float64),  # no host copy
            ]
        )

    def val_metrics(self) -> tuple[str, ...]:
        """The names of the val/ metrics that `metrics` computes."""
        return ("loss", "acc") + (("ppl",) if self.per_position else ()) + (("bpb",) if self.bytes_per_token else ())

    def metrics(self, loss_sum: float, correct: float, count: float) -> dict[str, float]:
        """val metrics (names without the val/ prefix) from the summed [loss, correct, targets]."""
        loss, acc = loss_sum / max(1.0, count), correct / max(1.0, count)
        out = {"loss": loss, "acc": acc}
        if self.per_position:
            out["ppl"] = math.exp(min(loss, 700.0))
            if self.bytes_per_token:
                out["bpb"] = loss / math.log(2) / self.bytes_per_token
        return out


CLASSIFICATION = Task("classification", headline="acc", higher_is_better=True)
TEXT_CLASSIFICATION = Task(
    "text_classification", headline="acc", higher_is_better=True, inputs=("vocab_size", "num_classes")
)
LANGUAGE_MODEL = Task(
    "language_model", headline="loss", higher_is_better=False, per_position=True, inputs=("vocab_size", "context")
)
BYTE_LANGUAGE_MODEL = dataclasses.replace(LANGUAGE_MODEL, headline="bpb", bytes_per_token=1.0)
