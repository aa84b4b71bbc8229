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

# %% [markdown]
# Each *pure* case counts exactly its random directions. The mixed case (two random and two aligned spikes of
# similar strength) counts fewer: singular vectors of `W1` belonging to close singular values mix the spike
# directions, and a mix of a random direction with a base singular vector has |cos| above 0.5 with it. The
# count measures directions of `W1`, not the updates that made them.

# %%
pure = planted_table[(planted_table["random directions"] == 0) | (planted_table["aligned directions"] == 0)]
assert pure["intruders"].tolist() == pure["random directions"].tolist()
assert (planted_table["intruders"] <= planted_table["random directions"]).all()

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

# %% [markdown]
# Your `count_intruders` on real matrices: it must agree with the library's report matrix by matrix (the report
# orients GPT-2's `Conv1D` weights as `(out, in)`, as `fta.nn.ModelView` does).

# %%
views = {"base": fta.nn.ModelView(base), **{name: fta.nn.ModelView(model) for name, model in models.items()}}
mine = {name: [count_intruders(views["base"].get(m), views[name].get(m), 10, 0.5) for m in reports[name]["name"]]
        for name in models}
assert all(mine[name] == reports[name]["intruders"].tolist() for name in models), mine
reports["LoRA r=8"].loc[reports["LoRA r=8"]["intruders"] > 0, ["name", "intruders", "dW_rel"]]

# %% [markdown]
# **The control.** Is any change of that size enough to create intruders? Add dense Gaussian noise to every
# matrix of the base, with the same Frobenius norm as LoRA r=8's update of that matrix, and count again.

# %%
noisy = fta.zoo.load("gpt2-tiny")[0]
noisy_view, generator = fta.nn.ModelView(noisy), torch.Generator().manual_seed(0)
for name in views["base"].matrix_names():
    W0 = views["base"].get(name)
    noise = torch.randn(W0.shape, generator=generator)
    noisy_view.set(name, W0 + noise * (views["LoRA r=8"].get(name) - W0).norm() / noise.norm())
n_noise = int(fta.probes.spectral_report(base, noisy)["intruders"].sum())
print(f"intruders: full {table.loc['full', 'intruders (all matrices)']}, LoRA r=8 {table.loc['LoRA r=8', 'intruders (all matrices)']}, "
      f"dense noise of LoRA r=8's norms {n_noise}")

# %% [markdown]
# **What to see.** Both fine-tunes learn the new skill, and LoRA r=8 has several times more intruders than full
# fine-tuning and than dense noise of the same size: a low-rank update concentrates its change in a few new
# directions. But on this tiny model, **forgetting does not follow the intruders**: full fine-tuning forgets the
# pretraining mix the most with the fewest. The paper's models already had the skill in latent form; this one
# has to learn it (notebook 02 shows the paper's picture on a real pretrained encoder).

# %%
assert table["reverse accuracy"].min() > 0.85
assert table.loc["LoRA r=8", "intruders (all matrices)"] > 3 * max(table.loc["full", "intruders (all matrices)"], n_noise)
assert table.loc["full", "pretraining-mix loss rise"] > table.loc["LoRA r=8", "pretraining-mix loss rise"]

# %% [markdown]
# ## Intervening on the intruders
# The paper scales the intruders down (`lam < 1`) and sees forgetting fall while the new task holds.
# `fta.probes.scale_intruders` does it for every matrix with your Exercise 3 formula; its `control=True` scales
# as many randomly chosen *non*-intruder directions of the top k instead.

# %%
lora = models["LoRA r=8"]
rows = []
for lam in (1.0, 0.5):
    for control in (False, True):
        if lam == 1.0 and control:
            continue
        scaled = fta.probes.scale_intruders(base, lora, lam=lam, which="all", control=control, seed=0)
        rows.append({"lam": lam, "scaled": "random non-intruders" if control else "intruders",
                     "reverse accuracy": task.evaluate(scaled, tok, n=eval_n)["accuracy"],
                     "pretraining-mix loss rise": mix.evaluate(scaled, tok, n=eval_n)["loss"] - mix_base})
scaling = pd.DataFrame(rows).round(3)
scaling

# %% [markdown]
# **What to see.** Halving the intruders takes most of the new skill away, far more than halving random
# directions of the same count, and forgetting does not fall. Here the intruders *are* the new skill: the
# paper's intervention works when the fine-tune elicits what the model nearly knew, not when it teaches it
# something new.

# %%
halved, halved_control = scaling.iloc[1], scaling.iloc[2]
assert halved["reverse accuracy"] < 0.5 * table.loc["LoRA r=8", "reverse accuracy"]
assert halved["reverse accuracy"] < halved_control["reverse accuracy"] - 0.1
assert halved["pretraining-mix loss rise"] > table.loc["LoRA r=8", "pretraining-mix loss rise"] - 0.5
