"""Chain of LoRA: train a LoRA, merge it into the weights, start a fresh one, repeat.

Xia, Qin and Hazan 2024, "Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning"
(arXiv 2401.04151). With links ``j = 1 .. J`` of ``restart_every`` steps each::

    W_j = W_{j-1} + s B_j A_j        (B_j A_j trained for one link, then merged; A re-initialised, B = 0)

so the final update ``sum_j s B_j A_j`` can reach rank ``J * r`` at the memory cost of one rank-r adapter
(a Frank-Wolfe-like residual learning scheme in the paper). At each restart the optimiser state of the
adapter parameters is reset, as for a freshly initialised LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .._validation import check_int
from .lora import LoRA, write_dense


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
    reproducible and resumable from a checkpoint.

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
        link = self.links_ if link is None else link
        with torch.random.fork_rng():
            torch.manual_seed(int(seed) * 1_000_003 + int(link))
            for path, layer in layers.items():
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
