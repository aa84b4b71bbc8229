"""The method contract, one parametrised suite over ``CASES`` (methods x tiny GPT-2 / Llama / BERT models).

For every case: identity at initialisation (where the method starts there); with randomised adapter
parameters, merged equals unmerged within 1e-5 (or merge raises for methods without a dense form); one
gradient step changes only the method's trainable parameters; the same seed gives the same numbers;
``apply(copy=True)`` leaves the original untouched. Then bad input.

To add a method: append ``(id, family, MethodCls, kwargs)`` rows to ``CASES`` and, if its trainable
parameters have a recognisable name, a regular expression to ``TRAINABLE_NAMES``. A method that needs data
before ``apply`` gets it in :func:`_prepare`.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.methods import (
    IA3,
    SSF,
    Adapter,
    BitFit,
    ChainLoRA,
    CorDA,
    DoRA,
    Full,
    LinearProbe,
    LoRA,
    PrefixTuning,
)
from ftanalysis.methods.base import APPLIED_ATTR
from ftanalysis.train import TrainState

CASES = [
    ("full-gpt2", "gpt2", Full, {}),
    ("full-bert", "bert", Full, {"freeze_embeddings": True}),
    ("probe-gpt2", "gpt2", LinearProbe, {}),
    ("lora-gpt2", "gpt2", LoRA, {"r": 4, "alpha": 8}),
    ("lora-llama-rslora", "llama", LoRA, {"r": 4, "alpha": 8, "rslora": True, "target": ["attn.q", "attn.v", "mlp"]}),
    ("lora-bert-b-only", "bert", LoRA, {"r": 2, "train_a": False}),
    ("lora-llama-pissa", "llama", LoRA, {"r": 2, "init": "pissa", "target": "attn"}),
    ("lora-gpt2-dropout", "gpt2", LoRA, {"r": 2, "dropout": 0.1, "target": "attn.k"}),
    ("dora-gpt2", "gpt2", DoRA, {"r": 2, "target": ["attn.q", "attn.v", "mlp.down"]}),
    ("dora-llama", "llama", DoRA, {"r": 4}),
    ("dora-bert", "bert", DoRA, {"r": 2, "target": "attn"}),
    ("corda-ipm-gpt2", "gpt2", CorDA, {"r": 2, "target": ["attn.q", "mlp.up"]}),
    ("corda-kpm-llama", "llama", CorDA, {"r": 2, "mode": "kpm"}),
    ("chain-llama", "llama", ChainLoRA, {"r": 2, "restart_every": 2}),
    ("bitfit-gpt2", "gpt2", BitFit, {}),
    ("bitfit-llama", "llama", BitFit, {"target": ["attn", "mlp.down"]}),
    ("bitfit-bert", "bert", BitFit, {}),
    ("ia3-gpt2", "gpt2", IA3, {}),
    ("ia3-llama", "llama", IA3, {}),
    ("ia3-bert", "bert", IA3, {}),
    ("ssf-gpt2", "gpt2", SSF, {}),
    ("ssf-llama", "llama", SSF, {}),
    ("ssf-bert", "bert", SSF, {"target": "mlp"}),
    ("adapter-par-mlp-gpt2", "gpt2", Adapter, {"r": 4, "position": "mlp", "mode": "parallel", "scaling": 4.0}),
    ("adapter-seq-attn-llama", "llama", Adapter, {"r": 4, "position": "attn", "mode": "sequential"}),
    ("adapter-par-both-bert", "bert", Adapter, {"r": 2, "position": ["attn", "mlp"]}),
    ("prefix-gpt2", "gpt2", PrefixTuning, {"n_prefix": 3}),
    ("prefix-llama-mlp", "llama", PrefixTuning, {"n_prefix": 2, "hidden": 8, "layers": [1]}),
    ("prefix-bert", "bert", PrefixTuning, {"n_prefix": 2}),
]

# what the trainable parameters of each method are called (checked on every case of that method)
TRAINABLE_NAMES = {
    "lora": r".*\.lora_(A|B)\.\w+",
    "corda": r".*\.lora_(A|B)\.\w+",
    "chain_lora": r".*\.lora_(A|B)\.\w+",
    "dora": r".*\.lora_(A|B|magnitude)\.\w+",
    "bitfit": r".*\.bias",
    "ia3": r".*\.ia3_l\.\w+",
    "ssf": r".*\.ssf_(scale|shift)\.\w+",
    "adapter": r".*\.adapter\.adapter_(down|up)\.(weight|bias)",
    "prefix": r"fta_prefix\..*",
    "linear_probe": r"lm_head\.weight|transformer\.wte\.weight",
}


def _ids(seed=0, shape=(2, 9)):
    return torch.randint(5, 200, shape, generator=torch.Generator().manual_seed(seed))


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _prepare(method, model):
    """Give data-dependent methods their data before ``apply``."""
    if isinstance(method, CorDA):
        method.calibrate(model, [_ids(s, (3, 10)) for s in range(3)])


def _build(family, cls, kwargs, seed=0):
    model = make_tiny(family)
    method = cls(**kwargs)
    _prepare(method, model)
    torch.manual_seed(seed)
    return model, method, method.apply(model, copy=True)


def _randomise(method, model, seed=1, scale=0.2):
    """Move every trainable parameter away from its (often identity) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _train_step(method, model, seed=0):
    optimizer = method.make_optimizer(model, lr=1e-2, weight_decay=0.1)
    state = TrainState(step=0, steps=1, lr=1e-2, model=model, optimizer=optimizer, seed=seed)
    model.train()
    method.before_step(state)
    method.training_step(state, {"input_ids": _ids(seed + 7)}, lambda b: _out(model, b["input_ids"]).pow(2).mean(), grad_clip=1.0)
    method.after_step(state)
    model.eval()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


ids_of = [c[0] for c in CASES]


@pytest.mark.parametrize("case_id, family, cls, kwargs", CASES, ids=ids_of)
def test_identity_at_init(case_id, family, cls, kwargs):
    if not cls.identity_at_init:
        pytest.skip(f"{cls.__name__} does not start at the base model (identity_at_init=False)")
    model, method, adapted = _build(family, cls, kwargs)
    ids = _ids()
    # PiSSA / CorDA store W_res = W - s B A next to B A: float32 rounding of the SVD-based split, ~1e-7 here
    assert torch.allclose(_out(adapted, ids), _out(model, ids), atol=1e-5)


@pytest.mark.parametrize("case_id, family, cls, kwargs", CASES, ids=ids_of)
def test_merge_equals_unmerged(case_id, family, cls, kwargs):
    model, method, adapted = _build(family, cls, kwargs)
    if not cls.has_dense_form:
        with pytest.raises(ValueError, match="no dense form"):
            method.merge(adapted)
        return
    _randomise(method, adapted)
    ids = _ids(3)
    unmerged = _out(adapted, ids)
    merged = method.merge(adapted)
    assert type(merged) is type(model)
    assert {type(m).__name__ for m in merged.modules()} == {type(m).__name__ for m in model.modules()}
    assert not getattr(merged, APPLIED_ATTR, [])
    assert torch.allclose(_out(merged, ids), unmerged, atol=1e-5), (_out(merged, ids) - unmerged).abs().max()
    if cls.identity_at_init:
        assert not torch.allclose(unmerged, _out(model, ids), atol=1e-4)  # the randomised update is visible


@pytest.mark.parametrize("case_id, family, cls, kwargs", CASES, ids=ids_of)
def test_only_the_intended_parameters_train(case_id, family, cls, kwargs):
    model, method, adapted = _build(family, cls, kwargs)
    trainable = [n for n, _ in method.trainable_parameters(adapted)]
    assert trainable, "no trainable parameter"
    pattern = TRAINABLE_NAMES.get(cls.name)
    if pattern is not None:
        assert all(re.fullmatch(pattern, n) for n in trainable), [n for n in trainable if not re.fullmatch(pattern, n)]
    if kwargs.get("train_a") is False:
        assert not any(".lora_A." in n for n in trainable)
    _randomise(method, adapted)  # so that every trainable parameter receives a gradient (B = 0 blocks A's)
    before = _snapshot(adapted)
    _train_step(method, adapted)
    after = adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "a training step changed nothing"
    pointers = {p.data_ptr() for _, p in method.trainable_parameters(adapted)}
    allowed = {k for k, v in before.items() if adapted.state_dict()[k].data_ptr() in pointers}  # tied weights: both names
    if cls is ChainLoRA:  # a restart folds the adapter into the wrapped weights
        allowed |= {k for k in before if ".base_layer." in k}
    assert changed <= allowed, sorted(changed - allowed)[:5]


@pytest.mark.parametrize("case_id, family, cls, kwargs", CASES, ids=ids_of)
def test_same_seed_same_numbers(case_id, family, cls, kwargs):
    runs = []
    for _ in range(2):
        _, method, adapted = _build(family, cls, kwargs, seed=5)
        _train_step(method, adapted, seed=5)
        runs.append((_snapshot(adapted), _out(adapted, _ids(4))))
    (a, out_a), (b, out_b) = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize("case_id, family, cls, kwargs", CASES, ids=ids_of)
def test_apply_copy_leaves_the_original_untouched(case_id, family, cls, kwargs):
    model = make_tiny(family)
    method = cls(**kwargs)
    _prepare(method, model)
    state = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    kinds = [type(m).__name__ for m in model.modules()]
    implementation = model.config._attn_implementation
    adapted = method.apply(model, copy=True)
    _randomise(method, adapted)
    _train_step(method, adapted)
    assert adapted is not model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and state.keys() == model.state_dict().keys()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [type(m).__name__ for m in model.modules()] == kinds
    assert model.config._attn_implementation == implementation
    assert not hasattr(model, APPLIED_ATTR)


def test_every_registered_method_has_a_paper_and_a_case():
    registered = fta.methods.available()
    mine = {"lora", "dora", "corda", "chain_lora", "bitfit", "ia3", "ssf", "adapter", "prefix"}
    assert mine <= set(registered)
    assert all(registered[name].startswith("https://arxiv.org/abs/") for name in mine)
    covered = {cls.name for _, _, cls, _ in CASES}
    assert mine <= covered


# ---------------------------------------------------------------------- bad input
LORA_LIKE = [LoRA, DoRA, CorDA, ChainLoRA]


@pytest.mark.parametrize("cls", LORA_LIKE + [Adapter], ids=lambda c: c.__name__)
@pytest.mark.parametrize("r", [0, -1])
def test_rank_must_be_positive(cls, r):
    with pytest.raises(ValueError, match=r"The 'r' parameter of \w+ must be an int in \[1, inf\)"):
        cls(r=r)


@pytest.mark.parametrize("cls", [LoRA, DoRA, ChainLoRA], ids=lambda c: c.__name__)
@pytest.mark.parametrize("family, limit", [("gpt2", 32), ("llama", 16)])
def test_rank_above_the_matrix_size_is_an_error(cls, family, limit):
    # llama's k/v projections are (16, 32): 2 key/value heads of 8
    with pytest.raises(ValueError, match=rf"min\(out, in\) = {limit}"):
        cls(r=limit + 1).apply(make_tiny(family), copy=True)


@pytest.mark.parametrize("cls", LORA_LIKE, ids=lambda c: c.__name__)
@pytest.mark.parametrize("alpha", [0, -2.0, float("nan")])
def test_alpha_must_be_positive(cls, alpha):
    with pytest.raises(ValueError, match="'alpha'"):
        cls(alpha=alpha)


@pytest.mark.parametrize(
    "method",
    [LoRA(target="q_projection"), DoRA(target="attn.query"), BitFit(target="layers.9.attn.q"), IA3(target=["attn.k", "wv"]), SSF(target="mlp.fc1")],
    ids=["lora", "dora", "bitfit", "ia3", "ssf"],
)
def test_unknown_targets_are_errors_that_list_the_names(method):
    with pytest.raises(ValueError, match=r"matches no weight matrix.*'attn\.q'"):
        method.apply(make_tiny("llama"), copy=True)


def test_unknown_target_in_corda_calibration():
    with pytest.raises(ValueError, match="matches no weight matrix"):
        CorDA(target="c_attention").calibrate(make_tiny("gpt2"), [_ids()])


@pytest.mark.parametrize("cls", [Adapter, PrefixTuning], ids=lambda c: c.__name__)
def test_merge_without_dense_form_says_so(cls):
    method = cls()
    adapted = method.apply(make_tiny("gpt2"), copy=True)
    with pytest.raises(ValueError, match=f"{cls.__name__} has no dense form"):
        method.merge(adapted)


@pytest.mark.parametrize("cls", [DoRA, IA3, SSF], ids=lambda c: c.__name__)
def test_merge_without_apply_is_an_error(cls):
    with pytest.raises(ValueError, match="was apply called"):
        cls().merge(make_tiny("llama"))


@pytest.mark.parametrize(
    "first, second",
    [(LoRA(r=2), IA3()), (SSF(), BitFit()), (DoRA(r=2), Adapter()), (IA3(), PrefixTuning()), (Adapter(), SSF()), (BitFit(), Full())],
    ids=["lora+ia3", "ssf+bitfit", "dora+adapter", "ia3+prefix", "adapter+ssf", "bitfit+full"],
)
def test_conflicting_methods_are_an_error(first, second):
    adapted = first.apply(make_tiny("gpt2"), copy=True)
    with pytest.raises(ValueError, match=f"already carries {type(first).__name__}.*conflict"):
        second.apply(adapted)


def test_prefix_and_adapter_compose_into_the_mam_adapter():
    model = make_tiny("llama")
    adapted = PrefixTuning(n_prefix=2).apply(model, copy=True)
    adapted = Adapter(position="mlp", scaling=4.0).apply(adapted)
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert any(n.startswith("fta_prefix.") for n in names) and any(".adapter." in n for n in names)
    assert len(getattr(adapted, APPLIED_ATTR)) == 2
    copy.deepcopy(adapted)(input_ids=_ids())  # a deep copy keeps the prefix wiring
