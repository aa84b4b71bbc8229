"""Methods under transformers.Trainer: prepared by the package, trained by Trainer, merged as usual."""

from __future__ import annotations

import pytest
import torch

import ftanalysis as fta
from ftanalysis.hf_trainer import TaskLoss, prepare_for_trainer
from ftanalysis.methods.lora import LoRALayer
from ftanalysis.tasks.base import answer_loss

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it


def _args(tmp_path, steps=10, batch_size=16, lr=3e-3, **overrides):
    return transformers.TrainingArguments(
        str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr, seed=0,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, **overrides,
    )


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


CASES = [
    ("gpt2-lora", "gpt2-tiny", fta.methods.LoRA, {"r": 4}, 3e-3),
    ("gpt2-full", "gpt2-tiny", fta.methods.Full, {}, 1e-3),
    ("llama-lora", "llama-tiny", fta.methods.LoRA, {"r": 4}, 3e-3),
    ("llama-full", "llama-tiny", fta.methods.Full, {}, 1e-3),
]


@pytest.mark.parametrize("zoo_name, cls, kwargs, lr", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_trainer_trains_a_prepared_model_that_merges_to_a_plain_model(tmp_path, zoo_name, cls, kwargs, lr):
    model, tok = fta.zoo.load(zoo_name)
    task = fta.tasks.make("modular_arithmetic", op="-")  # the zoo bases cannot subtract: a loss to bring down
    before = task.evaluate(model, tok, n=64)["loss"]
    setup = prepare_for_trainer(model, tok, task, cls(**kwargs), seed=0, n_examples=512)
    assert not hasattr(model, "_fta_methods")  # prepared a copy
    transformers.Trainer(args=_args(tmp_path, lr=lr), **setup.trainer_kwargs()).train()
    merged = setup.merged_model()
    assert type(merged) is type(model)
    assert not any(isinstance(m, LoRALayer) for m in merged.modules()) and not getattr(merged, "_fta_methods", [])
    assert merged.state_dict().keys() == model.state_dict().keys()
    setup.model.eval()
    batch = task.batch(tok, 16, split="val")
    # float32 rounding of x W^T + s (x A^T) B^T against x (W + s B A)^T on logits of size ~10
    torch.testing.assert_close(_logits(merged, batch), _logits(setup.model, batch), atol=1e-5, rtol=1e-5)
    after = task.evaluate(merged, tok, n=64)["loss"]
    assert after < before - 1.0


def test_task_loss_averages_over_the_answer_tokens_of_the_whole_step():
    """Trainer counts answer tokens over every micro-batch; the parts must add up to the loss of the union."""
    model, tok = fta.zoo.load("gpt2-tiny")
    task = fta.tasks.make("modular_arithmetic", op="-")
    a, b = task.batch(tok, 3, step=0), task.batch(tok, 5, step=1)
    outputs = [model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]) for x in (a, b)]
    counts = [int(x["labels"][:, 1:].ne(-100).sum()) for x in (a, b)]
    loss = TaskLoss(task)
    total = sum(loss(o, x["labels"], num_items_in_batch=torch.tensor(sum(counts))) for o, x in zip(outputs, (a, b)))
    union = sum(answer_loss(o.logits, x["labels"], reduction="sum") for o, x in zip(outputs, (a, b))) / sum(counts)
    torch.testing.assert_close(total, union)
    torch.testing.assert_close(loss(outputs[0], a["labels"]), task.loss(outputs[0].logits, a))  # no count: the mean


def test_gradient_accumulation_gives_the_step_of_one_large_batch(tmp_path):
    """Two micro-batches of 4 and one batch of 8 make the same SGD step (SGD, unclipped: scale-sensitive)."""
    model, tok = fta.zoo.load("llama-tiny")
    task = fta.tasks.make("modular_arithmetic", op="-")
    states = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        setup = prepare_for_trainer(model, tok, task, fta.methods.LoRA(r=4, init="kaiming"), seed=0, n_examples=64)
        args = _args(tmp_path, steps=1, batch_size=batch_size, lr=0.1, gradient_accumulation_steps=accumulation,
                     optim="sgd", max_grad_norm=0.0)
        transformers.Trainer(args=args, **setup.trainer_kwargs()).train()
        states.append({n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad})
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in states[0].items() if "lora_B" in n)  # it stepped
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], atol=1e-6, rtol=1e-5)


def test_trainer_checkpointing_trains_lora_the_same_and_the_merged_model_has_it_off(tmp_path):
    model, tok = fta.zoo.load("llama-tiny")
    task = fta.tasks.make("modular_arithmetic", op="-")
    fields = transformers.TrainingArguments.__dataclass_fields__
    checkpointing = {"activation_checkpointing": True} if "activation_checkpointing" in fields else {
        "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}  # transformers 4
    states = []
    for extra in ({}, checkpointing):
        setup = prepare_for_trainer(model, tok, task, fta.methods.LoRA(r=4, dropout=0.1), n_examples=64)
        transformers.Trainer(args=_args(tmp_path, steps=3, batch_size=8, **extra), **setup.trainer_kwargs()).train()
        states.append({n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad})
    assert any(getattr(m, "gradient_checkpointing", False) for m in setup.model.modules())  # Trainer turned it on
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], atol=1e-6, rtol=1e-6)
    merged = setup.merged_model()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in merged.modules())
    assert not merged.get_input_embeddings()._forward_hooks


def test_step_hooks_run_at_trainer_steps(tmp_path):
    """ChainLoRA restarts at steps 3, 6 and 9 of 10 under Trainer, as under fta.finetune (4 links)."""
    model, tok = fta.zoo.load("gpt2-tiny")
    task = fta.tasks.make("modular_arithmetic", op="-")
    method = fta.methods.ChainLoRA(r=4, restart_every=3)
    setup = prepare_for_trainer(model, tok, task, method, n_examples=256)
    assert len(setup.callbacks) == 1
    transformers.Trainer(args=_args(tmp_path), **setup.trainer_kwargs()).train()
    assert method.links_ == 4
    reference = fta.finetune(model, tok, task, fta.methods.ChainLoRA(r=4, restart_every=3), steps=10, lr=3e-3, batch_size=16, progress=False)
    assert reference.method.links_ == 4
    assert prepare_for_trainer(model, tok, task, fta.methods.LoRA(r=4), n_examples=8).callbacks == []  # no hooks, no callback


@pytest.mark.parametrize("method", [fta.methods.MeZO(), fta.methods.LTSFT(), fta.methods.LISA(), fta.methods.GradientMaskTuning()],
                         ids=lambda m: m.name)
def test_methods_with_their_own_step_or_optimiser_are_refused(method):
    model, tok = fta.zoo.load("gpt2-tiny")
    with pytest.raises(ValueError, match=rf"{type(method).__name__} \('{method.name}'\).*fta.finetune"):
        prepare_for_trainer(model, tok, fta.tasks.make("copy"), method)


def test_bad_arguments_are_clear_errors():
    model, tok = fta.zoo.load("gpt2-tiny")
    with pytest.raises(TypeError, match="'method'"):
        prepare_for_trainer(model, tok, fta.tasks.make("copy"), "lora")
    with pytest.raises(TypeError, match="'task'"):
        prepare_for_trainer(model, tok, "copy", fta.methods.LoRA())
    with pytest.raises(ValueError, match="'n_examples'"):
        prepare_for_trainer(model, tok, fta.tasks.make("copy"), fta.methods.LoRA(), n_examples=0)
