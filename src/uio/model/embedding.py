"""The embedding table the model's modules use."""
from __future__ import annotations

from torch import nn


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose random init is skipped on the ``meta`` device, where models are built
    to be loaded: there it would compute nothing, yet make torch import ``torch._dynamo`` (1-3 s,
    the largest part of loading ``small``)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()
