"""The training loop: learning, reproducibility, resume, bad input, NaN loss, no mutation of the base."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch

import ftanalysis as fta
from ftanalysis.zoo.architectures import TinyConfig, build_model


@pytest.fixture()
def small(tok):
    return build_model(TinyConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64), tok, seed=0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_finetune_learns_and_records_history(small, tok):
    task = fta.tasks.make("facts", relations="likes")
    before = task.evaluate(small, tok, n=128)
    result = fta.finetune(small, tok, task, fta.methods.Full(), steps=60, lr=3e-3, batch_size=32, eval_every=20, progress=False)
    assert isinstance(result.history, pd.DataFrame)
    assert list(result.history["step"]) == [20, 40, 60]
    assert {"train_loss", "val_accuracy", "val_loss"} <= set(result.history.columns)
    assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]
    after = task.evaluate(result.model, tok, n=128)
    assert after["loss"] < before["loss"] - 0.5
    assert result.trainable_parameters == result.total_parameters


def test_finetune_leaves_the_base_untouched_by_default(small, tok):
    state = _state(small)
    fta.finetune(small, tok, fta.tasks.make("copy"), fta.methods.LoRA(r=2), steps=3, lr=1e-2, batch_size=4, progress=False)
    assert all(torch.equal(state[k], v) for k, v in small.state_dict().items())
    assert not hasattr(small, "_fta_methods")


def test_same_seed_same_numbers_other_seed_differs(small, tok):
    task = fta.tasks.make("counting")
    def run(seed):
        return fta.finetune(small, tok, task, fta.methods.LoRA(r=2, dropout=0.1), steps=5, lr=1e-2, batch_size=8, seed=seed, progress=False)
    a, b, c = run(0), run(0), run(1)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize(
    "method",
    [fta.methods.Full(), fta.methods.LoRA(r=2, dropout=0.1), fta.methods.ChainLoRA(r=2, restart_every=3)],
    ids=["full", "lora", "chain-lora"],  # chain: the merged links (grown buffers) come back from the checkpoint
)
def test_resume_gives_the_same_numbers_as_an_uninterrupted_run(small, tok, tmp_path, method):
    task = fta.tasks.make("copy")
    kwargs = dict(steps=8, lr=5e-3, batch_size=8, seed=3, eval_every=4, progress=False, schedule="cosine", warmup_steps=2)
    full_run = fta.finetune(small, tok, task, method, **kwargs)
    # interrupted: stop after 4 steps (a run of 4 with the same schedule would differ, so save at 4 of 8)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after(small, tok, task, method, ckpt, stop_at=4, **kwargs)
    resumed = fta.finetune(small, tok, task, method, checkpoint_dir=ckpt, checkpoint_every=4, resume=True, **kwargs)
    a, b = full_run.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(full_run.history, resumed.history)
    pd.testing.assert_series_equal(full_run.loss_curve, resumed.loss_curve)  # the steps before the interruption too


def _interrupt_after(model, tok, task, method, ckpt, stop_at, **kwargs):
    """Run with checkpoints and raise KeyboardInterrupt right after checkpoint ``stop_at`` is written."""
    import ftanalysis.train as train

    original = train._save_checkpoint

    def save_then_stop(root, step, *args):
        original(root, step, *args)
        if step == stop_at:
            raise KeyboardInterrupt

    train._save_checkpoint = save_then_stop
    try:
        fta.finetune(model, tok, task, method, checkpoint_dir=ckpt, checkpoint_every=stop_at, **kwargs)
    finally:
        train._save_checkpoint = original


def test_resume_without_checkpoint_is_a_clear_error(small, tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        fta.finetune(small, tok, fta.tasks.make("copy"), steps=2, lr=1e-3, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_corrupt_checkpoint_is_a_clear_error(small, tok, tmp_path):
    fta.finetune(small, tok, fta.tasks.make("copy"), steps=2, lr=1e-3, batch_size=2, checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    latest = sorted(tmp_path.glob("step_*"))[-1]
    (latest / "training_state.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        fta.finetune(small, tok, fta.tasks.make("copy"), steps=4, lr=1e-3, batch_size=2, checkpoint_dir=tmp_path, resume=True, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "'steps'"),
        ({"steps": -3}, "'steps'"),
        ({"lr": 0.0}, "'lr'"),
        ({"lr": -1e-3}, "'lr'"),
        ({"lr": float("nan")}, "'lr'"),
        ({"batch_size": 0}, "'batch_size'"),
        ({"schedule": "step"}, "'schedule'"),
        ({"checkpoint_every": 5}, "checkpoint_dir"),
        ({"gradient_checkpointing": 1}, "'gradient_checkpointing'"),
        ({"bf16": "yes"}, "'bf16'"),
        ({"bf16": True, "device": "mps"}, "bf16=True"),  # checked before any work, so no MPS device is needed
    ],
)
def test_bad_arguments_are_clear_errors(small, tok, kwargs, match):
    args = dict(steps=2, lr=1e-3, batch_size=2, progress=False) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        fta.finetune(small, tok, fta.tasks.make("copy"), **args)


def test_bad_task_and_method_types(small, tok):
    with pytest.raises(TypeError, match="'task'"):
        fta.finetune(small, tok, "copy", steps=1, lr=1e-3)
    with pytest.raises(TypeError, match="'method'"):
        fta.finetune(small, tok, fta.tasks.make("copy"), "lora", steps=1, lr=1e-3)


def test_nan_loss_stops_with_a_clear_error(small, tok):
    with torch.no_grad():
        small.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss became nan at step 0"):
        fta.finetune(small, tok, fta.tasks.make("copy"), steps=3, lr=1e-3, batch_size=4, progress=False)


def test_wrong_tokenizer_for_model_is_an_error(tok):
    too_small = build_model(TinyConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=16), tok)
    too_small.resize_token_embeddings(50)
    with pytest.raises(ValueError, match="does not belong to this model"):
        fta.finetune(too_small, tok, fta.tasks.make("copy"), steps=1, lr=1e-3, progress=False)


def test_extra_eval_tasks_and_summary(small, tok):
    result = fta.finetune(small, tok, fta.tasks.make("copy"), fta.methods.LoRA(r=2), steps=4, lr=1e-3, batch_size=4, eval_n=16,
                          eval_tasks={"mix": fta.tasks.make("pretraining_mix")}, progress=False)
    assert {"mix/accuracy", "mix/loss"} <= set(result.history.columns)
    summary = result.summary()
    assert summary["trainable_parameters"] == result.trainable_parameters < result.total_parameters
    assert math.isfinite(summary["seconds_per_step"])


def test_learning_rate_schedules():
    from ftanalysis.train import learning_rate

    assert learning_rate(0, 10, 1.0, 2, "constant") == pytest.approx(0.5)
    assert learning_rate(5, 10, 1.0, 0, "constant") == 1.0
    assert learning_rate(5, 10, 1.0, 0, "linear") == pytest.approx(0.5)
    assert learning_rate(5, 10, 1.0, 0, "cosine") == pytest.approx(0.5)
    assert learning_rate(0, 10, 1.0, 0, "cosine") == pytest.approx(1.0)


def test_choose_device_prefers_what_is_asked():
    assert fta.choose_device("cpu").type == "cpu"
    assert fta.choose_device().type in ("cuda", "mps", "cpu")


# ---------------------------------------------------------------------- gradient checkpointing and bf16
def _checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("zoo_name", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("method", [fta.methods.Full(), fta.methods.LoRA(r=4, dropout=0.1)], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_curve_and_is_off_afterwards(zoo_name, method):
    model, tok = fta.zoo.load(zoo_name)
    task = fta.tasks.make("modular_arithmetic", op="-")
    kwargs = dict(steps=4, lr=1e-3, batch_size=8, eval_every=1, eval_n=16, seed=0, progress=False)
    calls = []
    attention = next(m for n, m in fta.nn.ModelView(model).block(0).named_children() if "attn" in n)  # inside the checkpointed forward
    handle = attention.register_forward_pre_hook(lambda *_: calls.append(1))  # deep-copied with the model
    try:
        plain = fta.finetune(model, tok, task, method, **kwargs)
        plain_calls, calls[:] = len(calls), []
        checkpointed = fta.finetune(model, tok, task, method, gradient_checkpointing=True, **kwargs)
    finally:
        handle.remove()
    assert len(calls) == plain_calls + kwargs["steps"]  # each training forward of layer 0's attention ran again in the backward
    # LoRA dropout draws the same masks in the recomputation, so the curves agree to the last bit on CPU
    for column in ("train_loss", "val_loss"):
        assert plain.history[column].tolist() == pytest.approx(checkpointed.history[column].tolist(), abs=1e-5)
    assert plain.history["train_loss"].nunique() > 1  # it trained
    assert checkpointed.extras["gradient_checkpointing"] is True and plain.extras["gradient_checkpointing"] is False
    for trained in (checkpointed.model, checkpointed.merged_model(), model):
        assert not _checkpointing_on(trained)
        assert not trained.get_input_embeddings()._forward_hooks  # transformers' input-grad hook is gone too


def test_gradient_checkpointing_on_an_unsupported_model_is_a_clear_error(small, tok):
    small.supports_gradient_checkpointing = False
    with pytest.raises(ValueError, match="does not"):
        fta.finetune(small, tok, fta.tasks.make("copy"), steps=1, batch_size=2, progress=False, gradient_checkpointing=True)


def test_bf16_choice_per_device(monkeypatch):
    from ftanalysis.train import resolve_bf16

    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert (resolve_bf16(cpu, None), resolve_bf16(cuda, None), resolve_bf16(mps, None)) == (False, True, False)
    assert (resolve_bf16(cpu, True), resolve_bf16(cpu, False), resolve_bf16(cuda, False), resolve_bf16(mps, False)) == (True, False, False, False)
    with pytest.raises(ValueError, match="CUDA or CPU only"):
        resolve_bf16(mps, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "an old GPU")
    with pytest.raises(ValueError, match="does not support bfloat16"):
        resolve_bf16(cuda, True)


def test_bf16_on_cpu_runs_under_autocast_and_is_recorded(small, tok):
    task = fta.tasks.make("copy")
    kwargs = dict(steps=2, lr=1e-3, batch_size=8, eval_n=16, device="cpu", progress=False)
    fp32, bf16 = (fta.finetune(small, tok, task, fta.methods.LoRA(r=2), bf16=flag, **kwargs) for flag in (False, True))
    assert (fp32.extras["bf16"], bf16.extras["bf16"]) == (False, True)
    a, b = fp32.history["train_loss"].iloc[-1], bf16.history["train_loss"].iloc[-1]
    assert a != b and b == pytest.approx(a, rel=5e-2)  # bf16 matmuls: close, not equal
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())


@pytest.mark.parametrize("method", [fta.methods.Full(), fta.methods.LoRA(r=2), fta.methods.LISA(n_layers=1, interval=2)],
                         ids=["full", "lora", "lisa"])
def test_fused_optimizer_takes_the_same_steps_up_to_rounding(small, tok, method):
    task = fta.tasks.make("copy")
    kwargs = dict(steps=4, lr=1e-3, batch_size=8, eval_n=16, seed=0, progress=False)
    plain, fused = (fta.finetune(small, tok, task, method, fused_optimizer=flag, **kwargs) for flag in (False, True))
    assert (plain.extras["fused_optimizer"], fused.extras["fused_optimizer"]) == (False, True)
    assert fused.losses == pytest.approx(plain.losses, abs=1e-5)
    for (name, a), b in zip(plain.merged_model().state_dict().items(), fused.merged_model().state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    optimizer = method.make_optimizer(small, lr=1e-3, fused=True)
    assert all(group["fused"] for group in optimizer.param_groups)


def test_fused_optimizer_is_refused_by_a_method_without_one_and_must_be_a_bool(small, tok):
    task = fta.tasks.make("copy")
    with pytest.raises(ValueError, match="no AdamW to fuse"):
        fta.finetune(small, tok, task, fta.methods.MeZO(), steps=1, batch_size=2, progress=False, fused_optimizer=True)
    with pytest.raises(TypeError, match="fused_optimizer"):
        fta.finetune(small, tok, task, steps=1, batch_size=2, progress=False, fused_optimizer="yes")


def test_loss_curve_is_recorded_by_default_and_repr_is_short(small, tok):
    task = fta.tasks.make("copy")
    result = fta.finetune(small, tok, task, fta.methods.LoRA(r=2), steps=6, lr=5e-3, batch_size=4, seed=0, progress=False)
    curve = result.loss_curve
    assert list(curve.index) == [1, 2, 3, 4, 5, 6] and curve.name == "train_loss"
    # without eval_every the history has one row, whose train_loss is the mean of the whole curve
    assert len(result.history) == 1 and abs(result.history["train_loss"].iloc[0] - curve.mean()) < 1e-9
    text = repr(result)
    assert text.startswith("FinetuneResult(LoRA(r=2") and "on 'copy': 6 steps" in text and f"final train loss {curve.iloc[-1]:.4g}" in text
    assert len(text) < 400 and "Linear(" not in text  # a summary, not the model


def test_checkpoints_load_with_load_model_and_result_saves(small, tok, tmp_path):
    task = fta.tasks.make("copy")
    result = fta.finetune(small, tok, task, fta.methods.LoRA(r=2), steps=4, lr=5e-3, batch_size=4, seed=0, progress=False,
                          checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2)
    step4, _ = fta.load_model(tmp_path / "ckpt" / "step_00000004")  # the merged model, config and tokenizer beside it
    merged = result.merged_model()
    ids = torch.randint(5, 100, (2, 6))
    assert torch.allclose(step4(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    saved = result.save_pretrained(tmp_path / "run")
    again, again_tok = fta.load_model(saved)
    assert torch.allclose(again(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    assert again_tok.get_vocab() == tok.get_vocab()
    card = json.loads((saved / "card.json").read_text())
    assert card["steps"] == 4 and card["losses"] == result.losses and card["method"].startswith("LoRA(")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        result.save_pretrained(saved)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_nan_names_the_last_finite_checkpoint_and_writes_no_bad_one(small, tok, tmp_path):
    import ftanalysis.train as train

    method = fta.methods.Full()
    original = method.after_step

    def poison(state):  # the weights turn NaN after step 3 (index 2): the loss of step 4 is NaN
        original(state)
        if state.step == 2:
            with torch.no_grad():
                next(state.model.parameters()).fill_(float("nan"))

    method.after_step = poison
    with pytest.raises(FloatingPointError, match=r"The last checkpoint, .*step_00000002, is finite"):
        fta.finetune(small, tok, fta.tasks.make("copy"), method, steps=6, lr=1e-3, batch_size=2, progress=False,
                     checkpoint_dir=tmp_path, checkpoint_every=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]
    # a checkpoint of non-finite weights is refused, with the same hint
    bad = copy.deepcopy(small)
    with torch.no_grad():
        next(bad.parameters()).fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="no checkpoint was written.*step_00000002, is finite"):
        train._save_checkpoint(tmp_path, 4, bad, None, fta.methods.Full(), [], 0.0, [], tok)
    assert not (tmp_path / "step_00000004").exists()


KILL_SCRIPT = """
import os, sys
import ftanalysis as fta
import ftanalysis.train as train
from conftest import make_tiny
from ftanalysis.tasks import build_tokenizer

kill_at, ckpt = int(sys.argv[1]), sys.argv[2]
original = train.save_file

def save_then_die(state, path, *args, **kwargs):  # the process dies after the first file of checkpoint kill_at
    original(state, path, *args, **kwargs)
    if f"tmp_step_{kill_at:08d}" in path:
        os._exit(3)

train.save_file = save_then_die
fta.finetune(make_tiny("gpt2"), build_tokenizer(), fta.tasks.make("copy"), fta.methods.LoRA(r=2), steps=6, lr=5e-3,
             batch_size=4, seed=1, progress=False, checkpoint_dir=ckpt, checkpoint_every=2)
"""


def test_killed_mid_checkpoint_then_resumed_equals_an_uninterrupted_run(tok, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import make_tiny

    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    ckpt = tmp_path / "ckpt"
    run = subprocess.run([sys.executable, str(script), "4", str(ckpt)], env=env, capture_output=True, text=True)
    assert run.returncode == 3, run.stderr[-2000:]
    assert sorted(p.name for p in ckpt.iterdir()) == [".tmp_step_00000004", "step_00000002"]  # nothing half-written under step_*
    kwargs = dict(steps=6, lr=5e-3, batch_size=4, seed=1, progress=False)
    task, tokenizer = fta.tasks.make("copy"), fta.tasks.build_tokenizer()
    resumed = fta.finetune(make_tiny("gpt2"), tokenizer, task, fta.methods.LoRA(r=2), checkpoint_dir=ckpt, checkpoint_every=2, resume=True, **kwargs)
    straight = fta.finetune(make_tiny("gpt2"), tokenizer, task, fta.methods.LoRA(r=2), **kwargs)
    a, b = straight.merged_model().state_dict(), resumed.merged_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses == resumed.losses
    assert not (ckpt / ".tmp_step_00000004").exists()  # the resume cleaned up
