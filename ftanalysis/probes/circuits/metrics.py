"""Metrics for patching: each maps logits ``[batch, pos, vocab]`` to one scalar per example ``[batch]``.

The patching functions call ``metric(logits)`` on the logits of each batch of ``n`` examples (clean,
corrupted, or one patched copy) and average the result over the examples.

Examples
--------
>>> import torch
>>> from ftanalysis.probes.circuits import logit_diff
>>> logits = torch.zeros(2, 3, 5); logits[0, -1, 1] = 2.0; logits[1, -1, 4] = 1.0
>>> logit_diff(torch.tensor([1, 4]), torch.tensor([0, 0]))(logits)
tensor([2., 1.])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _ids(values, name: str) -> torch.Tensor:
    try:
        ids = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"The {name!r} parameter must be token ids (a 1-D tensor or list of ints). Got {values!r}.") from err
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"The {name!r} parameter must hold integer token ids (a float would be truncated). Got dtype {ids.dtype}.")
    ids = ids.long()
    if ids.ndim != 1:
        raise ValueError(f"The {name!r} parameter must be a 1-D tensor with one token id per example. Got shape {tuple(ids.shape)}.")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(
            f"The {name!r} parameter holds the token id {int(ids.min())}; ids are >= 0 (a negative id would silently "
            "index from the end of the vocabulary). Use tok.convert_tokens_to_ids(...)."
        )
    return ids


def _check_batch(logits: torch.Tensor, ids: torch.Tensor, owner: str) -> None:
    if logits.ndim != 3 or logits.shape[0] != ids.shape[0]:
        raise ValueError(f"{owner} expects logits [batch={ids.shape[0]}, pos, vocab]. Got shape {tuple(logits.shape)}.")
    if ids.numel() and int(ids.max()) >= logits.shape[-1]:
        raise ValueError(
            f"{owner} holds the token id {int(ids.max())}, outside the model's vocabulary of {logits.shape[-1]} "
            "tokens: the answer ids must come from this model's tokenizer."
        )


@dataclass(frozen=True)
class LogitDiff:
    """``logits[i, position, answer_i] - logits[i, position, wrong_i]`` (IOI's logit difference, Wang et al. 2022)."""

    answer_ids: torch.Tensor
    wrong_ids: torch.Tensor
    position: int = -1

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        _check_batch(logits, self.answer_ids, "logit_diff")
        _check_batch(logits, self.wrong_ids, "logit_diff (wrong_ids)")
        last = logits[:, self.position].float()  # [batch, vocab]
        rows = torch.arange(last.shape[0], device=last.device)
        return last[rows, self.answer_ids.to(last.device)] - last[rows, self.wrong_ids.to(last.device)]


@dataclass(frozen=True)
class AnswerLogProb:
    """``log p(answer_i)`` at ``position`` (set ``prob=True`` for the probability itself)."""

    answer_ids: torch.Tensor
    position: int = -1
    prob: bool = False

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        _check_batch(logits, self.answer_ids, "answer_logprob")
        logp = torch.log_softmax(logits[:, self.position].float(), dim=-1)
        rows = torch.arange(logp.shape[0], device=logp.device)
        value = logp[rows, self.answer_ids.to(logp.device)]
        return value.exp() if self.prob else value


@dataclass(frozen=True)
class AnswerLogit:
    """The raw logit of the answer token at ``position`` (linear in the final residual stream up to the norm)."""

    answer_ids: torch.Tensor
    position: int = -1

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        _check_batch(logits, self.answer_ids, "answer_logit")
        last = logits[:, self.position].float()
        return last[torch.arange(last.shape[0], device=last.device), self.answer_ids.to(last.device)]


def logit_diff(answer_ids, wrong_ids, position: int = -1) -> LogitDiff:
    """Metric: answer logit minus a wrong answer's logit at ``position``, one value per example."""
    answer, wrong = _ids(answer_ids, "answer_ids"), _ids(wrong_ids, "wrong_ids")
    if answer.shape != wrong.shape:
        raise ValueError(f"'answer_ids' and 'wrong_ids' must have the same shape. Got {tuple(answer.shape)} and {tuple(wrong.shape)}.")
    return LogitDiff(answer, wrong, position)


def answer_logprob(answer_ids, position: int = -1, prob: bool = False) -> AnswerLogProb:
    """Metric: log-probability (or probability) of the answer token at ``position``."""
    return AnswerLogProb(_ids(answer_ids, "answer_ids"), position, prob)


def answer_logit(answer_ids, position: int = -1) -> AnswerLogit:
    """Metric: the answer token's logit at ``position``."""
    return AnswerLogit(_ids(answer_ids, "answer_ids"), position)
