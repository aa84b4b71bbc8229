"""Which weight matrices a method targets: canonical names, kinds, regular expressions or ``"all-linear"``.

Accepted entries (a string or a list of them):

- ``"all-linear"``: every attention and MLP matrix of every block (not the embeddings or the LM head);
- a canonical name: ``"layers.3.attn.q"``;
- a kind, for every layer: ``"attn.q"``, ``"mlp.down"``, or a module type ``"attn"`` / ``"mlp"``;
- a regular expression matched against the full canonical name: ``r"layers\\.[01]\\.attn\\.[qv]"``.

An entry that matches nothing is an error that lists the names that exist: a typo never becomes a silent
no-op.
"""

from __future__ import annotations

import re

from ..nn.view import ModelView


def match_names(entry: str, names: list[str], kind_of) -> set[str]:
    """The canonical ``names`` one selector picks: a name, a kind (``"attn.q"``, ``"mlp.down"``), ``"attn"`` or
    ``"mlp"``, or a regular expression matched against whole names. Empty when nothing matches."""
    if entry in names:
        return {entry}
    if entry in ("attn", "mlp"):
        return {n for n in names if kind_of(n).split(".")[0] == entry}
    matched = {n for n in names if kind_of(n) == entry}
    if matched:
        return matched
    try:
        pattern = re.compile(entry)
    except re.error:
        return set()
    return {n for n in names if pattern.fullmatch(n)}


def resolve_targets(view: ModelView, target, owner: str = "target") -> list[str]:
    """Canonical names selected by ``target`` (in layer order, without duplicates)."""
    names = view.matrix_names()
    if target is None:
        raise ValueError(f"The 'target' parameter of {owner} must not be None; use 'all-linear' for every matrix.")
    entries = [target] if isinstance(target, str) else list(target) if isinstance(target, (list, tuple, set)) else None
    if not entries or not all(isinstance(e, str) for e in entries):
        raise TypeError(f"The 'target' parameter of {owner} must be a string or a list of strings. Got {target!r}.")
    chosen: set[str] = set()
    def kind_of(name: str) -> str:
        return view.ref(name).kind

    kinds = sorted({kind_of(n) for n in names})
    for entry in entries:
        matched = set(names) if entry == "all-linear" else match_names(entry, names, kind_of)
        if not matched:
            raise ValueError(
                f"The target {entry!r} of {owner} matches no weight matrix of this {view.family} model. "
                f"Use 'all-linear', a kind among {kinds + ['attn', 'mlp']}, a name such as {names[0]!r}, "
                "or a regular expression over those names."
            )
        chosen |= matched
    return [n for n in names if n in chosen]
