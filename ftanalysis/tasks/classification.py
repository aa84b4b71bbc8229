"""Sentence classification tasks for encoders (MiniLM, BERT, RoBERTa with a classifier head).

A classification task draws ``Example(prompt=sentence, answer=label name)`` like the procedural tasks, but
batches as ``input_ids``/``attention_mask`` with one class index per sentence in ``labels``, and scores a
model whose output ``logits`` are ``[batch, n_classes]`` (see :class:`ftanalysis.zoo.EncoderClassifier`).
Splits are made by a stable hash of the *word* that carries the label, so no test word is ever trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..stats import wilson_interval
from .base import Example, Task, _check_split


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Base class: subclasses set ``labels`` and implement ``sample(rng, split)``."""

    kind: ClassVar[str] = "classification"
    labels: ClassVar[tuple[str, ...]] = ()

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    @property
    def chance(self) -> float:
        return 1 / self.n_classes

    def sample(self, rng: random.Random, split: str = "train") -> Example:  # type: ignore[override]
        raise NotImplementedError

    def _draw(self, rng: random.Random, split: str) -> Example:
        return self.sample(rng, split)

    def words(self) -> set[str]:
        rng = random.Random(f"{self.name}|words")
        return {w for split in ("train", "val", "test") for _ in range(50) for w in self.sample(rng, split).prompt.split()}

    def check_tokenizer(self, tok) -> None:
        """Raise ``ValueError`` if the tokenizer maps words of this task to its unknown token."""
        unk = tok.unk_token_id
        rng = random.Random(f"{self.name}|tokcheck")
        texts = [self.sample(rng, s).prompt for s in ("train", "test") for _ in range(20)]
        bad = [t for t in texts if unk is not None and unk in tok(t)["input_ids"]]
        if bad:
            raise ValueError(
                f"The tokenizer cannot write sentences of task {self.name!r} (unknown words in {bad[0]!r}): "
                "this task needs a subword tokenizer such as MiniLM's (fta.zoo.load('minilm'))."
            )

    def collate(self, examples: list[Example], tok, device=None) -> dict:
        enc = tok([e.prompt for e in examples], padding=True, return_tensors="pt")
        labels = torch.tensor([self.labels.index(e.answer) for e in examples])
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch

    def batch(self, tok, batch_size: int, step: int = 0, split: str = "train", seed: int = 0, device=None) -> dict:
        _check_split(split, f"{type(self).__name__}.batch")
        return self.collate(self.train_examples(batch_size, step, split, seed), tok, device=device)

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def predict_proba(self, model, tok, examples: list[Example], batch_size: int = 128) -> torch.Tensor:
        """Class probabilities ``[n, n_classes]`` for the given examples."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = []
        try:
            for start in range(0, len(examples), batch_size):
                batch = self.collate(examples[start : start + batch_size], tok, device=device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                out.append(torch.softmax(logits.float(), -1).cpu())
        finally:
            model.train(was_training)
        return torch.cat(out)

    def evaluate(self, model, tok, split: str = "test", n: int = 512, batch_size: int = 128) -> dict:
        _check_split(split, f"{type(self).__name__}.evaluate")
        examples = self.examples(n, split)
        probs = self.predict_proba(model, tok, examples, batch_size)
        if probs.shape[-1] != self.n_classes:
            raise ValueError(f"The model outputs {probs.shape[-1]} classes but task {self.name!r} has {self.n_classes}.")
        labels = torch.tensor([self.labels.index(e.answer) for e in examples])
        correct = int((probs.argmax(-1) == labels).sum())
        loss = float(torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), labels))
        return {
            "accuracy": correct / n,
            "accuracy_ci": wilson_interval(correct, n),
            "loss": loss,
            "n": n,
            "chance": self.chance,
        }
