"""Full fine-tuning: every parameter trains (optionally not the embeddings or the output head)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .base import Method


@dataclass(repr=False)
class Full(Method):
    """Full fine-tuning: ``theta = theta_0 + delta`` with every entry of ``delta`` free.

    Parameters
    ----------
    freeze_embeddings : bool, default=False
        Keep the token (and position) embeddings fixed. With tied embeddings (the zoo's bases) this also
        freezes the output head, since they are one tensor.
    freeze_head : bool, default=False
        Keep the output head fixed (the LM head, or a classifier head).
    """

    freeze_embeddings: bool = False
    freeze_head: bool = False

    name: ClassVar[str] = "full"
    paper: ClassVar[str] = ""

    def _apply(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        if self.freeze_embeddings:
            for module in model.modules():
                if isinstance(module, nn.Embedding):
                    module.weight.requires_grad_(False)
        if self.freeze_head:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if head is None:
                raise ValueError("Full(freeze_head=True): this model has no output head to freeze.")
            for p in head.parameters():
                p.requires_grad_(False)
