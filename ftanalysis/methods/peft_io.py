"""Hugging Face PEFT interoperability: export our LoRA as a PEFT adapter, load a PEFT LoRA adapter merged.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, for each
adapted module at dotted path ``p``, ``base_model.model.p.lora_A.weight`` ``(R, in)`` and
``base_model.model.p.lora_B.weight`` ``(out, R)`` (and ``...lora_magnitude_vector`` ``(out,)`` for DoRA).
PEFT computes ``delta_W = scaling * B @ A`` in ``(out, in)`` orientation and transposes it for GPT-2's
``Conv1D`` (``fan_in_fan_out``), with ``scaling = alpha / R`` (``alpha / sqrt(R)`` under ``use_rslora``),
where R and alpha come from ``rank_pattern`` / ``alpha_pattern`` when a module matches one of their keys.

Our GPT-2 LoRA adapts the q, k and v thirds of the fused ``c_attn`` separately (rank r each). PEFT sees one
module, so the export writes one block-structured adapter of rank ``R = r * parts``::

    A = [A_q; A_k; A_v]  (R, in)        B = blockdiag(B_q, B_k, B_v)  (3d, R)

whose ``B @ A`` is exactly the three per-part updates; its alpha is set to ``scaling * R`` so that PEFT's
``alpha / R`` equals our scaling (``rank_pattern``/``alpha_pattern`` carry modules whose R or alpha differ
from the most common one). The export is exact whether or not the LoRA used rsLoRA scaling.

Nothing here imports PEFT: the files are written and read directly (PEFT is the test oracle).
"""

from __future__ import annotations

import copy as copy_module
import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._safe_load import safe_torch_load
from .._validation import check_bool
from ..nn.view import is_conv1d, unwrap
from .dora import DoRALayer
from .lora import LoRALayer, write_dense

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+?)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?:\.(?P<rest>.+))?$")


def _model_of(result_or_model) -> nn.Module:
    if isinstance(result_or_model, nn.Module):
        return result_or_model
    model = getattr(result_or_model, "model", None)
    if isinstance(model, nn.Module):
        return model
    raise TypeError(
        "export_peft expects a FinetuneResult or a model carrying LoRA layers (method.apply(model)). "
        f"Got {type(result_or_model).__name__}."
    )


def _check_directory(directory, owner: str) -> Path:
    if not isinstance(directory, (str, Path)) or (isinstance(directory, str) and not directory.strip()):
        raise TypeError(f"The 'directory' parameter of {owner} must be a non-empty str or pathlib.Path. Got {directory!r} instead.")
    return Path(directory)


def _block_adapter(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(A (R, in), B (out, R))`` pair with ``B @ A`` equal to every part's ``B_k @ A_k`` on its rows.

    Each part contributes its whole update (:meth:`LoRALayer.update_factors`): for a ChainLoRA layer, the links
    merged into the wrapped weight and the live link, stacked (rank ``r * links`` per part).
    """
    order = sorted(layer.parts, key=lambda k: layer.parts[k].start)
    factors = [layer.update_factors(k) for k in order]
    A = torch.cat([a.cpu() for a, _ in factors], dim=0)  # (R, in)
    B = torch.zeros(layer.out_features, A.shape[0])  # (out, R)
    start = 0
    for key, (a, b) in zip(order, factors):
        B[layer.parts[key], start : start + a.shape[0]] = b.cpu()
        start += a.shape[0]
    return A.contiguous(), B.contiguous()


@torch.no_grad()
def _dora_magnitude(layer: DoRALayer) -> torch.Tensor:
    """PEFT's ``(out,)`` magnitude: ours on adapted rows, ``||W0||_row`` elsewhere (a factor of 1 there)."""
    magnitude = torch.linalg.vector_norm(layer.base_weight().float(), dim=1).cpu()
    for key, s in layer.parts.items():
        magnitude[s] = layer.lora_magnitude[key].detach().float().cpu()
    return magnitude


def export_peft(result_or_model, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write a model's LoRA, DoRA or (IA)^3 adapters as a PEFT adapter directory and return its path.

    Parameters
    ----------
    result_or_model : FinetuneResult or nn.Module
        The result of ``fta.finetune(..., method=LoRA(...))`` (or ``DoRA``, ``IA3``) or a model after
        ``LoRA(...).apply(model)``.
    directory : str or Path
        Created if needed; ``adapter_config.json`` and ``adapter_model.safetensors`` are written into it (an
        existing adapter there is overwritten; an existing *file* at that path is a ``FileExistsError``).
    base_model_name_or_path : str, optional
        Recorded in the config (default: the model's ``config.name_or_path``).

    Returns
    -------
    Path of the directory; ``peft.PeftModel.from_pretrained(base, directory)`` loads it.

    Raises
    ------
    ValueError
        If the model carries no LoRA layer, if its base weights are PiSSA/CorDA residuals (the adapter would
        be relative to those, not to the released base), or if it has new task-head parameters (not exported).
    FileExistsError
        If ``directory`` is an existing file.

    Notes
    -----
    A :class:`~ftanalysis.methods.ChainLoRA` fine-tune is exported whole: each part's merged links and live link are
    stacked into one adapter of rank ``r * links`` (``sum_j B_j A_j = [B_1 .. B_J] [A_1; ..; A_J]``, exact).

    Examples
    --------
    >>> import ftanalysis as fta
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> result = fta.finetune(model, tok, fta.tasks.make("copy"), fta.methods.LoRA(r=4), steps=2, progress=False)
    >>> path = fta.export_peft(result, "/tmp/fta_lora_adapter")
    """
    model = _model_of(result_or_model)
    from .ia3 import IA3Layer

    ia3_layers = {path: m for path, m in model.named_modules() if isinstance(m, IA3Layer)}
    if ia3_layers:
        config, tensors = _ia3_adapter(model, ia3_layers, base_model_name_or_path)
        return _write_adapter(directory, config, tensors)
    layers = {path: m for path, m in model.named_modules() if isinstance(m, LoRALayer)}
    if not layers:
        raise ValueError("export_peft: the model carries no LoRA, DoRA or (IA)^3 layer; apply one of those methods first.")
    residual = [path for path, m in layers.items() if m.residual_base]
    if residual:
        raise ValueError(
            f"export_peft: the base weights of {residual[0]!r} (and {len(residual) - 1} more) hold the PiSSA/CorDA residual "
            "W0 - s B0 A0, so an adapter saved from them would not apply to the original base model. Merge instead "
            "(method.merge(model)) and save the merged model."
        )
    if hasattr(model, "new_parameters") and list(model.new_parameters()):
        raise ValueError("export_peft: this model has new task-head parameters, which a PEFT LoRA adapter would not carry.")
    dora = [isinstance(m, DoRALayer) for m in layers.values()]
    if any(dora) and not all(dora):
        raise ValueError("export_peft: the model mixes DoRA and LoRA layers; PEFT's use_dora is one flag per adapter.")
    tensors, ranks, alphas = {}, {}, {}
    for path, layer in layers.items():
        A, B = _block_adapter(layer)
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = A
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = B
        if isinstance(layer, DoRALayer):
            tensors[f"{_PREFIX}{path}.lora_magnitude_vector"] = _dora_magnitude(layer)
        ranks[path] = A.shape[0]
        alphas[path] = layer.scaling * A.shape[0]  # PEFT: scaling = alpha / R
    r, _ = Counter(ranks.values()).most_common(1)[0]
    alpha, _ = Counter(alphas.values()).most_common(1)[0]
    dropout = next(iter(layers.values())).lora_dropout
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(model, "get_output_embeddings") and hasattr(model, "generate") else None,
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0,
        "target_modules": sorted(layers),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "bias": "none",
        "use_rslora": False,  # alpha is chosen so that alpha / R is our scaling, rsLoRA or not
        "use_dora": all(dora),
        "rank_pattern": {p: R for p, R in ranks.items() if R != r},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    return _write_adapter(directory, config, tensors)


def _write_adapter(directory, config: dict, tensors: dict) -> Path:
    directory = _check_directory(directory, "export_peft")
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(
            f"The 'directory' parameter of export_peft must be a directory (new, empty or an adapter directory); "
            f"{str(directory)!r} is an existing file."
        )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def _ia3_adapter(model: nn.Module, layers: dict, base_model_name_or_path: str | None) -> tuple[dict, dict]:
    """PEFT's (IA)^3 adapter of a model carrying :class:`~ftanalysis.methods.IA3` layers: ``(config, tensors)``.

    PEFT scales a whole module: ``ia3_l`` is ``(out, 1)`` for an output-scaled module (bias included, as here) and
    ``(1, in)`` for a feedforward one. Where this package scales only some parts of a fused GPT-2 ``c_attn`` (k and
    v, not q), the exported vector holds 1 on the other rows: the same function, exactly.
    """
    if hasattr(model, "new_parameters") and list(model.new_parameters()):
        raise ValueError("export_peft: this model has new task-head parameters, which a PEFT (IA)^3 adapter would not carry.")
    tensors, feedforward = {}, []
    for path, layer in layers.items():
        vector = layer.scale().detach().float().cpu()  # (in,) if feedforward, else (out,) with 1 outside the parts
        tensors[f"{_PREFIX}{path}.ia3_l"] = (vector[None, :] if layer.feedforward else vector[:, None]).contiguous()
        if layer.feedforward:
            feedforward.append(path)
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM" if hasattr(model, "get_output_embeddings") and hasattr(model, "generate") else None,
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "target_modules": sorted(layers),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "init_ia3_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return config, tensors


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's ``get_pattern_key`` rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_NAME).is_file():
        path = directory / WEIGHTS_NAME
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors' own errors (truncated header or data) are not ValueErrors
            raise ValueError(
                f"load_peft: {path} is not a readable safetensors file (truncated or damaged: {err}). "
                "Save the adapter again (export_peft or PeftModel.save_pretrained)."
            ) from err
    if (directory / "adapter_model.bin").is_file():
        return safe_torch_load(directory / "adapter_model.bin", "PEFT adapter file")
    raise FileNotFoundError(f"load_peft: no {WEIGHTS_NAME} (or adapter_model.bin) in {directory}.")


# LoraConfig options (PEFT 0.22) that change what the adapter computes beyond W0 + scaling * B @ A: a merged
# model that ignored them would silently differ from PEFT's, so the loader refuses them.
_UNSUPPORTED_OPTIONS = (
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "target_parameters",
    "use_bdlora",
    "arrow_config",
    "monteclora_config",
    "kasa_config",
)


@torch.no_grad()
def load_peft(base: nn.Module | str | Path, directory: str | Path, merge: bool = True) -> nn.Module:
    """A copy of ``base`` with a PEFT LoRA adapter merged into its weights (a plain model, ``base`` untouched).

    With ``merge=False`` the copy carries the adapter as this package's :class:`~ftanalysis.methods.LoRA`
    instead (same ``r``, ``lora_alpha``, ``use_rslora``, ``lora_dropout`` and targets, its ``A`` and ``B``
    loaded), so it computes the same function and training continues on the adapter:
    ``fta.finetune(model, tok, task, fta.methods.LoRA(r=..., alpha=..., target=...))`` with the same settings
    (``fta.methods.applied_methods(model)[0]`` is that method) trains it further instead of adding a second adapter.
    A fused GPT-2 ``c_attn`` adapter becomes one update per part (q, k, v) that share PEFT's ``A`` at the start.

    Supports GPT-2's ``Conv1D`` layers (``fan_in_fan_out``), ``use_rslora``, ``rank_pattern`` /
    ``alpha_pattern``, DoRA (``use_dora``) and ``modules_to_save`` weights; the merged weight is
    ``W0 + scaling * B @ A`` (DoRA: ``m * (W0 + dW) / ||W0 + dW||_row``), computed in float32.

    Parameters
    ----------
    base : nn.Module, str or Path
        The base model the adapter was trained on (same architecture and module names), or where to load it
        from: a zoo name (``"gpt2-tiny"``), a checkpoint folder or a hub id.
    directory : str or Path
        A PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
    merge : bool, default=True
        False: keep the adapter unmerged, as a trainable LoRA (plain LoRA and rsLoRA adapters with one rank and
        alpha for every module; DoRA and rank or alpha patterns must be merged).

    Raises
    ------
    FileNotFoundError
        If ``directory`` does not exist or has no ``adapter_config.json`` / weights file.
    ValueError
        If the adapter is not a LoRA adapter, uses an option that changes what it computes (layer replication,
        trainable tokens, aLoRA, QALoRA, ...), names a module the base lacks, has a shape that does not fit, holds
        tensors this loader does not understand (LoRA on embeddings, LoRA biases), or its files are truncated or
        damaged.

    Examples
    --------
    >>> import ftanalysis as fta
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> merged = fta.load_peft(model, "/tmp/fta_lora_adapter")
    """
    if isinstance(base, (str, Path)):
        from ..zoo.loading import load_checkpoint

        base = load_checkpoint(base)[0]
    if not isinstance(base, nn.Module):
        raise TypeError(f"load_peft expects a torch nn.Module, a zoo name or a checkpoint folder as 'base'. Got {type(base).__name__}.")
    check_bool(merge, "merge", "load_peft")
    directory = _check_directory(directory, "load_peft")
    if not directory.exists():
        raise FileNotFoundError(f"load_peft: the adapter directory {str(directory)!r} does not exist.")
    if not directory.is_dir():
        raise NotADirectoryError(f"The 'directory' parameter of load_peft must be a PEFT adapter directory; {str(directory)!r} is a file.")
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"load_peft: {directory} has no {CONFIG_NAME}; is it a PEFT adapter directory?")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"load_peft: {directory / CONFIG_NAME} is not valid JSON ({err}); is the adapter truncated?") from err
    if not isinstance(config, dict):
        raise ValueError(f"load_peft: {directory / CONFIG_NAME} must hold a JSON object (a LoraConfig). Got {type(config).__name__}.")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_peft reads LoRA adapters only. This adapter's peft_type is {config.get('peft_type')!r}.")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        raise ValueError("load_peft does not support adapters that train biases (bias != 'none' or lora_bias=True).")
    unsupported = [name for name in _UNSUPPORTED_OPTIONS if config.get(name) not in (None, False, [], {})]
    if unsupported:
        raise ValueError(
            f"load_peft supports plain LoRA, rsLoRA and DoRA adapters; this adapter sets {unsupported}, which change what "
            "it computes. Merge it with PEFT instead (PeftModel.from_pretrained(base, directory).merge_and_unload())."
        )
    tensors = _read_weights(directory)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    extra, unknown = {}, []
    model = copy_module.deepcopy(base)
    state_keys = set(model.state_dict())
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match and (match["rest"] in (None, "weight") or match["rest"].count(".") <= 1):
            groups.setdefault(match["path"], {})[match["kind"]] = value
            continue
        plain = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        if config.get("modules_to_save") and plain in state_keys:
            extra[plain] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"load_peft does not understand {len(unknown)} tensor(s) of this adapter, e.g. {unknown[:3]}.")
    if not groups:
        raise ValueError(f"load_peft found no lora_A / lora_B tensors in {directory}.")
    for path, group in groups.items():
        if "lora_A" not in group or "lora_B" not in group:
            raise ValueError(f"load_peft: module {path!r} has {sorted(group)} but needs both lora_A and lora_B.")
        try:
            layer = unwrap(model.get_submodule(path))
        except AttributeError as err:
            raise ValueError(f"load_peft: the adapter targets {path!r}, which this {type(base).__name__} does not have.") from err
        A, B = group["lora_A"].float(), group["lora_B"].float()  # (R, in), (out, R)
        R = A.shape[0]
        expected_r = _pattern_value(config.get("rank_pattern"), path, config.get("r", R))
        if expected_r != R:
            raise ValueError(f"load_peft: {path!r} has lora_A of rank {R} but the config says r={expected_r}.")
        alpha = _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", R))
        scaling = alpha / math.sqrt(R) if config.get("use_rslora") else alpha / R
        weight = layer.weight
        W = (weight.T if is_conv1d(layer) else weight).float()  # (out, in)
        if B.shape[0] != W.shape[0] or A.shape[1] != W.shape[1] or B.shape[1] != R:
            raise ValueError(
                f"load_peft: the adapter of {path!r} has A {tuple(A.shape)} and B {tuple(B.shape)}, which do not fit its "
                f"(out, in) = {tuple(W.shape)} weight."
            )
        merged = W + scaling * (B.to(W.device) @ A.to(W.device))
        if "lora_magnitude_vector" in group:
            norm = torch.linalg.vector_norm(merged, dim=1)
            merged = (group["lora_magnitude_vector"].float().to(W.device) / norm)[:, None] * merged
        elif config.get("use_dora"):
            raise ValueError(f"load_peft: the config says use_dora but {path!r} has no lora_magnitude_vector.")
        write_dense(layer, merged)
    if not merge:
        return _unmerged(base, config, groups, extra)
    if extra:
        model.load_state_dict(extra, strict=False)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _unmerged(base: nn.Module, config: dict, groups: dict, extra: dict) -> nn.Module:
    """A copy of ``base`` carrying the adapter as a trainable :class:`LoRA` (``load_peft(..., merge=False)``)."""
    from ..nn.view import ModelView
    from .lora import LoRA

    patterns = {k: v for k, v in {**(config.get("rank_pattern") or {}), **(config.get("alpha_pattern") or {})}.items()}
    if config.get("use_dora") or any("lora_magnitude_vector" in g for g in groups.values()) or patterns:
        raise ValueError(
            "load_peft(..., merge=False) keeps plain LoRA and rsLoRA adapters with one rank and alpha; this one uses "
            f"{'DoRA' if config.get('use_dora') else 'rank_pattern / alpha_pattern'}. Load it merged (merge=True)."
        )
    view = ModelView(base)
    targets = []
    for path in groups:
        names = [n for n in view.matrix_names() if view.ref(n).module_path == path]
        if not names:
            raise ValueError(f"load_peft(..., merge=False): the adapter targets {path!r}, which is not an attention or MLP matrix.")
        targets += names
    r = int(config.get("r", next(iter(groups.values()))["lora_A"].shape[0]))
    method = LoRA(r=r, alpha=float(config.get("lora_alpha", r)), dropout=float(config.get("lora_dropout") or 0.0),
                  target=targets, rslora=bool(config.get("use_rslora", False)))
    model = method.apply(copy_module.deepcopy(base))
    with torch.no_grad():
        for path, group in groups.items():
            layer = model.get_submodule(path)
            A, B = group["lora_A"].float(), group["lora_B"].float()  # (r, in), (out, r)
            for key, rows in layer.parts.items():
                layer.lora_A[key].copy_(A.to(layer.lora_A[key].device))
                layer.lora_B[key].copy_(B[rows].to(layer.lora_B[key].device))
    if extra:
        model.load_state_dict(extra, strict=False)
    return model
