"""Tasks written in English for a real BPE tokenizer (SmolLM2's), with the procedural tasks' ``Task`` API.

A natural task writes ordinary English prompts whose answers carry their leading space, the way a GPT-2-style
BPE tokenizer writes words in running text::

    When Mary and John went to the store, John gave a drink to  ->  " Mary"

``collate`` tokenises the prompt and the answer separately (``tok(prompt)`` + ``tok(answer,
add_special_tokens=False)``); with a byte-level BPE tokenizer that is exactly the tokenisation of the whole
text, so scoring the answer tokens is scoring what greedy decoding would write.

What this module adds to :class:`~ftanalysis.tasks.base.Task`:

- **A tokenizer check.** Each task lists the pieces that must be *one* token (names, objects, label words,
  every answer candidate), written with their leading space. :meth:`NaturalTask.check_tokenizer` requires
  that each encodes to exactly one token that decodes back to the piece, and that prompts round-trip without
  the unknown token. The zoo's word-level tokenizer (``fta.tasks.build_tokenizer()``) and MiniLM's WordPiece
  drop the leading space (and WordPiece lowercases), so they fail with a ``ValueError`` that names the pieces,
  instead of scoring wrong answers.
- **Candidate logits.** :func:`candidate_logits` reads, at the last prompt position, the logits of a few
  one-token answer candidates (right padding handled). Tasks that define :meth:`NaturalTask.candidates`
  report, next to ``accuracy`` (argmax over the whole vocabulary), the accuracy among the listed candidates
  (``choice_accuracy``; IOI calls it ``ioi_accuracy`` and adds the logit difference), from the same forward
  pass.

Examples
--------
>>> import ftanalysis as fta
>>> model, tok = fta.zoo.load("smollm2-135m")  # doctest: +SKIP
>>> fta.tasks.make("ioi").evaluate(model, tok, n=32)["logit_diff"]  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..stats import wilson_interval
from .base import Example, Task, _check_split, check_model_tokenizer, check_task_model, collate

BPE_HINT = "a BPE tokenizer with GPT-2-style leading-space tokens, such as SmolLM2's (model, tok = fta.zoo.load('smollm2-135m'))"


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, clean_up_tokenization_spaces=False)


def is_single_token(tok, piece: str) -> bool:
    """Whether ``piece`` (leading space included) encodes to exactly one known token that decodes back to it."""
    ids = tok(piece, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] != tok.unk_token_id and _decode(tok, ids) == piece


def token_id(tok, piece: str) -> int:
    """The id of a one-token ``piece`` (``ValueError`` when it is not one token)."""
    if not is_single_token(tok, piece):
        pieces = tok.convert_ids_to_tokens(tok(piece, add_special_tokens=False)["input_ids"])
        raise ValueError(f"{piece!r} is not one token with this tokenizer (it encodes to {pieces}); this needs {BPE_HINT}.")
    return tok(piece, add_special_tokens=False)["input_ids"][0]


def writes_exactly(tok, text: str) -> bool:
    """Whether the tokenizer writes ``text`` without the unknown token and decodes it back unchanged."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return tok.unk_token_id not in ids and _decode(tok, ids) == text


def _candidate_rows(tok, candidates, n: int) -> list[list[int]]:
    """One list of token ids per example, from one shared list of pieces or one list per example."""
    if candidates and isinstance(candidates[0], str):
        ids = [token_id(tok, c) for c in candidates]
        return [ids] * n
    if len(candidates) != n:
        raise ValueError(f"Got {n} prompts but {len(candidates)} candidate lists: give one shared list or one list per prompt.")
    return [[token_id(tok, c) for c in row] for row in candidates]


def _pick(last: torch.Tensor, rows: list[list[int]], width: int) -> torch.Tensor:
    """``last[i, rows[i]]`` from ``[batch, vocab]`` logits, padded with -inf to ``[batch, width]``."""
    out = torch.full((len(rows), width), float("-inf"))
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = last[i, ids]
    return out


def _last_logits_batches(model, tok, prompts: list[str], batch_size: int):
    """Yield ``[batch, vocab]`` float32 CPU logits at each prompt's last position (prompts padded on the right)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [tok(p)["input_ids"] for p in prompts[start : start + batch_size]]
            length = max(len(e) for e in encoded)
            input_ids = torch.full((len(encoded), length), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(encoded), length), dtype=torch.long)
            for i, ids in enumerate(encoded):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                mask[i, : len(ids)] = 1
            with torch.no_grad():
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits  # [batch, pos, vocab]
            last = (mask.sum(1) - 1).to(logits.device)  # right padding: the last real token of each row
            yield logits[torch.arange(len(encoded), device=logits.device), last].float().cpu()  # [batch, vocab]
    finally:
        model.train(was_training)


def last_position_logits(model, tok, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``[n_prompts, vocab]`` logits at each prompt's last position (the next-token prediction), float32 on CPU.

    Prompts are padded on the right; absolute positions of the real tokens are unchanged by right padding,
    so no position ids are needed. The model's train/eval mode is restored afterwards.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("last_position_logits needs at least one prompt.")
    return torch.cat(list(_last_logits_batches(model, tok, prompts, batch_size)))


def candidate_logits(
    model, tok, prompts: Sequence[str], candidates: Sequence[str] | Sequence[Sequence[str]], batch_size: int = 64
) -> torch.Tensor:
    """Logits of one-token answer candidates at each prompt's last position.

    Prompts are padded on the right; the last position of prompt ``i`` is ``attention_mask[i].sum() - 1``
    (absolute positions of the real tokens are unchanged by right padding, so no position ids are needed).

    Parameters
    ----------
    model : causal LM
        Any Hugging Face causal LM; its train/eval mode is restored afterwards.
    tok : tokenizer
        Must write every candidate as one token (with its leading space, e.g. ``" Mary"``).
    prompts : list of str
    candidates : list of str, or list of list of str
        One list shared by every prompt, or one list per prompt (lists may differ in length).
    batch_size : int, default=64

    Returns
    -------
    torch.Tensor
        ``[n_prompts, max candidates]`` float32 on CPU; positions past a shorter list hold ``-inf``.

    Examples
    --------
    >>> model, tok = fta.zoo.load("smollm2-135m")  # doctest: +SKIP
    >>> logits = candidate_logits(model, tok, ["When Mary and John went to the store, John gave a drink to"],
    ...                           [" Mary", " John"])  # doctest: +SKIP
    >>> float(logits[0, 0] - logits[0, 1]) > 0  # the IOI logit difference  # doctest: +SKIP
    True
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("candidate_logits needs at least one prompt.")
    rows = _candidate_rows(tok, list(candidates), len(prompts))
    width = max(len(r) for r in rows)
    batches = _last_logits_batches(model, tok, prompts, batch_size)
    return torch.cat([_pick(last, rows[i * batch_size : (i + 1) * batch_size], width) for i, last in enumerate(batches)])


@torch.no_grad()
def score_with_candidates(
    model, tok, examples: list[Example], candidates: list[Sequence[str]] | None = None, batch_size: int = 64
) -> tuple[dict, torch.Tensor | None]:
    """Teacher-forced scores (as :func:`~ftanalysis.tasks.base.score_examples`) and candidate logits, one pass.

    Returns ``(scores, logits)``: ``scores`` has ``accuracy``, ``accuracy_ci``, ``token_accuracy``, ``loss``
    and ``n``; ``logits`` is ``[n, max candidates]`` (``-inf`` padded) at the last prompt position, or None
    when ``candidates`` is None.
    """
    rows = _candidate_rows(tok, candidates, len(examples)) if candidates is not None else None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    correct, tokens_right, tokens, loss_sum, gathered = 0, 0, 0, 0.0, []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, tok, device=device)
            # position t predicts token t + 1: only the positions that predict an answer token are scored, so the
            # output layer (49,152 x 576 in SmolLM2, a fifth of its compute) runs on those alone
            labels = batch["labels"][:, 1:]
            keep = (labels != -100).any(0).nonzero().flatten()  # [kept], ascending
            if keeps_logits:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, keep]
            labels = labels[:, keep]  # [batch, kept], like logits [batch, kept, vocab]
            scored = labels != -100
            right = (logits.argmax(-1) == labels) & scored
            correct += int((right.sum(1) == scored.sum(1)).sum())
            tokens_right += int(right.sum())
            tokens += int(scored.sum())
            loss_sum += float(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))
            if rows is not None:
                # the last prompt token predicts the first answer token, so its position is among the kept ones
                last_prompt = torch.tensor([len(tok(ex.prompt)["input_ids"]) - 1 for ex in chunk], device=keep.device)
                index = torch.searchsorted(keep, last_prompt)
                last = logits[torch.arange(len(chunk), device=logits.device), index.to(logits.device)].float().cpu()  # [batch, vocab]
                gathered.append(_pick(last, rows[start : start + batch_size], max(len(r) for r in rows)))
    finally:
        model.train(was_training)
    n = len(examples)
    scores = {
        "accuracy": correct / n,
        "accuracy_ci": wilson_interval(correct, n),
        "token_accuracy": tokens_right / tokens,
        "loss": loss_sum / tokens,
        "n": n,
    }
    return scores, (torch.cat(gathered) if rows is not None else None)


@dataclass(frozen=True)
class NaturalTask(Task):
    """Base class of the English tasks for a real BPE tokenizer.

    Subclasses implement :meth:`sample`, :attr:`chance` and :meth:`single_tokens`; those with a closed set
    of answers also implement :meth:`candidates`, and ``evaluate`` then adds the accuracy among them (under
    the key ``choice_key``) with its Wilson interval.
    """

    name: ClassVar[str] = "natural"
    choice_key: ClassVar[str] = "choice_accuracy"

    # ------------------------------------------------------------------ to implement
    def single_tokens(self) -> set[str]:
        """Every piece that must be one token, with its leading space (``" Mary"``, ``" positive"``)."""
        raise NotImplementedError

    def candidates(self, example: Example) -> tuple[str, ...] | None:
        """The closed set of answers the example chooses among (the answer included), or None."""
        return None

    def _candidate_metrics(self, examples: list[Example], logits: torch.Tensor) -> dict:
        """Extra metrics from the candidate logits ``[n, k]`` (subclasses add to this)."""
        answer_index = torch.tensor([self.candidates(ex).index(ex.answer) for ex in examples])
        answer_logit = logits[torch.arange(len(examples)), answer_index]
        others = logits.clone()
        others[torch.arange(len(examples)), answer_index] = float("-inf")
        correct = int((answer_logit > others.max(-1).values).sum())  # strict: a tie is not a correct choice
        return {self.choice_key: correct / len(examples), f"{self.choice_key}_ci": wilson_interval(correct, len(examples))}

    # ------------------------------------------------------------------ shared
    def words(self) -> set[str]:
        """The pieces that must be one token each (see :meth:`single_tokens`)."""
        return set(self.single_tokens())

    def _probe_prompts(self) -> list[str]:
        rng = random.Random(f"{self.name}|tokcheck")
        return [self.sample(rng).prompt for _ in range(24)]

    def check_tokenizer(self, tok) -> None:
        """Raise ``ValueError`` unless ``tok`` writes every required piece as one token and prompts exactly.

        The message names the offending pieces and says which tokenizer the task needs.
        """
        not_single = sorted(p for p in self.single_tokens() if not is_single_token(tok, p))
        unwritable = [p for p in self._probe_prompts() if not writes_exactly(tok, p)]
        if not_single or unwritable:
            problems = []
            if not_single:
                problems.append(f"{len(not_single)} piece(s) that must be one token each are not: {not_single[:12]}")
            if unwritable:
                problems.append(f"prompts such as {unwritable[0]!r} do not survive encoding (unknown token or changed text)")
            raise ValueError(
                f"Task {self.name!r} needs {BPE_HINT}. With the given tokenizer ({type(tok).__name__}), "
                + "; ".join(problems) + "."
            )

    @torch.no_grad()
    def evaluate(self, model, tok, split: str = "test", n: int = 512, batch_size: int = 32) -> dict:
        """Score ``model`` on the first ``n`` examples of ``split`` in one teacher-forced pass per batch.

        Returns a dict with ``accuracy`` (the whole answer is the argmax over the vocabulary at every answer
        position, i.e. greedy decoding writes it), ``accuracy_ci`` (95% Wilson), ``token_accuracy``, ``loss``
        (nats per answer token), ``n``, ``chance``, and for tasks with :meth:`candidates` the accuracy among
        the candidates (key :attr:`choice_key`) with its ``_ci``. A batch holds ``[batch_size, pos, vocab]``
        float logits (about 0.5 GB at 32 x 80 tokens for SmolLM2's 49,152 tokens): lower it for long prompts.
        """
        _check_split(split, f"{type(self).__name__}.evaluate")
        self.check_tokenizer(tok)
        check_model_tokenizer(model, tok)
        check_task_model(model, tok, self, f"{type(self).__name__}.evaluate", name="self")
        examples = self.examples(n, split)
        listed = [self.candidates(ex) for ex in examples]
        has_candidates = listed[0] is not None
        scores, logits = score_with_candidates(model, tok, examples, listed if has_candidates else None, batch_size)
        scores["chance"] = self.chance
        if has_candidates:
            scores |= self._candidate_metrics(examples, logits)
        return scores
