"""Chain of LoRA: train a LoRA, merge it into the weights, start a fresh one, repeat.

Xia, Qin and Hazan 2024, "Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning"
(arXiv 2401.04151). With links ``j = 1 .. J`` of ``restart_every`` steps each::

    W_j = W_{j-1} + s B_j A_j        (B_j A_j trained for one link, then merged; A re-initialised, B = 0)

so the final update ``sum_j s B_j A_j`` can reach rank ``J * r`` at the memory cost of one rank-r adapter
(a Frank-Wolfe-like residual learning scheme in the paper). At each restart the optimiser state of the
adapter parameters is reset, as for a freshly initialised LoRA.

Every wrapped layer also keeps the factors of the links merged so far (frozen buffers, ``r * (in + out)`` numbers
per link, saved in checkpoints), so that the whole update is known exactly as one low-rank product::

    sum_j s B_j A_j = s [B_1 .. B_J] [A_1; ..; A_J]        rank <= J * r

which :func:`ftanalysis.export_peft` writes as one PEFT adapter of rank ``J * r`` (issue 23: it used to write the
live link only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .._validation import check_int
from .lora import LoRA, LoRALayer, write_dense


class ChainLoRALayer(LoRALayer):
    """A :class:`LoRALayer` that remembers the factors of the links already merged into its wrapped weight.

    For every part ``key``, the buffers ``chain_A_<key>`` ``(r * merged_links, in)`` and ``chain_B_<key>``
    ``(rows, r * merged_links)`` stack the merged links' A and B, so that the wrapped weight is
    ``W0 + scaling * chain_B @ chain_A`` (up to float rounding) and the layer's whole update is
    :meth:`update_factors`.
    """

    def __init__(self, base_layer: nn.Module, parts: dict[str, slice], r: int, scaling: float, dropout: float):
        super().__init__(base_layer, parts, r, scaling, dropout)
        device = base_layer.weight.device
        for key, s in self.parts.items():
            self.register_buffer(f"chain_A_{key}", torch.zeros(0, self.in_features, device=device))  # (0, in)
            self.register_buffer(f"chain_B_{key}", torch.zeros(s.stop - s.start, 0, device=device))  # (rows, 0)

    @property
    def merged_links(self) -> int:
        """How many links have been merged into the wrapped weight."""
        return getattr(self, f"chain_A_{self._order[0]}").shape[0] // self.r

    @torch.no_grad()
    def record_link(self) -> None:
        """Append the current A and B of every part to the merged links (call before merging them)."""
        for key in self.parts:
            A, B = getattr(self, f"chain_A_{key}"), getattr(self, f"chain_B_{key}")
            setattr(self, f"chain_A_{key}", torch.cat([A, self.lora_A[key].detach().float().to(A.device)], dim=0))
            setattr(self, f"chain_B_{key}", torch.cat([B, self.lora_B[key].detach().float().to(B.device)], dim=1))

    def update_factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r * links, in), B (rows, r * links))``: the merged links and the live one, stacked."""
        A = torch.cat([getattr(self, f"chain_A_{key}"), self.lora_A[key].detach().float()], dim=0)
        B = torch.cat([getattr(self, f"chain_B_{key}"), self.lora_B[key].detach().float()], dim=1)
        return A, B

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the chain buffers grow with every link: take the checkpoint's shapes before copying (resume)
        for key in self.parts:
            for name in (f"chain_A_{key}", f"chain_B_{key}"):
                value = state_dict.get(prefix + name)
                current = getattr(self, name)
                if value is not None and value.shape != current.shape:
                    setattr(self, name, current.new_zeros(value.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", merged_links={self.merged_links}"


@dataclass(repr=False)
class ChainLoRA(LoRA):
    """LoRA merged into the base weights and restarted every ``restart_every`` steps (COLA).

    Xia et al. 2024, "Chain of LoRA" (arXiv 2401.04151): ``W_j = W_{j-1} + s B_j A_j``; at the start of step
    ``restart_every * j`` (j >= 1) the current LoRA is merged into the wrapped weights, A is re-drawn with the
    configured ``init``, B is set to 0 and the optimiser forgets the adapter's moments.

    Parameters
    ----------
    restart_every : int, default=100
        Steps per link of the chain; ``steps / restart_every`` links in a run of ``steps`` (the paper uses a few
        links, 3 being typical).
    r, alpha, dropout, target, init, rslora, train_a
        As in :class:`ftanalysis.methods.LoRA`. With ``init="pissa"`` every new link starts from the principal
        singular vectors of the current weight.

    Notes
    -----
    The restarts are driven by :func:`ftanalysis.finetune` through :meth:`before_step`; call :meth:`restart`
    directly in a custom loop. A link's A is drawn from a generator seeded by ``(seed, link)``, so a run is
    reproducible and resumable from a checkpoint. The merged links' factors stay on each layer
    (:class:`ChainLoRALayer`), so :meth:`delta_weights` and :func:`ftanalysis.export_peft` cover the whole chain.

    Examples
    --------
    >>> import ftanalysis as fta
    >>> model, tok = fta.zoo.load("gpt2-tiny")
    >>> result = fta.finetune(model, tok, fta.tasks.make("copy"), fta.methods.ChainLoRA(r=4, restart_every=5),
    ...                       steps=10, progress=False)
    >>> result.method.links_
    2
    """

    restart_every: int = 100
    links_: int = field(default=1, init=False, repr=False, compare=False)

    name: ClassVar[str] = "chain_lora"
    paper: ClassVar[str] = "https://arxiv.org/abs/2401.04151"
    layer_cls: ClassVar[type[LoRALayer]] = ChainLoRALayer

    def __post_init__(self):
        super().__post_init__()
        check_int(self.restart_every, "restart_every", type(self).__name__, 1)

    def _apply(self, model: nn.Module) -> None:
        super()._apply(model)
        self.links_ = 1

    def before_step(self, state) -> None:
        """Restart the chain at steps ``restart_every, 2 * restart_every, ...``."""
        if state.step > 0 and state.step % self.restart_every == 0:
            self.restart(state.model, state.optimizer, seed=state.seed, link=state.step // self.restart_every)

    @torch.no_grad()
    def restart(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, seed: int = 0, link: int | None = None) -> None:
        """Merge the current LoRA into the wrapped weights, re-initialise A and B, reset their optimiser state.

        Parameters
        ----------
        model : the model this method was applied to (in place).
        optimizer : its optimiser, whose state (Adam moments, step count) for the adapter parameters is dropped.
        seed, link : seed the new A with ``(seed, link)``; ``link`` defaults to the number of links so far.
        """
        layers = self.lora_layers(model)
        if not layers:
            raise ValueError(f"{type(self).__name__}.restart: the model carries no LoRA layer (was apply called?).")
        plain = [path for path, layer in layers.items() if not isinstance(layer, ChainLoRALayer)]
        if plain:
            raise ValueError(
                f"{type(self).__name__}.restart: {plain[0]!r} is a plain LoRA layer, which cannot remember the links "
                "merged into its weight; apply ChainLoRA (not LoRA) to the model before restarting it."
            )
        link = self.links_ if link is None else link
        with torch.random.fork_rng():
            torch.manual_seed(int(seed) * 1_000_003 + int(link))
            for path, layer in layers.items():
                layer.record_link()  # the exact factors of the link, for export_peft and delta_weights
                write_dense(layer.base_layer, layer.merged_weight())
                self.initialise(layer, model, path)
        if optimizer is not None:
            for layer in layers.values():
                for p in layer.parameters():
                    optimizer.state.pop(p, None)
        self.links_ += 1

    def state_dict(self) -> dict:
        return {"links": self.links_}

    def load_state_dict(self, state: dict) -> None:
        self.links_ = int(state.get("links", self.links_))
