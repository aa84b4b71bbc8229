"""A pretrained encoder with a mean-pooled linear classification head.

This is the setup of the measured MiniLM results (sentence tasks from the VADER lexicon): the body is any
supported encoder (``fta.zoo.load("minilm")`` gives all-MiniLM-L6-v2, a BERT), the head is new and seeded.
Methods keep the new head trainable (PEFT's ``modules_to_save``), whatever they do to the body.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .._validation import check_int, check_option


class EncoderClassifier(nn.Module):
    """``logits = head(mean over real tokens of body(input_ids).last_hidden_state)``.

    Parameters
    ----------
    body : a Hugging Face encoder (BERT / RoBERTa family) returning ``last_hidden_state``.
    n_classes : int
    pooling : {"mean", "cls"}, default="mean"
    seed : int, default=0
        Seed of the head's initialisation.
    """

    def __init__(self, body: nn.Module, n_classes: int, pooling: str = "mean", seed: int = 0):
        super().__init__()
        check_int(n_classes, "n_classes", "EncoderClassifier", 2)
        check_option(pooling, "pooling", "EncoderClassifier", ("mean", "cls"))
        self.body = body
        self.config = body.config
        self.pooling = pooling
        hidden = body.config.hidden_size
        generator = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(hidden, n_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(n_classes, hidden, generator=generator) * 0.02)
            self.head.bias.zero_()

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters the pretrained model did not have (kept trainable by every method)."""
        return list(self.head.parameters())

    def get_input_embeddings(self) -> nn.Module:
        return self.body.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled sentence embeddings ``[batch, hidden]``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [batch, pos, hidden]
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.head(self.embed(input_ids, attention_mask)))
