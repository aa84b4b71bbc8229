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
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        return out


RECIPES: dict[str, Recipe] = {
    "gpt2-tiny": Recipe(
        name="gpt2-tiny",
        model=TinyConfig(arch="gpt2", n_layers=2, d_model=64, n_heads=4, d_mlp=256),
        description="2-layer GPT-2 (d_model 64, 4 heads): the zoo's default base.",
    ),
    "llama-tiny": Recipe(
        name="llama-tiny",
        model=TinyConfig(arch="llama", n_layers=2, d_model=64, n_heads=4, d_mlp=256),
        description="2-layer Llama (RoPE, RMSNorm, SwiGLU; d_model 64, 4 heads).",
    ),
}
