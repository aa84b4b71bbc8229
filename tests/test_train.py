"""The training loop: learning, reproducibility, resume, bad input, NaN loss, no mutation of the base."""

from __future__ import annotations

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
    (latest / "model.safetensors").write_bytes(b"not a safetensors file")
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
