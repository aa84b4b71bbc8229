# %% [markdown]
# # Lab 01 · LoRA from scratch
#
# **Goal.** Build a LoRA layer yourself, check it against `ftanalysis` (and PEFT), then use LoRA on a
# pretrained model and compare it with full fine-tuning.
#
# LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a pretrained weight `W0` (shape `(out, in)`) and learns a
# low-rank update next to it:
#
# $$h = W_0 x + \frac{\alpha}{r} B A x, \qquad A \in \mathbb{R}^{r \times in},\; B \in \mathbb{R}^{out \times r},\; B = 0 \text{ at init.}$$
#
# rsLoRA (Kalajdzievski 2023) replaces `alpha / r` by `alpha / sqrt(r)`.
#
# **Time:** about 40 minutes. **Prerequisites:** PyTorch modules and autograd.
# Every exercise is followed by a check cell: run it after you fill in the code marked `YOUR CODE HERE`.

# %%
import copy
import math

import torch
from torch import nn

import ftanalysis as fta
from ftanalysis.labs.checks import lora as checks

S = fta.notebook.setup(seed=0)

# %% [markdown]
# ## Exercise 1 · The scaling factor
# *Difficulty ●○○ · about 5 minutes*
#
# Write `lora_scaling(alpha, r, rslora=False)`: the number that multiplies `B @ A`.
#
# <details><summary>Hint</summary>Plain LoRA divides by the rank; rsLoRA divides by its square root.</details>

# %%
def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    ### BEGIN SOLUTION
    return alpha / math.sqrt(r) if rslora else alpha / r
    ### END SOLUTION


# %% tags=["check"]
checks.check_lora_scaling(lora_scaling)

# %% [markdown]
# ## Exercise 2 · A LoRA linear layer
# *Difficulty ●●○ · about 15 minutes*
#
# Write `LoRALinear(base, r, alpha, rslora=False)`, an `nn.Module` that wraps a frozen `nn.Linear`:
# - keep the layer as `self.base` and freeze its parameters;
# - create `self.lora_A` (shape `(r, in)`, small Gaussian values) and `self.lora_B` (shape `(out, r)`,
#   zeros) as `nn.Parameter`s, and `self.scaling` with your `lora_scaling`;
# - `forward(x)` returns `base(x) + scaling * x A^T B^T`.
#
# The check compares your layer with `fta.methods.LoRALayer` (and PEFT's LoRA layer when `peft` is installed)
# with a **non-zero B**: at `B = 0` every scaling looks right.
#
# <details><summary>Hint</summary><code>torch.nn.functional.linear(x, A)</code> computes <code>x A^T</code>.</details>

# %%
class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, rslora: bool = False):
        super().__init__()
        ### BEGIN SOLUTION
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / r)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = lora_scaling(alpha, r, rslora)
        ### END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ### BEGIN SOLUTION
        return self.base(x) + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)
        ### END SOLUTION


# %% tags=["check"]
checks.check_lora_linear(LoRALinear)

# %% [markdown]
# ## Exercise 3 · Merging
# *Difficulty ●○○ · about 5 minutes*
#
# After training, LoRA can be folded into the weight, so inference costs nothing extra. Write
# `merge_lora(module)` that returns a **new** `nn.Linear` with weight `W0 + scaling * B @ A` (and the same
# bias), leaving `module` unchanged.
#
# <details><summary>Hint</summary><code>copy.deepcopy(module.base)</code>, then add to its weight under
# <code>torch.no_grad()</code>.</details>

# %%
def merge_lora(module: nn.Module) -> nn.Linear:
    ### BEGIN SOLUTION
    merged = copy.deepcopy(module.base)
    with torch.no_grad():
        merged.weight.add_(module.scaling * module.lora_B @ module.lora_A)
    return merged
    ### END SOLUTION


# %% tags=["check"]
checks.check_lora_merge(merge_lora)

# %% [markdown]
# ## Exercise 4 · Counting what trains
# *Difficulty ●○○ · about 5 minutes*
#
# Write `count_trainable(model)`: the number of scalar parameters the optimiser will update.

# %%
def count_trainable(model: nn.Module) -> int:
    ### BEGIN SOLUTION
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
    ### END SOLUTION


# %% tags=["check"]
checks.check_count_trainable(count_trainable)
