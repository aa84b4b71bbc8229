"""Task vectors and merging rules against their formulas, on small hand-made state dicts and tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny
from peft.utils import merge_utils

import ftanalysis as fta
from ftanalysis.merging import (
    DARE,
    TIES,
    Breadcrumbs,
    GeneralizedMerge,
    GreedySoup,
    LiNeS,
    ModelStock,
    TaskArithmetic,
    TaskVector,
    UniformSoup,
    WiSEFT,
)


def _sd(**tensors):
    return {k.replace("__", "."): torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def _perturbed(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


# ---------------------------------------------------------------------- task vectors
def test_task_vector_arithmetic_and_apply():
    base = _sd(a=[1.0, 2.0], b=[[0.0, 0.0]])
    ft1 = _sd(a=[2.0, 2.0], b=[[1.0, -1.0]])
    ft2 = _sd(a=[1.0, 5.0], b=[[0.0, 3.0]])
    t1, t2 = TaskVector.from_state_dicts(base, ft1), TaskVector.from_state_dicts(base, ft2)
    assert torch.equal(t1["a"], torch.tensor([1.0, 0.0]))
    total = sum([t1, t2])
    assert torch.equal(total["b"], torch.tensor([[1.0, 2.0]]))
    assert torch.equal((t1 - t2)["a"], torch.tensor([1.0, -3.0]))
    assert torch.equal((-t1)["a"], torch.tensor([-1.0, 0.0]))
    merged = (0.5 * total).apply_to(base)
    assert torch.equal(merged["a"], torch.tensor([1.5, 3.5]))
    assert torch.equal(base["a"], torch.tensor([1.0, 2.0]))  # the base is not modified
    assert t1.apply_to(base, scale=1.0)["b"].tolist() == ft1["b"].tolist()


def test_task_vector_from_models_layers_ties_and_roundtrip():
    base = make_tiny("gpt2")
    ft = _perturbed(base)
    tau = TaskVector.from_models(base, ft)
    assert "transformer.wte.weight" in tau and "lm_head.weight" not in tau  # tied: stored once
    assert tau.aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert tau.n_layers == 2
    assert tau.layer_of("transformer.h.1.mlp.c_fc.weight") == 1
    assert tau.layer_of("transformer.wte.weight") is None and tau.layer_of("transformer.ln_f.weight") is None
    rebuilt = tau.apply_to(base)
    ids = torch.randint(0, 300, (2, 7))
    assert torch.allclose(rebuilt(ids).logits, ft(ids).logits, atol=1e-5)
    assert torch.equal(rebuilt.lm_head.weight, rebuilt.transformer.wte.weight)
    # state-dict route: tied alias written too
    sd = tau.apply_to(base.state_dict())
    assert torch.allclose(sd["lm_head.weight"], ft.state_dict()["lm_head.weight"], atol=1e-6)
    assert torch.equal(tau.unflatten(tau.flatten())["transformer.h.0.attn.c_attn.weight"], tau["transformer.h.0.attn.c_attn.weight"])


def test_mismatched_keys_and_shapes_are_clear_errors():
    base = _sd(a=[1.0, 2.0], b=[0.0])
    with pytest.raises(ValueError, match="only in the first"):
        TaskVector.from_state_dicts(base, _sd(a=[1.0, 2.0]))
    with pytest.raises(ValueError, match=r"'a' has shape \(2,\) in the first and \(3,\)"):
        TaskVector.from_state_dicts(base, _sd(a=[1.0, 2.0, 3.0], b=[0.0]))
    t = TaskVector.from_state_dicts(base, base)
    other = TaskVector.from_state_dicts(_sd(a=[1.0, 2.0]), _sd(a=[1.0, 2.0]))
    with pytest.raises(ValueError, match="task vectors"):
        t + other
    with pytest.raises(ValueError, match="different parameters"):
        TaskArithmetic().merge(make_tiny("gpt2"), [make_tiny("llama")])
    gpt_small = make_tiny("gpt2", vocab_size=200)
    with pytest.raises(ValueError, match="shape"):
        TaskArithmetic().merge(make_tiny("gpt2"), [gpt_small])
    with pytest.raises(TypeError, match="list of fine-tuned models"):
        TaskArithmetic().merge(base, base)
    with pytest.raises(TypeError, match="real number"):
        t * "2"


def test_lora_results_are_merged_first(tok):
    model = make_tiny("gpt2")
    task = fta.tasks.make("copy")
    result = fta.finetune(model, tok, task, fta.methods.LoRA(r=2, target="attn.q"), steps=2, lr=1e-2, batch_size=4, progress=False, eval_n=4)
    tau = TaskVector.from_models(model, result)
    nonzero = [k for k, v in tau.items() if v.abs().max() > 0]
    assert nonzero and all("c_attn" in k for k in nonzero)  # only the adapted matrices moved
    expected = TaskVector.from_models(model, result.merged_model())
    assert all(torch.equal(tau[k], expected[k]) for k in tau)
    # a model still carrying the adapter is merged too
    tau2 = TaskVector.from_models(model, result.model)
    assert all(torch.allclose(tau2[k], expected[k]) for k in tau)


# ---------------------------------------------------------------------- TIES
def test_ties_trim_elect_disjoint_mean_by_hand():
    base = _sd(w=[0.0] * 6)
    # entries:       0     1     2     3     4     5
    t1 = _sd(w=[3.0, -1.0, 2.0, 0.1, -4.0, 1.0])
    t2 = _sd(w=[-1.0, -2.0, 2.0, 0.2, 5.0, 0.0])
    t3 = _sd(w=[-1.0, 3.0, -6.0, 0.3, 2.0, -0.5])
    # k = 0.5 of 6 entries -> keep 3 per task (global): t1 {0, 2, 4}, t2 {1, 2, 4}, t3 {1, 2, 4}
    # trimmed: t1 [3,0,2,0,-4,0], t2 [0,-2,2,0,5,0], t3 [0,3,-6,0,2,0]
    # mass:     [3, 1, -2, 0, 3, 0] -> sign [+,+,-,maj,+,maj]; majority over the vector: +
    # disjoint: e0 mean(3)=3; e1 mean(3)=3 (t2's -2 disagrees); e2 mean(-6)=-6; e3 0; e4 mean(5,2)=3.5; e5 0
    merged = TIES(k=0.5, lam=1.0).merge(base, [t1, t2, t3])
    assert merged["w"].tolist() == [3.0, 3.0, -6.0, 0.0, 3.5, 0.0]
    # weights enter after the sign election: doubling t2 does not flip entry 1's sign (mass would be -1 if before)
    weighted = TIES(k=0.5, lam=0.5).merge(base, [t1, t2, t3], weights=[1.0, 2.0, 1.0])
    assert weighted["w"].tolist() == [1.5, 1.5, -3.0, 0.0, 0.5 * (10.0 + 2.0) / 2, 0.0]
    freq = TIES(k=1.0, sign_method="frequency").merge(base, [t1, t2, t3])
    # frequency signs: e0 (+,-,-) -> -, mean(-1,-1) = -1
    assert freq["w"][0].item() == -1.0


def test_ties_matches_peft_per_tensor():
    g = torch.Generator().manual_seed(0)
    base = {"x": torch.zeros(8, 5), "y": torch.zeros(7)}
    fts = [{k: torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    weights = [0.7, 1.3, 1.0]
    ours = TIES(k=0.4, lam=1.0, trim_scope="tensor").merge(base, fts, weights=weights)
    for key in base:
        peft = merge_utils.ties([f[key] for f in fts], torch.tensor(weights), density=0.4)
        assert torch.allclose(ours[key], peft, atol=1e-6), key


def test_ties_global_trim_keeps_top_k_of_the_whole_vector():
    tau = TaskVector({"a": torch.tensor([10.0, 1.0, 2.0]), "b": torch.tensor([9.0, 0.5, -8.0, 3.0])})
    trimmed = fta.merging.trim(tau, 3 / 7, scope="global")
    assert trimmed["a"].tolist() == [10.0, 0.0, 0.0] and trimmed["b"].tolist() == [9.0, 0.0, -8.0, 0.0]
    per_tensor = fta.merging.trim(tau, 0.5, scope="tensor")
    assert per_tensor["a"].tolist() == [10.0, 0.0, 0.0] and per_tensor["b"].tolist() == [9.0, 0.0, -8.0, 0.0]


# ---------------------------------------------------------------------- DARE
def test_dare_is_unbiased_and_drops_p():
    g = torch.Generator().manual_seed(0)
    tau = TaskVector({"w": torch.randn(40, 25, generator=g)})
    p = 0.8
    one = fta.merging.drop_and_rescale(tau, p, seed=0)
    kept = (one["w"] != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.03
    assert torch.allclose(one["w"][one["w"] != 0], tau["w"][one["w"] != 0] / (1 - p))
    mean = sum(fta.merging.drop_and_rescale(tau, p, seed=s) for s in range(2000)) / 2000
    assert (mean["w"] - tau["w"]).abs().mean() < 0.06 * tau["w"].abs().mean()
    assert torch.equal(fta.merging.drop_and_rescale(tau, p, seed=3)["w"], fta.merging.drop_and_rescale(tau, p, seed=3)["w"])
    no_rescale = fta.merging.drop_and_rescale(tau, p, seed=0, rescale=False)
    assert torch.allclose(no_rescale["w"] / (1 - p), one["w"])


def test_dare_rule_combines_like_task_arithmetic():
    base = {"w": torch.zeros(30)}
    fts = [{"w": torch.arange(30.0)}, {"w": -torch.ones(30)}]
    merged = DARE(p=0.5, lam=0.5, seed=7).merge(base, fts)
    taus = fta.merging.task_vectors(base, fts)
    expected = 0.5 * (fta.merging.drop_and_rescale(taus[0], 0.5, 7) + fta.merging.drop_and_rescale(taus[1], 0.5, 8))
    assert torch.equal(merged["w"], expected["w"])
    with pytest.raises(ValueError, match="'p' parameter of DARE"):
        DARE(p=1.0)


# ---------------------------------------------------------------------- Breadcrumbs
def test_breadcrumbs_mask_drops_top_and_bottom_per_layer_and_row():
    t = torch.tensor([[5.0, -0.1, 2.0, -3.0, 0.2], [1.0, 9.0, -0.3, 0.4, -7.0]])
    # layer: 10 entries, beta 0.1 -> drop 1 largest (9.0), gamma 0.3 -> drop 3 smallest (-0.1, 0.2, -0.3)
    mask = fta.merging.breadcrumbs_mask(t, beta=0.1, gamma=0.3, granularity="layer")
    assert mask.tolist() == [[True, False, True, True, False], [True, False, False, True, True]]
    # row: 5 per row, beta 0.2 -> drop 1 largest, gamma 0.4 -> drop 2 smallest
    mask = fta.merging.breadcrumbs_mask(t, beta=0.2, gamma=0.4, granularity="row")
    assert mask.tolist() == [[False, False, True, True, False], [True, False, False, False, True]]
    base = {"w": torch.zeros(2, 5)}
    merged = Breadcrumbs(beta=0.1, gamma=0.3, lam=0.5).merge(base, [{"w": t}, {"w": t}])
    assert torch.equal(merged["w"], t * fta.merging.breadcrumbs_mask(t, 0.1, 0.3))
    with pytest.raises(ValueError, match="beta \\+ gamma"):
        Breadcrumbs(beta=0.5, gamma=0.5)


# ---------------------------------------------------------------------- LiNeS
def test_lines_scales_each_block_by_its_factor():
    assert LiNeS(alpha=0.2).factors(6) == [0.2, 0.36, 0.52, 0.68, 0.84, 1.0]
    assert LiNeS(alpha=0.0, beta=0.5).factors(3) == [0.0, 0.25, 0.5]
    assert LiNeS(alpha=0.3).factors(1) == [1.0]
    base = make_tiny("llama")
    ft = _perturbed(base)
    merged = LiNeS(alpha=0.25).merge(base, [ft])
    tau = TaskVector.from_models(base, ft)
    got = TaskVector.from_models(base, merged)
    for key in tau:
        layer = tau.layer_of(key)
        factor = 0.25 if layer is None else [0.25, 1.0][layer]
        assert torch.allclose(got[key], factor * tau[key], atol=1e-6), key


def test_lines_keeps_a_new_classifier_head():
    body = make_tiny("bert")
    clf = fta.zoo.EncoderClassifier(body, 3, seed=0)
    ft = _perturbed(clf)
    merged = LiNeS(alpha=0.0).merge(clf, [ft])
    assert torch.equal(merged.head.weight, ft.head.weight)  # new parameters keep the fine-tuned value
    assert torch.equal(merged.body.embeddings.word_embeddings.weight, clf.body.embeddings.word_embeddings.weight)
    scaled_head = LiNeS(alpha=0.0, keep_new_parameters=False).merge(clf, [ft])
    assert torch.equal(scaled_head.head.weight, clf.head.weight)


# ---------------------------------------------------------------------- WiSE-FT, soups, Model Stock
def test_wise_ft_endpoints_are_the_two_models():
    base = make_tiny("gpt2")
    ft = _perturbed(base)
    ids = torch.randint(0, 300, (2, 6))
    for alpha, target in ((0.0, base), (1.0, ft)):
        mixed = WiSEFT(alpha=alpha).merge(base, [ft])
        for (name, p), q in zip(mixed.named_parameters(), target.parameters()):
            assert torch.allclose(p, q, atol=1e-6), name
        assert torch.allclose(mixed(ids).logits, target(ids).logits, atol=1e-5)
    half = WiSEFT(alpha=0.5).merge(base, [ft])
    assert torch.allclose(half.transformer.h[0].mlp.c_fc.weight, 0.5 * (base.transformer.h[0].mlp.c_fc.weight + ft.transformer.h[0].mlp.c_fc.weight), atol=1e-6)
    with pytest.raises(ValueError, match="needs 1"):
        WiSEFT().merge(base, [ft, ft])


def test_uniform_and_greedy_soups():
    models = [_sd(w=[1.0, 0.0]), _sd(w=[3.0, 2.0]), _sd(w=[8.0, 4.0])]
    assert UniformSoup().merge(None, models)["w"].tolist() == [4.0, 2.0]

    def metric(m):
        return -float((m["w"] - torch.tensor([2.0, 1.0])).abs().sum())

    result = GreedySoup(metric=metric).search(models)
    assert result.ingredients == [0, 1] and result.model["w"].tolist() == [2.0, 1.0]
    assert result.score >= max(result.individual)
    assert list(result.history["added"]) == [True, True, False]
    only_best = GreedySoup(metric=lambda m: -float(m["w"][0])).search(models)
    assert only_best.ingredients == [0] and only_best.model is not models[0]


def test_model_stock_ratio_by_hand():
    base = _sd(w=[0.0, 0.0])
    a, b = _sd(w=[1.0, 0.0]), _sd(w=[1.0, 1.0])
    cos = 1 / 2**0.5
    t = 2 * cos / (1 + cos)
    merged = ModelStock().merge(base, [a, b])
    assert torch.allclose(merged["w"], t * torch.tensor([1.0, 0.5]))
    orthogonal = ModelStock().merge(base, [_sd(w=[1.0, 0.0]), _sd(w=[0.0, 1.0])])
    assert merged["w"].abs().sum() > 0 and orthogonal["w"].abs().sum() == 0  # cos 0 -> t 0: the base
    with pytest.raises(ValueError):
        ModelStock().merge(base, [a])


# ---------------------------------------------------------------------- generalised rule and registry
def test_presets_reproduce_the_named_rules():
    g = torch.Generator().manual_seed(1)
    base = {"x": torch.zeros(6, 4), "y": torch.zeros(5)}
    fts = [{k: torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    pairs = [
        (GeneralizedMerge.preset("ties", density=0.3, lam=0.7), TIES(k=0.3, lam=0.7)),
        (GeneralizedMerge.preset("dare_linear", density=0.4, seed=2), DARE(p=0.6, seed=2)),
        (GeneralizedMerge.preset("dare_ties", density=0.4, seed=2), DARE(p=0.6, seed=2, combine="ties")),
        (GeneralizedMerge.preset("breadcrumbs", beta=0.1, gamma=0.5), Breadcrumbs(beta=0.1, gamma=0.5)),
        (GeneralizedMerge.preset("task_arithmetic", lam=0.3), TaskArithmetic(lam=0.3)),
    ]
    for general, named in pairs:
        a, b = general.merge(base, fts), named.merge(base, fts)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in base), (general, named)


def test_registry_and_merge_shortcut():
    names = fta.merging.available()
    for name in ("task_arithmetic", "uniform_soup", "greedy_soup", "wise_ft", "ties", "dare", "breadcrumbs", "lines", "model_stock"):
        assert names[name].startswith("https://")
    base = _sd(w=[0.0, 0.0])
    assert fta.merging.merge("task_arithmetic", base, [_sd(w=[2.0, 4.0])], lam=0.5)["w"].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="Unknown merging rule"):
        fta.merging.get("nope")
    assert "TIES(k=0.2" in repr(TIES())
    # the table the lazy package lists without importing agrees with the classes' own names
    assert fta.merging.rule_names() == sorted(names)
    for name, class_name in fta.merging.BUILTIN_RULES.items():
        assert getattr(fta.merging, class_name).name == name


def test_merge_returns_new_model_and_leaves_inputs_untouched():
    base = make_tiny("gpt2")
    fts = [_perturbed(base, seed=s) for s in (1, 2)]
    before = [p.clone() for p in fts[0].parameters()]
    merged = TaskArithmetic(lam=0.5).merge(base, fts)
    assert type(merged) is type(base) and merged is not base
    assert all(torch.equal(p, q) for p, q in zip(fts[0].parameters(), before))
    expected = 0.5 * (fts[0].transformer.h[1].attn.c_proj.weight + fts[1].transformer.h[1].attn.c_proj.weight)
    assert torch.allclose(merged.transformer.h[1].attn.c_proj.weight, expected, atol=1e-6)
    assert fta.merging.sign_conflicts(fta.merging.task_vectors(base, fts)) > 0.3
