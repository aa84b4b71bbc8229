"""One compact training loop for every fine-tuning method: ``fta.finetune``.

The loop is deliberately plain (in the spirit of nanoGPT's ``train.py``): draw batch ``t`` of the task's
seeded stream, compute the loss on the answer tokens, let the method take its step (AdamW by default; a
zeroth-order method brings its own), evaluate every ``eval_every`` steps into a history table, and save a
checkpoint every ``checkpoint_every`` steps. Because batch ``t`` is a pure function of (task, seed, t) and
the optimiser and random-number states are saved, a run resumed from a checkpoint gives the same numbers as
an uninterrupted one (on CPU).

Methods customise the loop through small hooks on :class:`ftanalysis.methods.Method` (``before_step``,
``training_step``, ``after_step``), not through flags here.
"""

from __future__ import annotations

import copy as copy_module
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ._safe_load import safe_torch_load
from ._validation import check_bool, check_device, check_float, check_int, check_option
from .tasks.base import Task, check_model_tokenizer, check_task_model

SCHEDULES = ("constant", "linear", "cosine")


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, or the best available one: CUDA, then Apple MPS, then CPU.

    Raises ``TypeError`` for a device that is not a str or ``torch.device`` and ``ValueError`` for an unknown
    device string or a CUDA device this machine does not have (``"cuda"`` without a GPU, ``"cuda:3"`` with one).
    """
    if device is not None:
        return check_device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def learning_rate(step: int, steps: int, lr: float, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up over ``warmup_steps``, then constant, linear decay to 0, or cosine decay to 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    if schedule == "linear":
        return lr * (1 - progress)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_bf16(device: torch.device, bf16: bool | None = None) -> bool:
    """Whether a run on ``device`` uses bf16 autocast: on CUDA only (None), yes (True) or no (False).

    ``bf16=True`` is accepted on CUDA (when the GPU supports bfloat16) and on CPU, where torch's CPU autocast runs
    matrix products in bfloat16; on CPU it is meant to check a GPU recipe's numerics, and is usually slower than
    float32 on CPUs without native bfloat16 units (AMX, AVX512-BF16). Other devices (MPS) raise ``ValueError``.
    """
    if bf16 is None:
        return device.type == "cuda"
    if bf16 and device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"finetune(bf16=True) runs bf16 autocast on CUDA or CPU only. Got device {str(device)!r}: "
            "use bf16=False (float32) or bf16=None (bf16 on CUDA only)."
        )
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"finetune(bf16=True): the GPU {torch.cuda.get_device_name(device)!r} does not support bfloat16. "
            "Use bf16=False (float32)."
        )
    return bf16


def check_checkpointing_support(model: torch.nn.Module, owner: str = "finetune") -> None:
    """Raise ``ValueError`` unless ``model`` is a Hugging Face model that supports gradient checkpointing."""
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{owner}(gradient_checkpointing=True) needs a Hugging Face model that supports gradient checkpointing; "
            f"{type(model).__name__} does not. Use gradient_checkpointing=False."
        )


@contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool = True):
    """Hugging Face gradient (activation) checkpointing on ``model`` inside the block, off again after it.

    Non-reentrant checkpointing (``use_reentrant=False``) back-propagates into the trainable parameters of a
    checkpointed block even when none of its inputs requires a gradient (a LoRA model with frozen embeddings), and
    replays the random state, so dropout masks and hence the loss curve are the same as without it.
    """
    if not enabled:
        yield model
        return
    check_checkpointing_support(model)
    hooks_before = list(getattr(model, "_require_grads_hooks", None) or [])
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    try:
        yield model
    finally:
        disable_checkpointing(model, keep_hooks=hooks_before)


def disable_checkpointing(model: torch.nn.Module, keep_hooks: list | None = None) -> torch.nn.Module:
    """Turn Hugging Face gradient checkpointing off on ``model`` (in place) and remove what enabling it added.

    Transformers 5 also hooks the input embeddings to require gradients (``enable_input_require_grads``) when
    checkpointing is turned on, and leaves that hook in place when it is turned off; this removes it too, except
    the hooks in ``keep_hooks`` (those the model had before). A model without checkpointing is left as it is.
    """
    disable = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable", None)
    if disable is not None and getattr(model, "supports_gradient_checkpointing", False):
        disable()
    keep_hooks = list(keep_hooks or [])
    for hook in getattr(model, "_require_grads_hooks", None) or []:
        if not any(hook is kept for kept in keep_hooks):
            hook.remove()
    if keep_hooks:
        model._require_grads_hooks = keep_hooks
    elif hasattr(model, "_require_grads_hooks"):
        model._require_grads_hooks = []
        if hasattr(model, "_require_grads_hook"):
            del model._require_grads_hook
    return model


@dataclass
class TrainState:
    """What the loop hands to a method's hooks at every step."""

    step: int
    steps: int
    lr: float
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    seed: int


@dataclass
class FinetuneResult:
    """The outcome of :func:`finetune`.

    Attributes
    ----------
    model : nn.Module
        The trained model as the method left it (adapter modules in place for LoRA and friends).
    method : Method
        The method configuration used.
    history : pandas.DataFrame
        One row per evaluation: ``step``, ``train_loss`` (mean since the previous row), ``val_accuracy``,
        ``val_loss`` and ``<name>/accuracy``, ``<name>/loss`` for every extra evaluation task.
    losses : list of float
        The training loss of every step, always recorded (:attr:`loss_curve` as a Series).
    """

    model: torch.nn.Module
    method: object
    task: Task
    history: pd.DataFrame
    steps: int
    lr: float
    batch_size: int
    seed: int
    seconds: float
    trainable_parameters: int
    total_parameters: int
    device: str
    peak_memory_bytes: int | None = None
    extras: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)
    tokenizer: object = field(default=None, repr=False)

    def save_pretrained(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the merged model, its tokenizer and ``card.json`` (the run's settings, history and loss curve).

        The folder loads with :func:`ftanalysis.load_model`. It is written to a temporary folder beside
        ``directory`` and renamed into place, so an interrupted save leaves nothing half-written; an existing
        non-empty ``directory`` is a ``FileExistsError`` unless ``overwrite``.
        """
        from ._atomic import write_model_folder

        return write_model_folder(directory, self.merged_model(), self.tokenizer, {"card.json": json.dumps(self.card(), indent=2) + "\n"},
                                  overwrite, "pass overwrite=True to replace it, or choose another folder.")

    def card(self) -> dict:
        """The run as JSON-ready data: method, task, settings, history and the loss of every step."""
        return {
            "method": repr(self.method), "task": repr(self.task), "steps": self.steps, "lr": self.lr,
            "batch_size": self.batch_size, "seed": self.seed, "seconds": round(self.seconds, 3), "device": self.device,
            "trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters,
            "extras": self.extras, "history": self.history.to_dict(orient="records"), "losses": self.losses,
        }

    def __repr__(self) -> str:
        final = f"final train loss {self.losses[-1]:.4g}" if self.losses else "no step"
        last = self.history.iloc[-1] if len(self.history) else {}
        val = f", val accuracy {last['val_accuracy']:.3f}" if "val_accuracy" in last else ""
        return (
            f"FinetuneResult({self.method!r} on {getattr(self.task, 'name', self.task)!r}: {self.steps} steps, lr {self.lr:g}, "
            f"batch {self.batch_size}, seed {self.seed}, {self.seconds:.1f} s on {self.device}; trainable "
            f"{self.trainable_parameters:,} of {self.total_parameters:,}; {final}{val})"
        )

    @property
    def loss_curve(self) -> pd.Series:
        """The training loss per step, indexed by step (1-based)."""
        return pd.Series(self.losses, index=pd.RangeIndex(1, len(self.losses) + 1, name="step"), name="train_loss", dtype=float)

    def merged_model(self) -> torch.nn.Module:
        """A plain Hugging Face model of the base architecture with the update folded in (a copy)."""
        return self.method.merge(self.model, copy=True)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, self.steps)

    def summary(self) -> dict:
        """Scalars for a comparison table (one row per run)."""
        last = self.history.iloc[-1].to_dict() if len(self.history) else {}
        return {
            "method": repr(self.method),
            "trainable_parameters": self.trainable_parameters,
            "trainable_fraction": self.trainable_parameters / max(1, self.total_parameters),
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "seconds_per_step": round(self.seconds_per_step, 4),
            **{k: v for k, v in last.items() if k != "step"},
        }


def same_configuration(a, b) -> bool:
    """True when two methods are of one type with equal settings (``8 == 8.0``; fitted state is ignored)."""
    from dataclasses import fields, is_dataclass

    if type(a) is not type(b) or not is_dataclass(a):
        return False
    return all(getattr(a, f.name) == getattr(b, f.name) for f in fields(a) if f.init and f.repr)


def finetune(
    model: torch.nn.Module,
    tok,
    task: Task,
    method=None,
    *,
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    schedule: str = "constant",
    grad_clip: float | None = 1.0,
    eval_every: int | None = None,
    eval_n: int = 256,
    eval_tasks: dict[str, Task] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    copy: bool = True,
    progress: bool = True,
    gradient_checkpointing: bool = False,
    bf16: bool | None = None,
    fused_optimizer: bool = False,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``task`` with ``method`` and return a :class:`FinetuneResult`.

    Parameters
    ----------
    model, tok : a causal LM and its tokenizer (e.g. from ``fta.zoo.load``).
    task : Task
        Training batches come from its ``train`` split; ``val`` is used for the history.
    method : Method, default=Full()
        How the model is made trainable (``fta.methods.LoRA(r=8)``, ...). If ``model`` already carries a method
        of the same configuration (e.g. from ``fta.load_peft(base, adapter, merge=False)``), training continues on
        that one instead of applying a second.
    steps, lr, batch_size : positive numbers.
    seed : int, default=0
        Seeds the method's initialisation, dropout and the order of training batches.
    device : str, optional
        Default: CUDA if available, else MPS, else CPU.
    weight_decay, warmup_steps, schedule : AdamW weight decay, linear warm-up length, and ``"constant"``,
        ``"linear"`` or ``"cosine"`` decay after it.
    grad_clip : float or None, default=1.0
        Clip the gradient norm (None: no clipping).
    eval_every : int, optional
        Evaluate every this many steps (and at the end). Default: only at the end.
    eval_n : int, default=256
        Examples per evaluation.
    eval_tasks : dict of name -> Task, optional
        Extra tasks evaluated alongside (e.g. ``{"mix": fta.tasks.make("pretraining_mix")}`` to watch forgetting).
    checkpoint_dir, checkpoint_every : save a checkpoint every this many steps into ``checkpoint_dir``.
    resume : bool, default=False
        Continue from the latest checkpoint in ``checkpoint_dir`` (same model, method and settings required).
    copy : bool, default=True
        Train a deep copy and leave ``model`` untouched. ``False`` trains ``model`` in place.
    progress : bool, default=True
        Show a tqdm progress bar.
    gradient_checkpointing : bool, default=False
        Recompute each block's activations in the backward pass instead of storing them (Hugging Face's
        non-reentrant checkpointing): less memory for about one more forward pass per step, the same loss curve
        (bit for bit on CPU, dropout included). Works with every method, LoRA included; the returned model has it
        turned off again. Needs a Hugging Face model that supports it (every zoo decoder and ``fta.load_model`` LM).
    bf16 : bool or None, default=None
        None: the forward pass runs under bf16 autocast on CUDA and in float32 elsewhere. True: bf16 autocast on
        CUDA or CPU (on CPU to check a GPU recipe's numerics; usually slower there); any other device, or a GPU
        without bfloat16, is a ``ValueError``. False: float32 everywhere. Parameters and optimiser state stay
        float32 in every case. These choices and ``fused_optimizer`` are recorded in ``result.extras``.
    fused_optimizer : bool, default=False
        PyTorch's fused AdamW (``torch.optim.AdamW(fused=True)``: one kernel for the whole update) instead of its
        default multi-tensor one. The same update up to float rounding, not bit for bit; about 3x faster optimiser
        steps on CPU for a 100M-parameter full fine-tune (SmolLM2), where the update is a fifth of the step. A
        method without an optimiser (MeZO) refuses it.

    Raises
    ------
    FloatingPointError
        If the loss becomes NaN or infinite (the message gives the step and learning rate).
    """
    from .methods import Full, Method, applied_methods

    method = Full() if method is None else method
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"The 'model' parameter of finetune must be a torch nn.Module (e.g. from fta.zoo.load). Got {type(model).__name__}."
        )
    if tok is None or not callable(tok) or not hasattr(tok, "get_vocab"):
        raise TypeError(
            f"The 'tok' parameter of finetune must be the model's tokenizer (e.g. from fta.zoo.load). Got {type(tok).__name__}."
        )
    if not isinstance(task, Task):
        raise TypeError(f"The 'task' parameter of finetune must be an ftanalysis Task (fta.tasks.make). Got {type(task).__name__}.")
    if not isinstance(method, Method):
        raise TypeError(f"The 'method' parameter of finetune must be an fta.methods.Method. Got {type(method).__name__}.")
    steps = check_int(steps, "steps", "finetune", 1)
    lr = check_float(lr, "lr", "finetune", low=0.0, low_open=True)
    batch_size = check_int(batch_size, "batch_size", "finetune", 1)
    seed = check_int(seed, "seed", "finetune")
    weight_decay = check_float(weight_decay, "weight_decay", "finetune", low=0.0)
    warmup_steps = check_int(warmup_steps, "warmup_steps", "finetune", 0)
    check_option(schedule, "schedule", "finetune", SCHEDULES)
    if grad_clip is not None:
        grad_clip = check_float(grad_clip, "grad_clip", "finetune", low=0.0, low_open=True)
    eval_n = check_int(eval_n, "eval_n", "finetune", 1)
    if eval_every is not None:
        eval_every = check_int(eval_every, "eval_every", "finetune", 1)
    if checkpoint_every is not None:
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every", "finetune", 1)
        if checkpoint_dir is None:
            raise ValueError("finetune got checkpoint_every but no checkpoint_dir to write checkpoints into.")
    for flag, value in (("resume", resume), ("copy", copy), ("progress", progress), ("fused_optimizer", fused_optimizer)):
        check_bool(value, flag, "finetune")
    if resume and checkpoint_dir is None:
        raise ValueError("finetune(resume=True) needs the checkpoint_dir of the interrupted run.")
    if checkpoint_dir is not None and checkpoint_every is None and not resume:
        raise ValueError(
            "finetune got checkpoint_dir but no checkpoint_every, so no checkpoint would be written: give "
            "checkpoint_every=N (steps between checkpoints), or resume=True to continue from checkpoint_dir."
        )
    if not isinstance(gradient_checkpointing, bool):
        raise TypeError(f"The 'gradient_checkpointing' parameter of finetune must be a bool. Got {gradient_checkpointing!r} instead.")
    if bf16 is not None and not isinstance(bf16, bool):
        raise TypeError(f"The 'bf16' parameter of finetune must be True, False or None. Got {bf16!r} instead.")
    if gradient_checkpointing:
        check_checkpointing_support(model)
    if eval_tasks is not None and not isinstance(eval_tasks, Mapping):
        raise TypeError(
            "The 'eval_tasks' parameter of finetune must be a dict of name -> Task, e.g. "
            f"{{'mix': fta.tasks.make('pretraining_mix')}}. Got {type(eval_tasks).__name__}: {eval_tasks!r}."[:400]
        )
    eval_tasks = dict(eval_tasks or {})
    for name, extra in eval_tasks.items():
        if not isinstance(name, str):
            raise TypeError(f"The 'eval_tasks' parameter of finetune must be keyed by names (str). Got the key {name!r}.")
        if not isinstance(extra, Task):
            raise TypeError(f"eval_tasks[{name!r}] must be a Task. Got {type(extra).__name__}.")
    task.check_tokenizer(tok)
    check_model_tokenizer(model, tok)
    check_task_model(model, tok, task, "finetune")
    for name, extra in eval_tasks.items():
        check_task_model(model, tok, extra, "finetune", name=f"eval_tasks[{name!r}]")

    device = choose_device(device)
    use_bf16 = resolve_bf16(device, bf16)  # a bad bf16 / device pair fails here, before any work
    if copy:
        model = copy_module.deepcopy(model)
    torch.manual_seed(seed)
    carried = [m for m in applied_methods(model) if same_configuration(m, method)]
    if carried:  # the model already carries this method (load_peft(..., merge=False)): train that adapter further
        method = carried[0]
    else:
        method.prepare(model, tok, task, seed)
        model = method.apply(model)
    model.to(device)
    model.train()
    optimizer = method.make_optimizer(model, lr=lr, weight_decay=weight_decay, fused=fused_optimizer)
    trainable = method.trainable_count(model)
    total = sum(p.numel() for p in model.parameters())

    start_step, history, seconds_before, losses = 0, [], 0.0, []
    if resume:
        start_step, history, seconds_before, losses = _load_checkpoint(Path(checkpoint_dir), model, optimizer, method)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if use_bf16:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = torch.autocast("cuda" if device.type == "cuda" else "cpu", enabled=False)

    # no key/value cache in training; said explicitly under checkpointing, where HF would warn that it turns it off
    no_cache = {"use_cache": False} if gradient_checkpointing else {}

    def compute_loss(batch: dict) -> torch.Tensor:
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache).logits
        return task.loss(logits, batch)

    started = time.perf_counter()
    running, running_n = 0.0, 0
    with activation_checkpointing(model, enabled=gradient_checkpointing):
        bar = tqdm(range(start_step, steps), desc=f"{type(method).__name__} on {task.name}", disable=not progress)
        for step in bar:
            current_lr = learning_rate(step, steps, lr, warmup_steps, schedule)
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = current_lr
            state = TrainState(step=step, steps=steps, lr=current_lr, model=model, optimizer=optimizer, seed=seed)
            method.before_step(state)
            batch = task.batch(tok, batch_size, step=step, split="train", seed=seed, device=device)
            loss = method.training_step(state, batch, compute_loss, grad_clip)
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"The training loss became {loss_value} at step {step} (lr={current_lr:g}, method={method!r}). "
                    f"Lower the learning rate or check the data.{_last_finite_hint(checkpoint_dir)}"
                )
            method.after_step(state)
            losses.append(loss_value)
            running += loss_value
            running_n += 1
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}")
            done = step + 1
            if (eval_every and done % eval_every == 0) or done == steps:
                row = {"step": done, "train_loss": running / running_n}
                running, running_n = 0.0, 0
                scores = task.evaluate(model, tok, split="val", n=eval_n)
                row["val_accuracy"], row["val_loss"] = scores["accuracy"], scores["loss"]
                for name, extra in eval_tasks.items():
                    extra_scores = extra.evaluate(model, tok, split="test", n=eval_n)
                    row[f"{name}/accuracy"], row[f"{name}/loss"] = extra_scores["accuracy"], extra_scores["loss"]
                history.append(row)
                model.train()
            if checkpoint_every and (done % checkpoint_every == 0 or done == steps):
                elapsed = seconds_before + time.perf_counter() - started
                _save_checkpoint(Path(checkpoint_dir), done, model, optimizer, method, history, elapsed, losses, tok)
        bar.close()
    model.eval()
    seconds = seconds_before + time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return FinetuneResult(
        model=model,
        method=method,
        task=task,
        history=pd.DataFrame(history),
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        seconds=seconds,
        trainable_parameters=trainable,
        total_parameters=total,
        device=str(device),
        peak_memory_bytes=peak,
        extras={"gradient_checkpointing": gradient_checkpointing, "bf16": use_bf16, "fused_optimizer": fused_optimizer},
        losses=losses,
        tokenizer=tok,
    )


# ---------------------------------------------------------------------- checkpoints
def _save_checkpoint(root: Path, step: int, model, optimizer, method, history: list, seconds: float, losses: list, tok=None) -> None:
    """Write ``root/step_<n>`` atomically; a model with a non-finite weight is refused, never written.

    The folder holds what resuming needs (``training_state.safetensors``: the model as the method left it,
    ``optimizer.pt``, ``rng_and_method.pt``, ``trainer_state.json``) and, for every method that merges, the
    merged model as a Hugging Face checkpoint (``config.json``, ``model.safetensors``) with the tokenizer, so
    ``fta.load_model(root / "step_<n>")`` loads it. Everything is written into ``root/.tmp_step_<n>`` first and
    renamed into place: a process killed mid-write leaves no ``step_*`` folder half-written (and the next resume
    removes the leftover temporary folder).
    """
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(
            f"The weights became non-finite by step {step} ({bad[:3]}); no checkpoint was written for it."
            f"{_last_finite_hint(root)}"
        )
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_dedupe_shared(state), str(tmp / "training_state.safetensors"))
    loadable = False
    merged = method.merge(model, copy=True) if method.has_dense_form else None  # adapters and prefixes: none
    if merged is not None and hasattr(merged, "save_pretrained"):
        merged.save_pretrained(tmp)
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(tmp)
        loadable = True
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "method": method.state_dict()}, tmp / "rng_and_method.pt")
    meta = {"step": step, "history": history, "seconds": seconds, "losses": losses, "loadable_with_load_model": loadable}
    (tmp / "trainer_state.json").write_text(json.dumps(meta))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _last_finite_hint(root) -> str:
    """`` The last checkpoint ... is finite: ...`` when ``root`` holds one, else an empty string."""
    if root is None or not Path(root).is_dir():
        return ""
    try:
        last = latest_checkpoint(Path(root))
    except FileNotFoundError:
        return ""
    return (
        f" The last checkpoint, {last}, is finite (non-finite ones are never written): resume from it with "
        "resume=True and a lower learning rate."
    )


def _dedupe_shared(state: dict) -> dict:
    """safetensors refuses tensors that share memory (tied embeddings): store each storage once."""
    seen, out = {}, {}
    for key, value in state.items():
        ptr = (value.data_ptr(), value.shape, value.stride())
        if value.numel() and ptr in seen:
            continue
        seen[ptr] = key
        out[key] = value.clone()
    return out


def latest_checkpoint(root: Path) -> Path:
    """The newest complete ``step_<n>`` folder under ``root``."""
    candidates = sorted(p for p in Path(root).glob("step_*") if (p / "trainer_state.json").is_file())
    if not candidates:
        raise FileNotFoundError(f"No checkpoint (step_*/trainer_state.json) found in {root} to resume from.")
    return candidates[-1]


def _load_checkpoint(root: Path, model, optimizer, method) -> tuple[int, list, float, list]:
    path = latest_checkpoint(root)
    extra = safe_torch_load(path / "rng_and_method.pt", "checkpoint file")
    for tmp in Path(root).glob(".tmp_step_*"):  # left by a process killed while writing a checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
    state_file = path / "training_state.safetensors"
    if not state_file.is_file():  # checkpoints of older versions kept the training state in model.safetensors
        state_file = path / "model.safetensors"
    try:
        state = load_file(str(state_file))
        meta = json.loads((path / "trainer_state.json").read_text())
    except Exception as err:
        raise ValueError(f"The checkpoint {path} is corrupt or incomplete ({state_file.name} or trainer_state.json): {err}") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") or "embed" in k}
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"The checkpoint {path} does not match this model and method: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}. Resume with the same base model and method."
        )
    if optimizer is not None:
        optimizer.load_state_dict(safe_torch_load(path / "optimizer.pt", "checkpoint file"))
    torch.set_rng_state(extra["torch"])
    method.load_state_dict(extra["method"])
    step = int(meta["step"])
    losses = [float(v) for v in meta.get("losses", [math.nan] * step)]  # checkpoints of older versions have none
    return step, list(meta["history"]), float(meta["seconds"]), losses
