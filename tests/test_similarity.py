"""Linear CKA against its definition and invariances; per-layer representations against HF hidden states."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.probes import cka_per_layer, layer_representations, linear_cka


def _hsic_cka(x, y):
    """CKA through the centring matrix H (Kornblith et al. 2019, eq. 4 with linear kernels)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    gram_x, gram_y = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return float(hsic(gram_x, gram_y) / torch.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y)))


def test_cka_definition_and_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    y = torch.randn(60, 5, generator=g) + 0.5 * x[:, :5]
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), abs=1e-10)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert 0.0 < linear_cka(x, y) < 1.0
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 3.7 * x @ q + 2.0) == pytest.approx(1.0, abs=1e-10)  # orthogonal, isotropic scale, offset
    stretched = x @ torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 0.1]))
    assert linear_cka(x, stretched) < 0.9  # not invariant to anisotropic scaling
    assert linear_cka(x, torch.randn(60, 8, generator=g)) < 0.4
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, y[:10])


def test_layer_representations_match_hidden_states(tok):
    model = make_tiny("gpt2")
    prompts = [e.prompt for e in fta.tasks.make("copy").examples(6)]
    reps = layer_representations(model, tok, prompts, pooling="last")
    assert reps.shape == (3, 6, 32)
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in fta.nn.ModelView(model).blocks)  # ours are removed
    batch = fta.probes.similarity.encode(tok, prompts)
    hidden = model(**batch, output_hidden_states=True).hidden_states
    last = batch["attention_mask"].sum(1) - 1
    for layer in range(2):  # HF's last hidden state has ln_f applied; ours is the residual stream before it
        assert torch.allclose(reps[layer], hidden[layer][torch.arange(6), last], atol=1e-5)


def test_cka_per_layer_identical_and_changed_models(tok):
    model = make_tiny("llama")
    task = fta.tasks.make("copy")
    same = cka_per_layer(model, copy.deepcopy(model), tok, task, n=40, pooling="mean")  # "last" at layer 0 is the constant "=" embedding
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in same.cka)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
    result = cka_per_layer(model, changed, tok, task, n=40, pooling="mean")
    assert result.cka[0] == pytest.approx(1.0, abs=1e-6) and result.cka[1] == pytest.approx(1.0, abs=1e-6)
    assert result.cka[2] < 0.999
    assert list(result.to_frame()["layer"]) == [0, 1, 2]
    result.plot()
