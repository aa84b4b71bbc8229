"""Pretraining recipes of the shipped zoo bases: architecture, data mixture and optimiser settings.

A recipe is everything ``ftanalysis zoo pretrain <name>`` needs to rebuild a shipped base from scratch. The
seed that was shipped (and the step at which entity tracking emerged for it) is in each model's card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .architectures import TinyConfig


@dataclass(frozen=True)
class Recipe:
    """Pretraining settings (AdamW, linear warm-up then cosine decay to ``final_lr_fraction``)."""

    name: str
    model: TinyConfig
    description: str
    steps: int = 8000
    batch_size: int = 256
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1
    eval_every: int = 250
    # stop early once entity tracking has emerged: when 3-box validation accuracy first reaches
    # `stop_at_et3`, train `steps_after_emergence` more steps, then stop (None: always run `steps`)
    stop_at_et3: float | None = 0.95
    steps_after_emergence: int = 1000
    mixture: str = "pretraining_mix"
    # weight of a language-modelling loss on every prompt token, added to the loss on the answer tokens:
    # the dense signal (predict the next word of every sentence) is what pretraining normally is
    lm_loss_weight: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        return out


RECIPES: dict[str, Recipe] = {
    # With the loss on answer tokens only, d_model 64 sat on the chance plateau of entity tracking for 6,000
    # steps in 3 of 3 seeds on CPU (d_model 128: 2,750 steps, still at chance). A language-modelling loss on
    # every prompt token (lm_loss_weight 1) left the plateau by step 3,000 (3-box 0.58 at 3,000, 0.72 at 4,250).
    "gpt2-tiny": Recipe(
        name="gpt2-tiny",
        model=TinyConfig(arch="gpt2", n_layers=2, d_model=64, n_heads=4, d_mlp=256),
        description="2-layer GPT-2 (d_model 64, 4 heads of 16): the zoo's default base.",
        lm_loss_weight=1.0,
    ),
    "llama-tiny": Recipe(
        name="llama-tiny",
        model=TinyConfig(arch="llama", n_layers=2, d_model=64, n_heads=4, d_mlp=256),
        description="2-layer Llama (RoPE, RMSNorm, SwiGLU; d_model 64, 4 heads).",
        # the shipped llama-tiny was trained without the LM loss and did not learn entity tracking in 8,000
        # steps; a run with lm_loss_weight=1 (~1.2 s/step on a shared CPU) was at 3-box 0.36 at step 2,500
        lm_loss_weight=0.0,
    ),
}
