"""Which weight matrices a method targets: canonical names, kinds, regular expressions or ``"all-linear"``.

Accepted entries (a string or a list of them):

- ``"all-linear"``: every attention and MLP matrix of every block (not the embeddings or the LM head);
- a canonical name: ``"layers.3.attn.q"``;
- a kind, for every layer: ``"attn.q"``, ``"mlp.down"``, or a module type ``"attn"`` / ``"mlp"``;
- a regular expression matched against the full canonical name: ``r"layers\\.[01]\\.attn\\.[qv]"``;
- a Hugging Face module name, as PEFT's ``target_modules`` takes it (``"q_proj"``, ``"c_attn"``, ``"query"``):
  every matrix whose module path ends with it, so GPT-2's ``"c_proj"`` picks ``attn.o`` and ``mlp.down`` and
  its fused ``"c_attn"`` picks ``attn.q``, ``attn.k`` and ``attn.v``, as in PEFT.

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


def hf_module_name(view: ModelView, name: str) -> str:
    """The last part of the Hugging Face module path that holds canonical matrix ``name`` (``"q_proj"``)."""
    return view.ref(name).module_path.rsplit(".", 1)[-1]


def hf_name_map(view: ModelView) -> dict[str, list[str]]:
    """Hugging Face module names of ``view``'s model and the canonical kinds each one holds.

    >>> import ftanalysis as fta
    >>> hf_name_map(fta.nn.ModelView(fta.zoo.load("gpt2-tiny")[0]))["c_proj"]
    ['attn.o', 'mlp.down']
    """
    mapping: dict[str, set[str]] = {}
    for n in view.matrix_names():
        mapping.setdefault(hf_module_name(view, n), set()).add(view.ref(n).kind)
    return {module: sorted(kinds) for module, kinds in sorted(mapping.items())}


def take_target_modules(method, default) -> None:
    """Accept PEFT's ``target_modules=`` as an alias of ``target=`` on ``method`` (a dataclass being initialised).

    Both at once is an error unless they agree; afterwards ``target`` holds the value and ``target_modules``
    is None, so the method's repr (and the fine-tune cache key) is the same whichever name was used.
    """
    alias = method.target_modules
    if alias is None:
        return
    owner = type(method).__name__
    if method.target != default and method.target != alias:
        raise ValueError(
            f"{owner} got both target={method.target!r} and target_modules={alias!r}; "
            "target_modules is PEFT's name for target: pass one of them."
        )
    method.target = list(alias) if isinstance(alias, (list, tuple, set)) else alias
    method.target_modules = None


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
        if not matched:  # a Hugging Face module name, matched as PEFT matches target_modules
            matched = {n for n in names if hf_module_name(view, n) == entry or view.ref(n).module_path.endswith("." + entry)}
        if not matched:
            modules = sorted({hf_module_name(view, n) for n in names})
            raise ValueError(
                f"The target {entry!r} of {owner} matches no weight matrix of this {view.family} model. "
                f"Use 'all-linear', a kind among {kinds + ['attn', 'mlp']}, a name such as {names[0]!r}, "
                f"a Hugging Face module name among {modules}, or a regular expression over the names."
            )
        chosen |= matched
    return [n for n in names if n in chosen]
