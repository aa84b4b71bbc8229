"""One canonical view of every supported architecture: blocks, heads, MLPs and weight matrices.

Whatever the source layer, a weight matrix is read and written in ``(out, in)`` orientation, float32, under a
canonical name:

=====================  ======================  =========================  ===============================
canonical name         GPT-2                   Llama / Qwen2 / Mistral    BERT / RoBERTa
=====================  ======================  =========================  ===============================
``layers.{l}.attn.q``  ``attn.c_attn`` [0:d]   ``self_attn.q_proj``       ``attention.self.query``
``layers.{l}.attn.k``  ``attn.c_attn`` [d:2d]  ``self_attn.k_proj``       ``attention.self.key``
``layers.{l}.attn.v``  ``attn.c_attn`` [2d:3d] ``self_attn.v_proj``       ``attention.self.value``
``layers.{l}.attn.o``  ``attn.c_proj``         ``self_attn.o_proj``       ``attention.output.dense``
``layers.{l}.mlp.gate``                        ``mlp.gate_proj``
``layers.{l}.mlp.up``  ``mlp.c_fc``            ``mlp.up_proj``            ``intermediate.dense``
``layers.{l}.mlp.down`` ``mlp.c_proj``         ``mlp.down_proj``          ``output.dense``
=====================  ======================  =========================  ===============================

GPT-2 stores its projections as ``Conv1D`` with weights ``(in, out)``: this module is the one place that
transposes them (:meth:`MatrixRef.to_canonical`), and it views the fused ``c_attn`` as separate q, k, v by
slicing its output columns. TransformerLens' ``W_Q`` is ``(in, out)`` per head; ours is ``(out, in)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

GPT2_TYPES = ("gpt2",)
LLAMA_TYPES = ("llama", "qwen2", "mistral", "qwen3")
BERT_TYPES = ("bert", "roberta")
SUPPORTED_MODEL_TYPES = GPT2_TYPES + LLAMA_TYPES + BERT_TYPES

# canonical suffix -> (module path inside a block, which third of a fused q/k/v output, or None)
_LAYOUTS: dict[str, dict[str, tuple[str, int | None]]] = {
    "gpt2": {
        "attn.q": ("attn.c_attn", 0),
        "attn.k": ("attn.c_attn", 1),
        "attn.v": ("attn.c_attn", 2),
        "attn.o": ("attn.c_proj", None),
        "mlp.up": ("mlp.c_fc", None),
        "mlp.down": ("mlp.c_proj", None),
    },
    "llama": {
        "attn.q": ("self_attn.q_proj", None),
        "attn.k": ("self_attn.k_proj", None),
        "attn.v": ("self_attn.v_proj", None),
        "attn.o": ("self_attn.o_proj", None),
        "mlp.gate": ("mlp.gate_proj", None),
        "mlp.up": ("mlp.up_proj", None),
        "mlp.down": ("mlp.down_proj", None),
    },
    "bert": {
        "attn.q": ("attention.self.query", None),
        "attn.k": ("attention.self.key", None),
        "attn.v": ("attention.self.value", None),
        "attn.o": ("attention.output.dense", None),
        "mlp.up": ("intermediate.dense", None),
        "mlp.down": ("output.dense", None),
    },
}
# path of the block list inside the architecture's bare model
_BLOCK_LISTS = {"gpt2": "h", "llama": "layers", "bert": "encoder.layer"}
_ATTENTION = {"gpt2": "attn", "llama": "self_attn", "bert": "attention"}
_MLP = {"gpt2": "mlp", "llama": "mlp", "bert": None}
# decoder modules outside the blocks, as attributes of the bare model that holds the block list
_DECODER_PARTS = {
    "gpt2": {"embed": "wte", "pos_embed": "wpe", "final_norm": "ln_f"},
    "llama": {"embed": "embed_tokens", "final_norm": "norm"},  # RoPE: no position embedding
}


def family_of(model_type: str) -> str:
    """``"gpt2"``, ``"llama"`` or ``"bert"`` for a Hugging Face ``config.model_type``."""
    if model_type in GPT2_TYPES:
        return "gpt2"
    if model_type in LLAMA_TYPES:
        return "llama"
    if model_type in BERT_TYPES:
        return "bert"
    raise ValueError(
        f"Unsupported architecture {model_type!r}. Supported Hugging Face model types: {list(SUPPORTED_MODEL_TYPES)}."
    )


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2's ``Conv1D`` (weight stored ``(in, out)``)."""
    return type(unwrap(module)).__name__ == "Conv1D"


def unwrap(module: nn.Module) -> nn.Module:
    """The original layer under adapter wrappers (ours and PEFT's both keep it as ``base_layer``)."""
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
    return module


@dataclass(frozen=True)
class MatrixRef:
    """Where a canonical weight matrix lives in a Hugging Face model.

    ``param_name`` is the state-dict key of the source weight; ``part`` (0, 1, 2) picks q, k or v out of a
    fused GPT-2 ``c_attn``; ``transposed`` is True for ``Conv1D`` weights stored ``(in, out)``.
    """

    name: str  # canonical, e.g. "layers.3.attn.q"
    layer: int
    kind: str  # "attn.q", "mlp.down", ...
    module_path: str  # e.g. "transformer.h.3.attn.c_attn"
    param_name: str  # e.g. "transformer.h.3.attn.c_attn.weight"
    part: int | None
    n_parts: int
    transposed: bool

    @property
    def module_type(self) -> str:
        """``"attn"`` or ``"mlp"``."""
        return self.kind.split(".")[0]

    def to_canonical(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``(out, in)`` float32 matrix from the stored source weight (a copy)."""
        w = weight.detach().to(torch.float32)
        if self.transposed:
            w = w.T  # Conv1D stores (in, out)
        if self.part is not None:
            rows = w.shape[0] // self.n_parts
            w = w[self.part * rows : (self.part + 1) * rows]
        return w.clone()

    def out_slice(self, out_features: int) -> slice:
        """Rows of the source module's output that this matrix produces."""
        if self.part is None:
            return slice(0, out_features)
        rows = out_features // self.n_parts
        return slice(self.part * rows, (self.part + 1) * rows)


class ModelView:
    """Canonical view of a GPT-2, Llama-family (Llama, Qwen2, Mistral) or BERT/RoBERTa model.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face model (with or without its LM / classification head), or any module holding exactly
        one such model with a ``config`` (e.g. an encoder wrapped with a classifier head).

    Examples
    --------
    >>> import ftanalysis as fta
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> view = fta.nn.ModelView(model)
    >>> view.matrix_names()[:3]
    ['layers.0.attn.q', 'layers.0.attn.k', 'layers.0.attn.v']
    >>> tuple(view.get("layers.0.mlp.up").shape)  # (out, in) = (d_mlp, d_model)
    (256, 64)
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModelView expects a torch nn.Module. Got {type(model).__name__}.")
        self.model = model
        config = getattr(model, "config", None)
        if config is None:
            inner = [m for m in model.modules() if m is not model and getattr(m, "config", None) is not None]
            if not inner:
                raise TypeError(f"ModelView could not find a Hugging Face config in {type(model).__name__}.")
            config = inner[0].config
        self.config = config
        self.family = family_of(getattr(config, "model_type", None))
        self.block_list_path, self.blocks = self._find_blocks()
        self._refs = self._build_refs()

    # ------------------------------------------------------------------ structure
    def _find_blocks(self) -> tuple[str, nn.ModuleList]:
        suffix = _BLOCK_LISTS[self.family]
        found = [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, nn.ModuleList) and (name == suffix or name.endswith("." + suffix))
        ]
        if len(found) != 1:
            raise ValueError(
                f"Expected one block list named '*{suffix}' in this {self.family} model; found {[n for n, _ in found]}."
            )
        return found[0]

    def _build_refs(self) -> dict[str, MatrixRef]:
        refs = {}
        layout = _LAYOUTS[self.family]
        for layer, block in enumerate(self.blocks):
            for kind, (path, part) in layout.items():
                module = block.get_submodule(path)
                module_path = f"{self.block_list_path}.{layer}.{path}"
                refs[f"layers.{layer}.{kind}"] = MatrixRef(
                    name=f"layers.{layer}.{kind}",
                    layer=layer,
                    kind=kind,
                    module_path=module_path,
                    param_name=f"{module_path}.weight",
                    part=part,
                    n_parts=3 if part is not None else 1,
                    transposed=is_conv1d(module),
                )
        return refs

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        c = self.config
        return getattr(c, "n_embd", None) or c.hidden_size

    @property
    def n_heads(self) -> int:
        c = self.config
        return getattr(c, "n_head", None) or c.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def d_head(self) -> int:
        return getattr(self.config, "head_dim", None) or self.d_model // self.n_heads

    @property
    def d_mlp(self) -> int:
        return self.get("layers.0.mlp.up").shape[0]

    def attention(self, layer: int) -> nn.Module:
        """The attention module of block ``layer``."""
        return self.blocks[self._layer(layer)].get_submodule(_ATTENTION[self.family])

    def block(self, layer: int) -> nn.Module:
        return self.blocks[self._layer(layer)]

    def decoder_module(self, part: str) -> nn.Module | None:
        """A decoder's module outside its blocks, found next to the block list (under any adapter wrapper).

        ``part`` is ``"embed"`` (token embedding: GPT-2 ``wte``, Llama ``embed_tokens``), ``"pos_embed"`` (GPT-2's
        learned ``wpe``; ``None`` for RoPE models, which have none) or ``"final_norm"`` (``ln_f``, ``norm``).
        """
        parts = _DECODER_PARTS.get(self.family)
        if parts is None:
            raise ValueError(
                f"decoder_module supports the decoder families {list(_DECODER_PARTS)}. Got a {self.family!r} model."
            )
        if part not in ("embed", "pos_embed", "final_norm"):
            raise ValueError(
                "The 'part' parameter of decoder_module must be one of ['embed', 'pos_embed', 'final_norm']. "
                f"Got {part!r}."
            )
        if part not in parts:
            return None
        parent_path = self.block_list_path.rpartition(".")[0]
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        module = getattr(parent, parts[part], None)
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"Could not find the {part} module {parts[part]!r} next to the block list {self.block_list_path!r} "
                f"of this {self.family} model."
            )
        return module

    def _layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -self.n_layers <= layer < self.n_layers:
            raise ValueError(f"Layer index {layer!r} out of range for a model with {self.n_layers} layers.")
        return layer % self.n_layers

    # ------------------------------------------------------------------ matrices
    def matrix_names(self, kinds: str | list[str] | None = None) -> list[str]:
        """Canonical names of every block weight matrix, in layer order (optionally only some kinds).

        ``kinds`` may be ``"attn"``, ``"mlp"``, or a list of suffixes such as ``["attn.q", "mlp.down"]``.
        """
        names = list(self._refs)
        if kinds is None:
            return names
        wanted = [kinds] if isinstance(kinds, str) else list(kinds)
        return [n for n in names if any(self._refs[n].kind == k or self._refs[n].module_type == k for k in wanted)]

    def ref(self, name: str) -> MatrixRef:
        """The :class:`MatrixRef` of a canonical name (``ValueError`` listing valid names if unknown)."""
        if name not in self._refs:
            sample = ", ".join(list(self._refs)[: len(_LAYOUTS[self.family])])
            raise ValueError(
                f"Unknown matrix name {name!r} for this {self.family} model with {self.n_layers} layers. "
                f"Names look like: {sample}, ... (see ModelView.matrix_names())."
            )
        return self._refs[name]

    def module(self, name: str) -> nn.Module:
        """The source module (``nn.Linear`` or ``Conv1D``) that holds a canonical matrix, under any wrapper."""
        return unwrap(self.model.get_submodule(self.ref(name).module_path))

    def wrapper(self, name: str) -> nn.Module:
        """The module at the matrix's path: the source layer, or the adapter wrapping it."""
        return self.model.get_submodule(self.ref(name).module_path)

    def get(self, name: str) -> torch.Tensor:
        """The ``(out, in)`` float32 copy of a canonical matrix (the base weight, without adapters)."""
        return self.ref(name).to_canonical(self.module(name).weight)

    def matrices(self, kinds=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, (out, in) float32 matrix)`` for every (or some) block matrix."""
        for name in self.matrix_names(kinds):
            yield name, self.get(name)

    @torch.no_grad()
    def set(self, name: str, matrix: torch.Tensor) -> None:
        """Write an ``(out, in)`` matrix back into the model, in place (dtype and device of the source kept)."""
        ref = self.ref(name)
        weight = self.module(name).weight
        expected = self.get(name).shape
        if tuple(matrix.shape) != tuple(expected):
            raise ValueError(f"Matrix for {name!r} must have shape {tuple(expected)} (out, in). Got {tuple(matrix.shape)}.")
        value = matrix.detach().to(dtype=weight.dtype, device=weight.device)
        target = weight.T if ref.transposed else weight  # a view: writing into it writes the weight
        rows = ref.out_slice(target.shape[0])
        target[rows] = value

    def __repr__(self) -> str:
        return (
            f"ModelView(family={self.family!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"n_heads={self.n_heads}, d_head={self.d_head}, matrices={len(self._refs)})"
        )


# ---------------------------------------------------------------------------------------------------------------
# The final norm: used by direct logit attribution and by the ``ln_final`` activation hooks.
def final_norm(view: ModelView) -> nn.Module:
    """The final norm of a GPT-2 (``transformer.ln_f``) or Llama-family (``model.norm``) model."""
    return view.decoder_module("final_norm")


def norm_parameters(norm: nn.Module) -> tuple[bool, float, torch.Tensor | None, torch.Tensor | None]:
    """``(centred, eps, weight, bias)`` of a LayerNorm (centred) or an RMSNorm (Llama's ``variance_epsilon``)."""
    if isinstance(norm, nn.LayerNorm):
        return True, float(norm.eps), norm.weight, norm.bias
    if hasattr(norm, "variance_epsilon"):  # LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm: weight * x / rms(x)
        return False, float(norm.variance_epsilon), norm.weight, None
    if isinstance(norm, getattr(nn, "RMSNorm", ())):
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        return False, float(eps), norm.weight, None
    raise TypeError(
        "Only LayerNorm and RMSNorm final norms are supported (direct logit attribution, the ln_final hooks). "
        f"Got {type(norm).__name__}."
    )


def norm_scale(x: torch.Tensor, centred: bool, eps: float) -> torch.Tensor:
    """The scale a LayerNorm (``centred``) or RMSNorm divides ``x [..., d_model]`` by: ``[...]``, float32."""
    x = x.float()
    if centred:
        x = x - x.mean(-1, keepdim=True)
    return torch.sqrt(x.pow(2).mean(-1) + eps)
