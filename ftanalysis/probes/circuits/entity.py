"""Entity-tracking inputs for the circuit probes: token positions by role, corruptions and DCM desiderata.

The prompt format is the package's entity-tracking task (Kim and Schuster 2023, arXiv 2305.02363; the
format of Prakash et al. 2024, arXiv 2402.14811)::

    <bos> the apple is in box F , the key is in box C , the cup is in box Q . box C contains the  ->  key

Position roles (one ``[batch]`` tensor each, as Prakash et al. name them):

- ``"last"``: the final ``the``, where the answer is read;
- ``"query label"``: the queried box label (``C`` above, three from the end);
- ``"previous query label"``: the earlier occurrence of that label, in the context;
- ``"object"``: the answer object in the context (four tokens before the previous query label).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..._validation import check_int
from ...tasks.base import split_of
from ...tasks.entity_tracking import EntityTracking, format_context
from ...tasks.vocab import OBJECTS, UPPER

ROLES = ("last", "query label", "previous query label", "object")


@dataclass
class EntityBatch:
    """Tokenised entity-tracking prompts of one length, with their answers and role positions."""

    ids: torch.Tensor  # [batch, pos]
    answers: torch.Tensor  # [batch] answer token ids
    objects: list[list[str]]
    labels: list[list[str]]
    query: torch.Tensor  # [batch] index of the queried box in the context
    roles: dict[str, torch.Tensor]  # role -> [batch] positions
    prompts: list[str]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def subset(self, index) -> "EntityBatch":
        index = torch.as_tensor(index).long()
        pick = index.tolist()
        return EntityBatch(self.ids[index], self.answers[index], [self.objects[i] for i in pick], [self.labels[i] for i in pick],
                           self.query[index], {k: v[index] for k, v in self.roles.items()}, [self.prompts[i] for i in pick])


def _build(tok, rows: list[tuple[list[str], list[str], int]]) -> EntityBatch:
    prompts, ids = [], []
    for objects, labels, q in rows:
        prompt = format_context(objects, labels) + f" box {labels[q]} contains the"
        prompts.append(prompt)
        ids.append(tok(prompt)["input_ids"])
    lengths = {len(i) for i in ids}
    if len(lengths) != 1:
        raise ValueError(f"Entity prompts must share one length (one token per word); got lengths {sorted(lengths)}.")
    ids_t = torch.tensor(ids)
    seq = ids_t.shape[1]
    query = torch.tensor([q for _, _, q in rows])
    # <bos>, then 7 tokens per clause "the OBJ is in box LABEL ,": the label of clause i sits at 6 + 7 i
    prev_label = 6 + 7 * query
    answers = torch.tensor([tok.convert_tokens_to_ids(objects[q]) for objects, _, q in rows])
    for i in range(len(rows)):  # check the arithmetic against the tokens themselves
        if ids_t[i, prev_label[i]] != ids_t[i, seq - 3] or ids_t[i, prev_label[i] - 4] != answers[i]:
            raise ValueError(f"Unexpected tokenisation of the entity prompt {prompts[i]!r}: use the task tokenizer.")
    roles = {
        "last": torch.full_like(query, seq - 1),
        "query label": torch.full_like(query, seq - 3),
        "previous query label": prev_label,
        "object": prev_label - 4,
    }
    return EntityBatch(ids_t, answers, [r[0] for r in rows], [r[1] for r in rows], query, roles, prompts)


def _parse(example) -> tuple[list[str], list[str], int]:
    words = example.prompt.split()
    clauses = " ".join(words[:-4]).rstrip(" .").split(" , ")
    objects = [c.split()[1] for c in clauses]
    labels = [c.split()[-1] for c in clauses]
    return objects, labels, labels.index(words[-3])


def entity_batch(tok, n: int, n_boxes: int = 3, split: str = "test", seed: int = 0) -> EntityBatch:
    """The first ``n`` examples of the entity-tracking task's ``split`` (task seed ``seed``), with role positions."""
    check_int(n, "n", "entity_batch", 1)
    task = EntityTracking(n_boxes=n_boxes, seed=seed)
    return _build(tok, [_parse(ex) for ex in task.examples(n, split)])


def corrupt_query(batch: EntityBatch, tok, seed: int = 0) -> EntityBatch:
    """Same contexts, but the query asks for another box of the context (so the answer changes).

    The minimal pair for patching: only the query-label token differs between clean and corrupt.
    """
    rng = random.Random(seed)
    rows = []
    for objects, labels, q in zip(batch.objects, batch.labels, batch.query.tolist()):
        other = rng.choice([i for i in range(len(labels)) if i != q])
        rows.append((objects, labels, other))
    return _build(tok, rows)


def corrupt_binding(batch: EntityBatch, tok, seed: int = 0) -> EntityBatch:
    """Same objects, labels and query, but the objects rotated among the boxes (every box changes object).

    Only the binding differs: the answer becomes another object of the same context, and every token of
    the query is unchanged, so this corruption reaches the heads that move objects onto their box labels.
    """
    rng = random.Random(seed)
    rows = []
    for objects, labels, q in zip(batch.objects, batch.labels, batch.query.tolist()):
        shift = rng.randrange(1, len(objects))
        rows.append((objects[shift:] + objects[:shift], labels, q))
    return _build(tok, rows)


def desiderata(tok, n: int, n_boxes: int = 3, seed: int = 0, split: str = "test") -> tuple[EntityBatch, EntityBatch, dict[str, torch.Tensor]]:
    """``(base, source, targets)`` for DCM on entity tracking (Prakash et al.'s three desiderata).

    Base and source have disjoint objects and queries at different box indices ``q != q'``; the source's
    query label also labels a third box ``j`` of the base. Targets, one ``[batch]`` tensor each:

    - ``"positional"``: the base object at the source's query index ``q'`` (a positional pointer moved);
    - ``"object_value"``: the source's answer object (the value itself moved);
    - ``"box_label_value"``: the base object in box ``j`` (the queried label moved).

    The base prompts belong to ``split`` of the task's prompt hash.
    """
    check_int(n, "n", "desiderata", 1)
    check_int(n_boxes, "n_boxes", "desiderata", 3, len(UPPER) // 2)
    rng = random.Random(f"desiderata|{n_boxes}|{seed}|{split}")
    base_rows, source_rows, targets = [], [], {"positional": [], "object_value": [], "box_label_value": []}
    while len(base_rows) < n:
        objects = rng.sample(OBJECTS, n_boxes)
        labels = rng.sample(UPPER, n_boxes)
        q = rng.randrange(n_boxes)
        prompt = format_context(objects, labels) + f" box {labels[q]} contains the"
        if split_of(prompt) != split:
            continue
        q_src = rng.choice([i for i in range(n_boxes) if i != q])
        j = rng.choice([i for i in range(n_boxes) if i not in (q, q_src)])
        src_objects = rng.sample([o for o in OBJECTS if o not in objects], n_boxes)
        src_labels = rng.sample([u for u in UPPER if u not in labels], n_boxes)
        src_labels[q_src] = labels[j]
        base_rows.append((objects, labels, q))
        source_rows.append((src_objects, src_labels, q_src))
        targets["positional"].append(objects[q_src])
        targets["object_value"].append(src_objects[q_src])
        targets["box_label_value"].append(objects[j])
    ids = {k: torch.tensor([tok.convert_tokens_to_ids(w) for w in v]) for k, v in targets.items()}
    return _build(tok, base_rows), _build(tok, source_rows), ids
