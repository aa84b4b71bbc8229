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


def test_changed_training_code_is_not_served_from_the_cache(tok, tmp_path, monkeypatch):
    import ftanalysis.cache as cache

    monkeypatch.setenv("FTA_CACHE_DIR", str(tmp_path))
    model = make_tiny("gpt2")
    fta.cached_finetune("tiny", model, **_args(tok))
    monkeypatch.setattr(cache, "training_code_digest", lambda: "0" * 16)  # as if train.py had been edited
    fta.cached_finetune("tiny", model, **_args(tok))
    assert len(list(tmp_path.iterdir())) == 2
    keys = [(folder / "key.json").read_text() for folder in tmp_path.iterdir()]
    assert any('"code": "0000000000000000"' in key for key in keys) and all(fta.__version__ in key for key in keys)


def test_training_code_digest_covers_the_training_loop_and_methods(tmp_path, monkeypatch):
    import shutil

    import ftanalysis.cache as cache

    package = tmp_path / "ftanalysis"
    shutil.copytree(cache.Path(cache.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cache, "__file__", str(package / "cache.py"))
    digest = cache.training_code_digest.__wrapped__
    before = digest()
    (package / "probes" / "spectral.py").write_text("# a probe changed: fine-tunes are unaffected\n")
    assert digest() == before
    for changed in ("train.py", "methods/lora.py", "tasks/base.py"):
        (package / changed).write_text((package / changed).read_text() + "\n# edited\n")
        assert digest() != before, changed
        before = digest()


def test_each_call_says_whether_it_trained_or_loaded(tok, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FTA_CACHE_DIR", str(tmp_path))
    fta.notebook.show_cache_log(False)  # records reach pytest's handler on the root logger
    model = make_tiny("gpt2")
    with caplog.at_level("INFO", logger="ftanalysis.cache"):
        fta.cached_finetune("tiny", model, **_args(tok))
        fta.cached_finetune("tiny", model, **_args(tok))
    lines = [r.getMessage() for r in caplog.records if r.name == "ftanalysis.cache"]
    assert len(lines) == 2 and "trained in" in lines[0] and "loaded from the cache" in lines[1], lines
    assert lines[0].startswith("fine-tune tiny | copy | Full | seed=0")


def test_notebook_setup_prints_the_cache_lines(tok, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FTA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FTA_SCALE", "ci")
    try:
        fta.notebook.setup(seed=0)
        fta.cached_finetune("tiny", make_tiny("gpt2"), **_args(tok))
        out = capsys.readouterr().out
        assert "FTA_SCALE=ci" in out and "fine-tune tiny | copy | Full | seed=0: trained in" in out, out
    finally:
        fta.notebook.show_cache_log(False)


def test_notebook_header_names_the_cpu(monkeypatch, capsys):
    monkeypatch.setenv("FTA_SCALE", "ci")
    monkeypatch.setattr(fta.notebook, "cpu_name", lambda: "Test CPU 9000")
    monkeypatch.setattr(fta.notebook, "show_cache_log", lambda show=True: None)
    fta.notebook.setup(seed=0)
    if not torch.cuda.is_available():
        assert "device=cpu (Test CPU 9000, " in capsys.readouterr().out
