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
#
# **One fine-tune is one draw.** The seed fixes LoRA's initialisation and the order of the batches, and on a
# model this small it moves every number below: LoRA r = 8 ends with 12 to 25 intruders depending on the seed.
# The same happens when only the machine changes (another CPU rounds the matrix products differently, and the
# runs part ways). So we train each method at three seeds and read the mean.

# %%
base, tok = fta.zoo.load("gpt2-tiny")
task = fta.tasks.make("reverse")
mix = fta.tasks.make("pretraining_mix")
steps, eval_n = S.pick(ci=300, full=1500), S.pick(ci=256, full=1024)
SEEDS = (0, 1, 2)
methods = {"full": (fta.methods.Full(), 1e-3), "LoRA r=8": (fta.methods.LoRA(r=8, alpha=16), 3e-3),
           "LoRA r=1": (fta.methods.LoRA(r=1, alpha=2), 3e-3)}
models = {(name, seed): fta.cached_finetune("gpt2-tiny", base, tok, task, method, steps=steps, lr=lr, batch_size=32, seed=seed)[0]
          for seed in SEEDS for name, (method, lr) in methods.items()}
mix_base = mix.evaluate(base, tok, n=eval_n)["loss"]
rows, reports = [], {}
for (name, seed), model in models.items():
    reports[name, seed] = fta.probes.spectral_report(base, model, k=10, eps=0.5)
    rows.append({"method": name, "seed": seed, "reverse accuracy": task.evaluate(model, tok, n=eval_n)["accuracy"],
                 "intruders (all matrices)": int(reports[name, seed]["intruders"].sum()),
                 "pretraining-mix loss rise": mix.evaluate(model, tok, n=eval_n)["loss"] - mix_base})
runs = pd.DataFrame(rows)
runs.pivot(index="method", columns="seed", values=["reverse accuracy", "intruders (all matrices)", "pretraining-mix loss rise"]).round(3)

# %% [markdown]
# Your `count_intruders` on real matrices: it must agree with the library's report matrix by matrix (the report
# orients GPT-2's `Conv1D` weights as `(out, in)`, as `fta.nn.ModelView` does).

# %%
views = {key: fta.nn.ModelView(model) for key, model in models.items()}
base_view = fta.nn.ModelView(base)
mine = {key: [count_intruders(base_view.get(m), views[key].get(m), 10, 0.5) for m in reports[key]["name"]] for key in models}
assert all(mine[key] == reports[key]["intruders"].tolist() for key in models), mine
reports["LoRA r=8", 0].loc[reports["LoRA r=8", 0]["intruders"] > 0, ["name", "intruders", "dW_rel"]]

# %% [markdown]
# **The control.** Is any change of that size enough to create intruders? For each seed, add dense Gaussian
# noise to every matrix of the base, with the same Frobenius norm as that seed's LoRA r=8 update of the
# matrix, and count again.

# %%
noise_intruders = {}
for seed in SEEDS:
    noisy = fta.zoo.load("gpt2-tiny")[0]
    noisy_view, generator = fta.nn.ModelView(noisy), torch.Generator().manual_seed(seed)
    for name in base_view.matrix_names():
        W0 = base_view.get(name)
        noise = torch.randn(W0.shape, generator=generator)
        noisy_view.set(name, W0 + noise * (views["LoRA r=8", seed].get(name) - W0).norm() / noise.norm())
    noise_intruders[seed] = int(fta.probes.spectral_report(base, noisy)["intruders"].sum())
table = runs.groupby("method", sort=False).mean().drop(columns="seed")
table.loc["dense noise, LoRA r=8's norms", "intruders (all matrices)"] = sum(noise_intruders.values()) / len(SEEDS)
print(f"intruders per seed: dense noise of LoRA r=8's norms {list(noise_intruders.values())}")
table.round(3)  # means over the three seeds

# %% [markdown]
# **What to see.** Both full fine-tuning and LoRA r = 8 learn the new skill at every seed; LoRA r = 1 learns
# it only in part, and how far depends on the seed. On average LoRA r = 8 has several times more intruders than
# full fine-tuning, which has between 0 and a handful. Dense noise of LoRA r = 8's size is not harmless on
# a 64-wide model: it makes a few intruders too. So LoRA r = 8 holds a clear lead over noise of its size,
# but a smaller lead than over full fine-tuning. A low-rank update concentrates its change in a few new
# directions. But on this tiny model, **forgetting does not follow the intruders**: at every seed full
# fine-tuning forgets the pretraining mix more, with the fewest intruders. The paper's models already had
# the skill in latent form; this one has to learn it (notebook 02 shows the paper's picture on a real
# pretrained encoder).
#
# *How the checks were set.* This lab first checked one seed: LoRA r = 8 above 3 times the larger of full
# fine-tuning's and noise's counts. On a second machine that run gave 12 against 3 and 4 (3 × 4 = 12), and the
# check failed. Over three seeds, the checks below ask for 3 times full fine-tuning's mean and 2 times noise's
# mean. They were set after seeing the three-seed means (LoRA r = 8 17.0, full 2.0, noise 3.0).

# %%
per_seed = {name: runs[runs["method"] == name].set_index("seed") for name in methods}
noise_mean = table.loc["dense noise, LoRA r=8's norms", "intruders (all matrices)"]
assert pd.concat([per_seed["full"], per_seed["LoRA r=8"]])["reverse accuracy"].min() > 0.85  # every seed
assert per_seed["LoRA r=1"]["reverse accuracy"].min() > 0.3  # in part: the base scores 0
assert table.loc["LoRA r=8", "intruders (all matrices)"] > 3 * table.loc["full", "intruders (all matrices)"]
assert table.loc["LoRA r=8", "intruders (all matrices)"] > 2 * noise_mean
assert (per_seed["full"]["pretraining-mix loss rise"] > per_seed["LoRA r=8"]["pretraining-mix loss rise"]).all()

# %% [markdown]
# ## Intervening on the intruders
# The paper scales the intruders down (`lam < 1`) and sees forgetting fall while the new task holds.
# `fta.probes.scale_intruders` does it for every matrix with your Exercise 3 formula; its `control=True` scales
# as many randomly chosen *non*-intruder directions of the top k instead. We halve them in LoRA r = 8's
# fine-tune at each seed.

# %%
rows = []
for seed in SEEDS:
    lora = models["LoRA r=8", seed]
    for scaled_name, lam, control in (("none", 1.0, False), ("intruders, halved", 0.5, False),
                                      ("random non-intruders, halved", 0.5, True)):
        scaled = lora if lam == 1.0 else fta.probes.scale_intruders(base, lora, lam=lam, which="all", control=control, seed=seed)
        rows.append({"seed": seed, "scaled": scaled_name,
                     "reverse accuracy": task.evaluate(scaled, tok, n=eval_n)["accuracy"],
                     "pretraining-mix loss rise": mix.evaluate(scaled, tok, n=eval_n)["loss"] - mix_base})
scaling = pd.DataFrame(rows)
scaling.pivot(index="scaled", columns="seed", values=["reverse accuracy", "pretraining-mix loss rise"]).round(3)

# %% [markdown]
# **What to see.** Halving the intruders takes most of the new skill away, and forgetting barely falls. But
# halving as many random non-intruders does much the same. Which of the two costs more changes from seed to
# seed, so on this model the intruders are not special. Here the top directions of the update *are* the new
# skill, intruders or not. The paper's intervention works when the fine-tune elicits what the model nearly
# knew, not when it teaches it something new.
#
# *How the checks were set.* On one seed, this lab once found that halving the intruders cost at least 0.1
# more accuracy than the control. On three seeds, on a second machine, the difference changes sign. The
# checks below keep what holds on the mean: both interventions cost at least 40% of the accuracy, and at least
# half of the forgetting remains.

# %%
mean = scaling.groupby("scaled").mean()
for scaled_name in ("intruders, halved", "random non-intruders, halved"):
    assert mean.loc[scaled_name, "reverse accuracy"] < 0.6 * mean.loc["none", "reverse accuracy"], mean
    assert mean.loc[scaled_name, "pretraining-mix loss rise"] > 0.5 * mean.loc["none", "pretraining-mix loss rise"], mean
