"""Train a model prepared by any fine-tuning method with Hugging Face's ``Trainer`` (and so ``accelerate launch``).

:func:`ftanalysis.finetune` is one compact loop for one device. Past that, a method's prepared model is an
ordinary ``nn.Module`` whose trainable parameters are the ones that ``requires_grad``, so ``transformers.Trainer``
can train it on several GPUs, and ``method.merge(model)`` folds the update in afterwards as usual::

    setup = prepare_for_trainer(model, tok, task, fta.methods.LoRA(r=8), seed=0)
    trainer = transformers.Trainer(args=transformers.TrainingArguments(...), **setup.trainer_kwargs())
    trainer.train()
    ft = setup.merged_model()

What :func:`prepare_for_trainer` hands over, and what it does not:

- the model after ``method.prepare`` and ``method.apply`` (seeded as in ``finetune``);
- a ``torch`` dataset of the task's training examples and a collator that batches them exactly as ``finetune``
  does (``labels`` = answer tokens, -100 elsewhere);
- a ``compute_loss_func`` that is the task's own loss (``task.loss``), rescaled to Trainer's token counts so that
  gradient accumulation and several devices average over answer tokens exactly as one large batch would;
- a callback that runs the method's ``before_step`` / ``after_backward`` / ``after_step`` hooks around each
  optimiser step (ChainLoRA restarts, BitFit's gradient masks). Hooks see Trainer's optimiser steps.

Methods that replace back-propagation or the optimiser (``training_step`` or ``make_optimizer``: MeZO, the
sparse and layer-selection methods, GMT) cannot run under Trainer's loop and raise ``ValueError``; train them
with :func:`ftanalysis.finetune`. Resuming a Trainer checkpoint does not restore a method's run-time state
(``method.state_dict()``, e.g. ChainLoRA's link count).
"""

from __future__ import annotations

import copy as copy_module
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import TrainerCallback

from ._validation import check_int
from .methods.base import Method
from .tasks.base import Task, check_model_tokenizer, collate
from .train import TrainState, disable_checkpointing

# hooks whose replacement means the method needs fta.finetune's own loop
_LOOP_HOOKS = ("training_step", "make_optimizer")
# hooks a callback can run around Trainer's optimiser step
_STEP_HOOKS = ("before_step", "after_backward", "after_step")


def _overridden(method: Method, hook: str) -> bool:
    return getattr(type(method), hook) is not getattr(Method, hook)


def check_trainer_compatible(method: Method) -> None:
    """Raise ``ValueError`` if ``method`` needs :func:`ftanalysis.finetune`'s loop (its own step or optimiser)."""
    if not isinstance(method, Method):
        raise TypeError(f"The 'method' parameter of prepare_for_trainer must be an fta.methods.Method. Got {type(method).__name__}.")
    custom = [hook for hook in _LOOP_HOOKS if _overridden(method, hook)]
    if custom:
        raise ValueError(
            f"{type(method).__name__} ({method.name!r}) brings its own {' and '.join(custom)} (zeroth-order steps, "
            "gradient masks or an optimiser over frozen parameters), which transformers.Trainer's loop would bypass. "
            "Train it with fta.finetune."
        )


class TaskDataset(torch.utils.data.Dataset):
    """The first ``n`` examples of a task's split (``task.examples(n, split)``), as a map-style dataset."""

    def __init__(self, task: Task, n: int, split: str = "train"):
        self.task, self.split = task, split
        self.examples = task.examples(n, split)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        return self.examples[index]


class TaskCollator:
    """Batch a list of examples as ``fta.finetune`` does: the task's own ``collate`` or the answer-token one."""

    def __init__(self, task: Task, tok):
        self.task, self.tok = task, tok

    def __call__(self, examples: list) -> dict:
        if hasattr(self.task, "collate"):
            return self.task.collate(examples, self.tok)
        return collate(examples, self.tok)


class TaskLoss:
    """Trainer's ``compute_loss_func``: ``task.loss`` as a sum over this batch's items / Trainer's item count.

    ``task.loss`` is a mean over the batch's scored items (answer tokens; sentences for classification). Trainer
    counts the items of every micro-batch of an optimiser step (over every device when
    ``average_tokens_across_devices``) and expects a loss normalised by that count, so this returns
    ``mean * items_here / num_items_in_batch``; without a count it is the plain mean.
    """

    def __init__(self, task: Task):
        self.task = task

    def __call__(self, outputs, labels, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = self.task.loss(logits, {"labels": labels})
        if num_items_in_batch is None:
            return loss
        counted = labels[..., 1:] if self.task.kind == "lm" else labels  # as Trainer counts them (shifted for causal LMs)
        return loss * counted.ne(-100).sum().to(loss.device) / torch.as_tensor(num_items_in_batch, device=loss.device)


class MethodCallback(TrainerCallback):
    """Run a method's ``before_step`` / ``after_backward`` / ``after_step`` hooks at Trainer's optimiser steps."""

    def __init__(self, method: Method, seed: int = 0):
        self.method, self.seed = method, seed

    def _state(self, state, model, optimizer) -> TrainState:
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else 0.0
        return TrainState(step=state.global_step, steps=state.max_steps, lr=lr, model=model, optimizer=optimizer, seed=self.seed)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.method.before_step(self._state(state, model, optimizer))

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.method.after_backward(self._state(state, model, optimizer))  # after clipping, as in fta.finetune

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.method.after_step(self._state(state, model, optimizer))


@dataclass
class TrainerSetup:
    """What :func:`prepare_for_trainer` returns: a prepared model and the pieces ``transformers.Trainer`` needs."""

    model: nn.Module
    method: Method
    train_dataset: TaskDataset
    data_collator: TaskCollator
    compute_loss_func: TaskLoss
    callbacks: list = field(default_factory=list)

    def trainer_kwargs(self) -> dict:
        """``Trainer(args=..., **setup.trainer_kwargs())``: model, dataset, collator, loss and callbacks."""
        return {
            "model": self.model,
            "train_dataset": self.train_dataset,
            "data_collator": self.data_collator,
            "compute_loss_func": self.compute_loss_func,
            "callbacks": list(self.callbacks),
        }

    def merged_model(self) -> nn.Module:
        """A plain model of the base architecture with the trained update folded in (a copy).

        Gradient checkpointing that Trainer turned on (``TrainingArguments(gradient_checkpointing=True)``) is off
        in the copy, and the input-embedding hook that comes with it is removed.
        """
        return disable_checkpointing(self.method.merge(self.model, copy=True))


def prepare_for_trainer(model: nn.Module, tok, task: Task, method: Method | None = None, *, seed: int = 0,
                        n_examples: int = 8192, copy: bool = True) -> TrainerSetup:
    """Make ``model`` trainable with ``method`` for ``transformers.Trainer``, with the task's data and loss.

    Parameters
    ----------
    model, tok : a model and its tokenizer (e.g. from ``fta.zoo.load``).
    task : Task
        Training examples come from its ``train`` split; the loss is ``task.loss``, as in ``fta.finetune``.
    method : Method, default=Full()
        Any method that keeps back-propagation and AdamW (LoRA and its variants, Full, BitFit, IA3, SSF,
        adapters, prefix tuning, subspace training, ChainLoRA, ...).
    seed : int, default=0
        Seeds the method's initialisation (``torch.manual_seed(seed)`` before ``prepare`` and ``apply``, as in
        ``fta.finetune``) and is handed to its hooks. Trainer's own ``args.seed`` orders the data.
    n_examples : int, default=8192
        Size of the training set: the first ``n_examples`` of the ``train`` split (Trainer shuffles and
        cycles through it; ``fta.finetune`` instead draws fresh batches at every step).
    copy : bool, default=True
        Prepare a deep copy and leave ``model`` untouched.

    Returns
    -------
    TrainerSetup
        ``.model`` (the prepared model), ``.method``, ``.train_dataset``, ``.data_collator``,
        ``.compute_loss_func``, ``.callbacks``; pass them with ``Trainer(args=..., **setup.trainer_kwargs())``
        and merge with ``setup.merged_model()`` (or ``method.merge(setup.model)``).

    Raises
    ------
    ValueError
        If the method brings its own training step or optimiser (MeZO, LT-SFT, SpIEL, LIFT, HFT, LISA, GMT).

    Examples
    --------
    >>> import ftanalysis as fta, transformers
    >>> from ftanalysis.hf_trainer import prepare_for_trainer
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> setup = prepare_for_trainer(model, tok, fta.tasks.make("copy"), fta.methods.LoRA(r=4), n_examples=64)
    >>> args = transformers.TrainingArguments("/tmp/fta_trainer", max_steps=2, per_device_train_batch_size=8,
    ...                                       use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no")
    >>> _ = transformers.Trainer(args=args, **setup.trainer_kwargs()).train()  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> ft = setup.merged_model()
    """
    from .methods import Full

    method = Full() if method is None else method
    check_trainer_compatible(method)
    if not isinstance(task, Task):
        raise TypeError(f"The 'task' parameter of prepare_for_trainer must be an ftanalysis Task (fta.tasks.make). Got {type(task).__name__}.")
    seed = check_int(seed, "seed", "prepare_for_trainer")
    n_examples = check_int(n_examples, "n_examples", "prepare_for_trainer", 1)
    task.check_tokenizer(tok)
    check_model_tokenizer(model, tok)
    if copy:
        model = copy_module.deepcopy(model)
    torch.manual_seed(seed)
    method.prepare(model, tok, task, seed)
    model = method.apply(model)
    model.train()
    callbacks = [MethodCallback(method, seed)] if any(_overridden(method, hook) for hook in _STEP_HOOKS) else []
    return TrainerSetup(
        model=model,
        method=method,
        train_dataset=TaskDataset(task, n_examples, "train"),
        data_collator=TaskCollator(task, tok),
        compute_loss_func=TaskLoss(task),
        callbacks=callbacks,
    )
