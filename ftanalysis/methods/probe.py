"""Linear probing: only the (new) head trains; the pretrained body stays frozen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .base import Method


@dataclass(repr=False)
class LinearProbe(Method):
    """Train only the output head (for an encoder classifier, the new linear head on the frozen body).

    The usual baseline for "how much does fine-tuning add over what the frozen features already encode"
    (e.g. Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features", arXiv 2202.10054).
    """

    name: ClassVar[str] = "linear_probe"
    paper: ClassVar[str] = "https://arxiv.org/abs/2202.10054"

    def _apply(self, model: nn.Module) -> None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ValueError("LinearProbe needs a model with an output head (get_output_embeddings()).")
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
