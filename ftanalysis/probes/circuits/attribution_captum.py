"""Head- and layer-level attributions through Captum, for a model, a tokenizer and a prompt.

Sundararajan, Taly and Yan 2017, "Axiomatic Attribution for Deep Networks" (integrated gradients,
arXiv 1703.01365); Dhamdhere, Sundararajan and Yan 2018, "How Important Is a Neuron?" (conductance,
arXiv 1805.12233); Kokhlikyan et al. 2020, "Captum" (arXiv 2009.07896).

Rule (integrated gradients on a layer's input ``a``, baseline ``a'`` = the same layer on a baseline prompt):

    IG(a)_j = (a_j - a'_j) * integral_0^1 d F(a' + t (a - a')) / d a_j dt,     F = the target token's logit

summed over a head's ``d_head`` features (head level: the input of the output projection, ``hook_z``) or over
``d_model`` (layer level: the block's input ``hook_resid_pre``, read as the input of its first norm). ``"conductance"`` uses Captum's
``LayerConductance`` instead: integrated gradients of the *input embeddings* flowing through the layer.
The IG values of one layer sum (up to the integration error) to ``F`` on the prompt minus ``F`` with only
that layer's input taken from the baseline prompt; captum's ``delta`` compares them with the whole-model
difference ``F(prompt) - F(baseline)`` instead, so it measures how much of the effect bypasses the layer.

Captum needs a forward function that returns a tensor: we wrap the model so that it returns the last
position's logits, and attribute to the inputs of modules whose only positional input is a tensor: the output projection
(head level) and the block's first norm (layer level). Blocks themselves take ``None`` positionally and
used to return tuples, which captum rejects (captum issues #745, #1215).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import einops
import torch

from ..._validation import check_int, check_option
from .hooks import _view, hook_names
from .patching import eval_mode

METHODS = ("integrated_gradients", "conductance")
_FIRST_NORM = {"gpt2": "ln_1", "llama": "input_layernorm"}
LEVELS = ("head", "layer")


@dataclass
class CaptumAttribution:
    """Attributions of one prompt's target logit to heads (``[layer, head]``) or layers (``[layer, pos]``)."""

    scores: torch.Tensor  # head level: [layer, head] (summed over positions); layer level: [layer, pos]
    per_position: torch.Tensor  # head level: [layer, pos, head]; layer level: [layer, pos]
    tokens: list[str]
    target: str
    method: str
    level: str
    delta: torch.Tensor | None = field(default=None, repr=False)  # per-layer convergence delta (IG only)

    def plot(self, title: str | None = None):
        from .plots import captum_figure

        return captum_figure(self, title=title)


def _target_id(model, tok, ids: torch.Tensor, target) -> int:
    if target is None:
        with torch.no_grad():
            return int(model(input_ids=ids).logits[0, -1].argmax())
    if isinstance(target, str):
        tid = tok.convert_tokens_to_ids(target)
        if tid is None or tid == tok.unk_token_id:
            raise ValueError(f"The 'target' token {target!r} is not in the tokenizer's vocabulary.")
        return int(tid)
    check_int(target, "target", "captum_attributions", 0, model.get_input_embeddings().weight.shape[0] - 1)
    return int(target)


def captum_attributions(
    model: torch.nn.Module,
    tok,
    prompt: str,
    target: str | int | None = None,
    *,
    level: str = "head",
    method: str = "integrated_gradients",
    baseline: str | None = None,
    n_steps: int = 32,
) -> CaptumAttribution:
    """Attribute the target's last-position logit to every head (or every layer) with Captum.

    Parameters
    ----------
    model : nn.Module
        GPT-2 or Llama-family causal LM (not modified; gradients go to activations only).
    tok : tokenizer
        Its tokenizer.
    prompt : str
        The prompt; the target is the next token after it.
    target : str or int, optional
        Target token (string or id). Default: the model's own prediction.
    level : {"head", "layer"}, default="head"
        ``"head"``: input of each layer's output projection, split into heads -> ``[layer, head]``;
        ``"layer"``: input of each block (the residual stream, read at the block's first norm) -> ``[layer, pos]``.
    method : {"integrated_gradients", "conductance"}, default="integrated_gradients"
        Captum's ``LayerIntegratedGradients`` or ``LayerConductance``.
    baseline : str, optional
        A baseline prompt of the same number of tokens. Default: the prompt with every token after the first
        replaced by the padding token.
    n_steps : int, default=32
        Integration steps.

    Returns
    -------
    CaptumAttribution
        ``scores``, ``per_position``, the prompt's tokens and the target; ``.plot()`` draws them.

    Examples
    --------
    >>> import ftanalysis as fta
    >>> from ftanalysis.probes.circuits import captum_attributions
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> att = captum_attributions(model, tok, "the cup is in box A , the map is in box B . box A contains the")
    >>> tuple(att.scores.shape)  # [layer, head]
    (2, 4)
    """
    from captum.attr import LayerConductance, LayerIntegratedGradients

    owner = "captum_attributions"
    check_option(level, "level", owner, LEVELS)
    check_option(method, "method", owner, METHODS)
    check_int(n_steps, "n_steps", owner, 2)
    if not isinstance(prompt, str) or not prompt:
        raise TypeError(f"The 'prompt' parameter of {owner} must be a non-empty str. Got {prompt!r}.")
    view = _view(model)
    hook_names(view)  # raises for unsupported families
    device = next(model.parameters()).device
    ids = torch.tensor([tok(prompt)["input_ids"]], device=device)
    if baseline is None:
        base_ids = ids.clone()
        base_ids[:, 1:] = tok.pad_token_id if tok.pad_token_id is not None else 0
    else:
        base_ids = torch.tensor([tok(baseline)["input_ids"]], device=device)
        if base_ids.shape != ids.shape:
            raise ValueError(f"{owner}: the baseline has {base_ids.shape[1]} tokens but the prompt has {ids.shape[1]}; they must match.")
    tokens = tok.convert_ids_to_tokens(ids[0].tolist())

    with eval_mode(model):
        target_id = _target_id(model, tok, ids, target)
        embed = model.get_input_embeddings()

        def from_ids(input_ids):
            return model(input_ids=input_ids).logits[:, -1]  # [batch, vocab]: captum picks the target column

        def from_embeds(inputs_embeds):
            return model(inputs_embeds=inputs_embeds).logits[:, -1]

        per_layer, deltas = [], []
        for layer in range(view.n_layers):
            if level == "head":
                module = view.wrapper(f"layers.{layer}.attn.o")
            else:  # the first norm's only input is the residual stream (a block's positional inputs include None)
                module = view.block(layer).get_submodule(_FIRST_NORM[view.family])
            if method == "integrated_gradients":
                explainer = LayerIntegratedGradients(from_ids, module)
                attr, delta = explainer.attribute(ids, baselines=base_ids, target=target_id, n_steps=n_steps,
                                                  attribute_to_layer_input=True, return_convergence_delta=True)
                deltas.append(delta.detach().reshape(-1)[0])
            else:
                with torch.no_grad():
                    inputs, base_inputs = embed(ids), embed(base_ids)
                explainer = LayerConductance(from_embeds, module)
                attr = explainer.attribute(inputs, baselines=base_inputs, target=target_id, n_steps=n_steps, attribute_to_layer_input=True)
            attr = attr[0] if isinstance(attr, (tuple, list)) else attr  # [1, pos, d]
            attr = attr.detach()[0].float()
            if level == "head":
                attr = einops.reduce(attr, "p (h d) -> p h", "sum", h=view.n_heads)  # [pos, head]
            else:
                attr = attr.sum(-1)  # [pos]
            per_layer.append(attr)
    per_position = torch.stack(per_layer)  # [layer, pos, head] or [layer, pos]
    scores = per_position.sum(1) if level == "head" else per_position
    return CaptumAttribution(
        scores=scores,
        per_position=per_position,
        tokens=tokens,
        target=tok.convert_ids_to_tokens(target_id),
        method=method,
        level=level,
        delta=torch.stack(deltas) if deltas else None,
    )
