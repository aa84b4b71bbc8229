# %% [markdown]
# # Lab 02 · Intruder dimensions
#
# **Goal.** Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: An Illusion of Equivalence", arXiv
# 2410.21228) compare the singular vectors of a weight matrix before and after fine-tuning. A top singular
# vector of the fine-tuned matrix that resembles **no** singular vector of the pretrained one is an
# *intruder dimension*:
#
# $$u^{(1)}_j \text{ is an intruder} \iff \max_i |\cos(u^{(1)}_j, u^{(0)}_i)| < \varepsilon, \qquad j \le k$$
#
# with $W = U S V^\top$, $k = 10$ and $\varepsilon = 0.5$ by default. They report that LoRA introduces
# intruders where full fine-tuning mostly does not, and that scaling an intruder down reduces forgetting.
# You will write the probe, check it on planted matrices, then measure it on fine-tunes of the zoo's tiny
# GPT-2 and intervene on the intruders.
#
# **Time:** about 40 minutes. **Prerequisites:** the singular value decomposition.
# Every exercise is followed by a check cell: run it after you fill in the code marked `YOUR CODE HERE`.

# %%
import pandas as pd
import torch

import ftanalysis as fta
from ftanalysis.labs.checks import intruders as checks

S = fta.notebook.setup(seed=0)

# %% [markdown]
# ## Exercise 1 · Max cosine against the base
# *Difficulty ●●○ · about 10 minutes*
#
# Write `max_cosine(W0, W1, k)`: for each of the top-`k` left singular vectors of `W1` (by singular value), the
# largest |cosine| with **any** left singular vector of `W0`. Return a `[k]` tensor.
#
# <details><summary>Hint</summary><code>U, S, Vh = torch.linalg.svd(W, full_matrices=False)</code>; singular
# vectors are the columns <code>U[:, j]</code>, unit-norm, so cosines are dot products:
# <code>U1[:, :k].T @ U0</code>.</details>

# %%
def max_cosine(W0: torch.Tensor, W1: torch.Tensor, k: int) -> torch.Tensor:
    ### BEGIN SOLUTION
    U0, _, _ = torch.linalg.svd(W0, full_matrices=False)
    U1, _, _ = torch.linalg.svd(W1, full_matrices=False)
    return (U1[:, :k].T @ U0).abs().max(dim=1).values
    ### END SOLUTION


# %% tags=["check"]
checks.check_max_cosine(max_cosine)

# %% [markdown]
# ## Exercise 2 · Counting intruders
# *Difficulty ●○○ · about 5 minutes*
#
# Write `count_intruders(W0, W1, k, eps)`: the number of top-`k` vectors whose max |cosine| is below `eps`.

# %%
def count_intruders(W0: torch.Tensor, W1: torch.Tensor, k: int, eps: float) -> int:
    ### BEGIN SOLUTION
    return int((max_cosine(W0, W1, k) < eps).sum())
    ### END SOLUTION


# %% tags=["check"]
checks.check_count_intruders(count_intruders)

# %% [markdown]
# Try it on planted matrices: a random `W0` plus rank-one updates along random directions (intruders, if
# strong enough to enter the top k) or along singular vectors of `W0` (not intruders). Random directions in
# $\mathbb{R}^{64}$ have $|\cos| \approx 1/\sqrt{64}$ with each basis vector, far below 0.5.

# %%
rows = []
for n_random, n_aligned in [(0, 0), (0, 3), (1, 0), (3, 0), (2, 2)]:
    W0, W1 = checks.planted(64, 64, n_random, n_aligned, seed=0)
    rows.append({"random directions": n_random, "aligned directions": n_aligned, "intruders": count_intruders(W0, W1, 10, 0.5)})
planted_table = pd.DataFrame(rows)
planted_table

# %%
assert planted_table["intruders"].tolist() == planted_table["random directions"].tolist()

# %% [markdown]
# ## Exercise 3 · Scaling one direction
# *Difficulty ●●○ · about 10 minutes*
#
# The paper's intervention: with $W_1 = U S V^\top$, replace the $j$-th singular value by $\lambda s_j$:
# $W' = W_1 + (\lambda - 1)\, s_j u_j v_j^\top$. Write `scale_direction(W1, j, lam)` (0-based `j`).
# `lam = 0` removes the direction, `lam = 1` changes nothing.

# %%
def scale_direction(W1: torch.Tensor, j: int, lam: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    U, S, Vh = torch.linalg.svd(W1, full_matrices=False)
    return W1 + (lam - 1.0) * S[j] * torch.outer(U[:, j], Vh[j])
    ### END SOLUTION


# %% tags=["check"]
checks.check_scale_direction(scale_direction)

# %% [markdown]
# ## LoRA ranks vs full fine-tuning on the zoo base
#
# Fine-tune the tiny GPT-2 on *reverse* (a skill it never saw) with full fine-tuning and with LoRA at ranks 1
# and 8 (`alpha = 2r`, every attention and MLP matrix), then count intruders in every matrix with
# `fta.probes.spectral_report` (the library version of your function, with the same defaults). Forgetting is
# the rise of the loss on the held-out pretraining mix.

# %%
base, tok = fta.zoo.load("gpt2-tiny")
task = fta.tasks.make("reverse")
mix = fta.tasks.make("pretraining_mix")
steps, eval_n = S.pick(ci=300, full=1500), S.pick(ci=256, full=1024)
methods = {"full": (fta.methods.Full(), 1e-3), "LoRA r=8": (fta.methods.LoRA(r=8, alpha=16), 3e-3),
           "LoRA r=1": (fta.methods.LoRA(r=1, alpha=2), 3e-3)}
models = {name: fta.cached_finetune("gpt2-tiny", base, tok, task, method, steps=steps, lr=lr, batch_size=32, seed=0)[0]
          for name, (method, lr) in methods.items()}
mix_base = mix.evaluate(base, tok, n=eval_n)["loss"]
rows, reports = [], {}
for name, model in models.items():
    reports[name] = fta.probes.spectral_report(base, model, k=10, eps=0.5)
    rows.append({"method": name, "reverse accuracy": task.evaluate(model, tok, n=eval_n)["accuracy"],
                 "intruders (all matrices)": int(reports[name]["intruders"].sum()),
                 "pretraining-mix loss rise": mix.evaluate(model, tok, n=eval_n)["loss"] - mix_base})
table = pd.DataFrame(rows).set_index("method").round(3)
table
