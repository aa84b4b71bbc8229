"""Direct logit attribution (DLA) per attention head: what each head writes straight into a logit difference.

Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits" (transformer-circuits.pub/2021/framework):
the final residual stream is a sum of the outputs of every component, so the logits, up to the final norm, are a
sum of per-component terms. Wang et al. 2022 (arXiv 2211.00593, Section 3.1) rank the heads of the IOI circuit
by it ("name movers" write the indirect object's name).

Rule, at one read-out position (default: the last), for head ``h`` of layer ``l``::

    out_{l,h} = W_O[:, h] @ z_{l,h}                            # the head's output, [d_model]
    dla(l, h) = (C out_{l,h} / s) * w_norm  .  (W_U[answer] - W_U[wrong])

- ``z_{l,h}`` is the head's mix of values (``layers.{l}.attn.hook_z``, ``[d_head]``) and ``W_O[:, h]`` the
  ``d_head`` columns of the output projection that read it (``o_proj`` in Llama, GPT-2's ``Conv1D`` ``c_proj``
  read in ``(out, in)`` orientation through :class:`~ftanalysis.nn.ModelView`);
- ``s`` is the final norm's scale on the run itself, *frozen*: ``sqrt(var(x) + eps)`` for LayerNorm,
  ``sqrt(mean(x^2) + eps)`` for RMSNorm, where ``x`` is the final residual stream at that position (what
  TransformerLens' ``cache.apply_ln_to_stack`` does);
- ``C`` centres a vector (subtracts its mean over ``d_model``) for LayerNorm and is the identity for RMSNorm;
- ``w_norm`` is the final norm's weight and ``W_U`` the unembedding (``lm_head``), ``[vocab, d_model]``.

With the scale frozen the map from components to logits is linear, so the embeddings, every head, the attention
output biases and every MLP output add up to the logit difference exactly, except two constants that belong to
no component: the final LayerNorm's bias projected onto ``W_U[answer] - W_U[wrong]``, and the unembedding's bias
difference (both absent in Llama). The tests check that sum on GPT-2 and Llama.

Examples
--------
>>> import torch, ftanalysis as fta
>>> from ftanalysis.probes.circuits import direct_logit_attribution
>>> model, tok = fta.zoo.load("gpt2-tiny")
>>> ids = torch.tensor([tok("the cup is in box A , the map is in box B . box A contains the")["input_ids"]])
>>> answer, wrong = tok.convert_tokens_to_ids(["cup"]), tok.convert_tokens_to_ids(["map"])
>>> tuple(direct_logit_attribution(model, ids, answer, wrong).shape)  # [layer, head]
(2, 4)
"""

from __future__ import annotations

import einops
import torch
from torch import nn

from ..._validation import check_int
from ...nn.view import final_norm, norm_parameters, norm_scale
from ._common import as_ids, model_device
from .hooks import _view, act_name, run_with_cache
from .metrics import _ids
from .patching import eval_mode


def _unembedding(model: nn.Module, owner: str) -> torch.Tensor:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if weight is None:
        raise ValueError(
            f"{owner} needs a causal LM with an unembedding (lm_head), such as GPT2LMHeadModel or LlamaForCausalLM. "
            f"Got a {type(model).__name__} without one."
        )
    return weight  # [vocab, d_model]


def _answer_ids(values, name: str, n: int, vocab: int, owner: str) -> torch.Tensor:
    ids = _ids(values, name)
    if ids.shape != (n,):
        raise ValueError(
            f"The {name!r} parameter of {owner} must hold one token id per prompt: shape ({n},). "
            f"Got {tuple(ids.shape)}."
        )
    if int(ids.max()) >= vocab:
        raise ValueError(
            f"The {name!r} parameter of {owner} holds the token id {int(ids.max())}, outside the unembedding's "
            f"{vocab} rows."
        )
    return ids


@torch.no_grad()
def direct_logit_attribution(
    model: nn.Module,
    input_ids: torch.Tensor,
    answer_ids,
    wrong_ids,
    position: int = -1,
) -> torch.Tensor:
    """Each attention head's direct contribution to ``logit(answer) - logit(wrong)``, averaged over the prompts.

    Elhage et al. 2021 (A Mathematical Framework for Transformer Circuits); per head as in Wang et al. 2022
    (arXiv 2211.00593). For head ``h`` of layer ``l`` and each prompt::

        dla(l, h) = (C (W_O[:, h] @ z_{l,h}) / s) * w_norm  .  (W_U[answer] - W_U[wrong])

    with ``z`` the head's output (``hook_z``) at ``position``, ``W_O[:, h]`` its columns of the output
    projection, ``s`` the final norm's scale on this run (frozen), ``C`` the centring of LayerNorm (identity
    for RMSNorm), ``w_norm`` the final norm's weight and ``W_U`` the unembedding. See the module docstring.

    Parameters
    ----------
    model : nn.Module
        A GPT-2 or Llama-family causal LM (``*ForCausalLM``, with its ``lm_head``), run as is.
    input_ids : LongTensor ``[batch, pos]``
        Prompts of one length (no padding: position ``position`` must be the read-out token of every row).
    answer_ids, wrong_ids : LongTensor or list of int, ``[batch]``
        One answer and one wrong token per prompt (IOI: the indirect object and the subject).
    position : int, default=-1
        The read-out position (negative counts from the end).

    Returns
    -------
    torch.Tensor
        ``[layer, head]`` float32 on the CPU: the mean over the prompts of each head's direct contribution.
        It sums, with the embeddings', MLPs' and attention biases' direct terms, to the mean logit difference
        minus the final norm's and the unembedding's bias terms.

    Notes
    -----
    The scale is the run's own (TransformerLens' ``apply_ln_to_stack``): DLA says how the logit difference of
    *this* run splits over components, not what removing a head would do (that changes the scale and every
    later layer; compare :func:`~ftanalysis.probes.circuits.activation_patching`). A grouped-query model's
    ``z`` already has one slice per query head, so nothing changes for GQA. An adapter wrapped around the
    output projection is refused (merge it first): the view reads the base weight only.

    Examples
    --------
    >>> import ftanalysis as fta
    >>> from ftanalysis.probes.circuits import direct_logit_attribution, ioi_batch
    >>> model, tok = fta.zoo.load("smollm2-135m")  # doctest: +SKIP
    >>> batch = ioi_batch(tok, 8)  # doctest: +SKIP
    >>> dla = direct_logit_attribution(model, batch.clean_ids, batch.io_ids, batch.s_ids)  # doctest: +SKIP
    >>> dla.shape  # doctest: +SKIP
    torch.Size([30, 9])
    """
    owner = "direct_logit_attribution"
    view = _view(model)
    device = model_device(model)
    ids = as_ids(input_ids, "input_ids", owner, device, model=model)
    n, seq = ids.shape
    check_int(position, "position", owner, -seq, seq - 1)
    position = position % seq
    w_u = _unembedding(model, owner)
    answer = _answer_ids(answer_ids, "answer_ids", n, w_u.shape[0], owner).to(w_u.device)
    wrong = _answer_ids(wrong_ids, "wrong_ids", n, w_u.shape[0], owner).to(w_u.device)
    for layer in range(view.n_layers):
        name = f"layers.{layer}.attn.o"
        if view.wrapper(name) is not view.module(name):
            raise ValueError(
                f"{owner}: the output projection of layer {layer} is wrapped by an adapter "
                f"({type(view.wrapper(name)).__name__}); "
                "merge it first (e.g. result.merged_model()), since the head's output goes through the merged weight."
            )
    centred, eps, weight, _ = norm_parameters(final_norm(view))

    last = view.n_layers - 1
    names = [act_name("z", layer) for layer in range(view.n_layers)] + [act_name("resid_post", last)]
    with eval_mode(model):
        _, cache = run_with_cache(model, ids, names_filter=names, positions=[position], view=view)

    x = cache["resid_post", last][:, 0].float()  # [batch, d_model]: the final norm's input
    scale = norm_scale(x, centred, eps)  # [batch]
    direction = (w_u[answer] - w_u[wrong]).float().to(x.device)  # [batch, d_model]
    if weight is not None:
        direction = direction * weight.float().to(x.device)
    direction = direction / scale[:, None]
    if centred:  # (v - mean v) . u == v . (u - mean u): centre the direction once instead of every output
        direction = direction - direction.mean(-1, keepdim=True)

    z = torch.stack(
        [cache["z", layer][:, 0] for layer in range(view.n_layers)], dim=1
    ).float()  # [batch, layer, head, d_head]
    w_o = torch.stack(
        [
            einops.rearrange(
                view.get(f"layers.{layer}.attn.o"), "d_model (head d_head) -> head d_head d_model", d_head=view.d_head
            )
            for layer in range(view.n_layers)
        ]
    ).to(x.device)  # [layer, head, d_head, d_model]
    # project the direction through W_O first: [batch, layer, head, d_head], then onto z
    read = einops.einsum(w_o, direction, "layer head d_head d_model, batch d_model -> batch layer head d_head")
    per_head = einops.einsum(z, read, "batch layer head d_head, batch layer head d_head -> batch layer head")
    return per_head.mean(0).cpu()
