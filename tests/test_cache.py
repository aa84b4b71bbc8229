"""fta.cached_finetune: trains once per key, reloads the same weights, never reuses a fine-tune of other weights."""

import torch
from conftest import make_tiny

import ftanalysis as fta
from ftanalysis.cache import weights_fingerprint


def _args(tok):
    task = fta.tasks.make("copy")
    return dict(tok=tok, task=task, method=fta.methods.Full(), steps=2, lr=1e-3, batch_size=4, seed=0)


def test_second_call_loads_the_cached_fine_tune(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("FTA_CACHE_DIR", str(tmp_path))
    model = make_tiny("gpt2")
    first, history = fta.cached_finetune("tiny", model, **_args(tok))
    second, again = fta.cached_finetune("tiny", model, **_args(tok))
    assert len(list(tmp_path.iterdir())) == 1
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert history.shape == again.shape
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_other_weights_under_the_same_label_are_not_served_from_the_cache(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("FTA_CACHE_DIR", str(tmp_path))
    model = make_tiny("gpt2")
    other = make_tiny("gpt2")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert weights_fingerprint(model) != weights_fingerprint(other)
    fta.cached_finetune("tiny", model, **_args(tok))
    fta.cached_finetune("tiny", other, **_args(tok))
    assert len(list(tmp_path.iterdir())) == 2
