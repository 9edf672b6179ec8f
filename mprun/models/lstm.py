"""model=lstm: token embedding, an LSTM (optionally bidirectional, stacked), a linear head.

For text classification (dataset=textfolder) the head reads each text's last hidden state, the LSTM having run over
the text's real tokens only: the batch is packed (pack_padded_sequence), the lengths found from the padding id 0.
As a language model (dataset=pycode, textfile) the head reads every position, giving next-token logits.

Under autocast: on the CPU the recurrence runs in float32 (CPU autocast is turned off around it: torch's CPU LSTM
goes through oneDNN, whose float16 LSTM fails); the head's matmul follows autocast. On CUDA, autocast runs cuDNN's
LSTM in float16, packed or not, and in float16 under bf16 autocast too (aten/src/ATen/cudnn/AutocastRNN.cpp casts to
half whatever the autocast dtype).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from mprun.errors import ConfigError


class LSTM(nn.Module):
    """Token ids (N, T), padded with 0 -> a classifier's logits (N, num_classes); built with a context instead of
    classes, a language model's next-token logits (N, T, vocab_size)."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = 0,
        context: int = 0,
        *,
        embed: int = 64,
        hidden: int = 128,
        layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.per_position = not num_classes
        if self.per_position and bidirectional:
            raise ConfigError(
                "model.bidirectional=true would let a language model read the tokens it is predicting: "
                "set model.bidirectional=false (bidirectional suits text classification, dataset=textfolder)"
            )
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=None if self.per_position else 0)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            embed, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0, bidirectional=bidirectional
        )
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), vocab_size if self.per_position else num_classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embedding(idx))
        # CPU autocast off around the recurrence (CUDA's is another context and stays on): the CPU LSTM goes through
        # oneDNN, which fails in float16 ("could not create a primitive descriptor"). In float32 it runs on all.
        with torch.autocast("cpu", enabled=False):
            if self.per_position:  # whole windows, nothing to pack: every position's output
                features = self.lstm(x)[0]
            else:  # packed, so that the LSTM stops at each text's end (a host sync: the lengths go to the CPU)
                lengths = (idx != 0).sum(dim=1).clamp(min=1).cpu()
                _, (h, _) = self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
                features = torch.cat([h[-2], h[-1]], dim=1) if self.lstm.bidirectional else h[-1]  # top layer's
        return self.head(self.drop(features))
