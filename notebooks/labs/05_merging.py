# %% [markdown]
# # Lab 05 · Merging fine-tuned models
#
# **Goal.** Fine-tuning moves a pretrained model by a *task vector* $\tau = \theta_\text{ft} - \theta_\text{pre}$
# (Ilharco et al. 2023, arXiv 2212.04089). Adding several task vectors to the base gives one model with
# several skills, if they do not interfere. You will write the two best-known fixes for interference, check
# them against `fta.merging` on seeded vectors with built-in sign conflicts, then merge two skills of the
# zoo's tiny GPT-2 and measure what each merge keeps.
#
# - **TIES** (Yadav et al. 2023, arXiv 2306.01708): *trim* each $\tau_t$ to its top-$k$ entries by magnitude,
#   *elect* a sign per entry, $\gamma = \operatorname{sign}(\sum_t \hat\tau_t)$, then take the *disjoint mean*
#   over the tasks that agree with $\gamma$: $\tau_m^p = \frac{1}{|A_p|}\sum_{t \in A_p} \hat\tau_t^p$, and
#   $\theta = \theta_\text{pre} + \lambda\, \tau_m$.
# - **DARE** (Yu et al. 2023, arXiv 2311.03099): drop each entry with probability $p$ and rescale the
#   survivors by $1/(1-p)$, so that $\mathbb{E}[\tilde\tau] = \tau$.
#
# **Time:** about 45 minutes. **Prerequisites:** tensor indexing and broadcasting.
# Every exercise is followed by a check cell: run it after you fill in the code marked `YOUR CODE HERE`.
# All exercises work on flat task vectors: one tensor `[entries]`, or `[tasks, entries]` stacked.

# %%
import pandas as pd
import torch

import ftanalysis as fta
from ftanalysis.labs.checks import merging as checks
from ftanalysis.merging import TIES, TaskVector, sign_conflicts

S = fta.notebook.setup(seed=0)

# %% [markdown]
# ## Exercise 1 · Trim
# *Difficulty ●○○ · about 5 minutes*
#
# Write `trim_topk(tau, k)`: keep the `int(k * n)` entries of `tau` (1-D, `n` entries) with the largest
# **magnitude** and set the others to zero. `k` is a fraction (TIES uses `k = 0.2`).
#
# <details><summary>Hint</summary><code>tau.abs().topk(n_keep).indices</code> gives the positions to keep.</details>

# %%
def trim_topk(tau: torch.Tensor, k: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    n_keep = int(k * tau.numel())
    mask = torch.zeros_like(tau, dtype=torch.bool)
    mask[tau.abs().topk(n_keep).indices] = True
    return tau * mask
    ### END SOLUTION


# %% tags=["check"]
checks.check_trim(trim_topk)

# %% [markdown]
# ## Exercise 2 · Elect a sign
# *Difficulty ●○○ · about 5 minutes*
#
# Write `elect_sign(stacked)`: for task vectors stacked `[tasks, n]`, the `[n]` tensor of `+1`/`-1`, the sign
# of the **total mass** `sum_t tau_t` per entry. (Not a vote: one task pushing hard outweighs two pushing
# gently. The check's vectors are built so that the two differ.)

# %%
def elect_sign(stacked: torch.Tensor) -> torch.Tensor:
    ### BEGIN SOLUTION
    return torch.sign(stacked.sum(dim=0))
    ### END SOLUTION


# %% tags=["check"]
checks.check_elect_sign(elect_sign)

# %% [markdown]
# ## Exercise 3 · Disjoint mean
# *Difficulty ●●○ · about 10 minutes*
#
# Write `disjoint_mean(stacked, sign)`: per entry, the mean of the values that are **nonzero** and have the
# elected sign; 0 where no task agrees. Trimmed (zero) entries do not count.
#
# <details><summary>Hint</summary>A boolean <code>agree</code> of shape <code>[tasks, n]</code>; then
# <code>(stacked * agree).sum(0) / agree.sum(0).clamp_min(1)</code>.</details>

# %%
def disjoint_mean(stacked: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    ### BEGIN SOLUTION
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(1)
    ### END SOLUTION


# %% tags=["check"]
checks.check_disjoint_mean(disjoint_mean)

# %% [markdown]
# ## Exercise 4 · TIES
# *Difficulty ●○○ · about 5 minutes*
#
# Put the three steps together: `ties_merge(taus, k, lam)` for `taus` of shape `[tasks, n]` returns
# `lam * disjoint_mean(trimmed, elect_sign(trimmed))`, each task trimmed on its own.

# %%
def ties_merge(taus: torch.Tensor, k: float, lam: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    trimmed = torch.stack([trim_topk(tau, k) for tau in taus])
    return lam * disjoint_mean(trimmed, elect_sign(trimmed))
    ### END SOLUTION


# %% tags=["check"]
checks.check_ties_merge(ties_merge)

# %% [markdown]
# ## Exercise 5 · DARE
# *Difficulty ●○○ · about 5 minutes*
#
# Write `dare(tau, p, generator)`: draw `u = torch.rand(tau.shape, generator=generator)`, keep the entries
# with `u >= p` (so each is dropped with probability `p`) and divide the kept ones by `1 - p`. The check
# compares with `fta.merging.drop_and_rescale` for the same seed, then averages 1000 draws of yours: the mean
# must come back to `tau`.

# %%
def dare(tau: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    ### BEGIN SOLUTION
    keep = torch.rand(tau.shape, generator=generator) >= p
    return tau * keep / (1 - p)
    ### END SOLUTION


# %% tags=["check"]
checks.check_dare(dare)

# %% [markdown]
# ## Two skills, one model
#
# The zoo's tiny GPT-2 was never trained to *reverse* a list or to *subtract* modulo 23 (its card says so).
# Fine-tune one copy on each (full fine-tuning; `fta.cached_finetune` so other notebooks reuse the runs),
# then build each copy's task vector with `fta.merging.TaskVector`, flatten it, and merge with your functions.

# %%
base, tok = fta.zoo.load("gpt2-tiny")
tasks = {"reverse": fta.tasks.make("reverse"), "subtraction": fta.tasks.make("modular_arithmetic", op="-", modulus=23)}
steps = S.pick(ci=300, full=1500)
finetuned = {name: fta.cached_finetune("gpt2-tiny", base, tok, task, fta.methods.Full(), steps=steps, lr=1e-3, batch_size=32, seed=0)[0]
             for name, task in tasks.items()}
vectors = [TaskVector.from_models(base, finetuned[name]) for name in tasks]
taus = torch.stack([v.flatten() for v in vectors])  # [tasks, entries]
print(f"task vectors: {tuple(taus.shape)}; sign conflicts among entries both change: {sign_conflicts(vectors):.2f}")
eval_n = S.pick(ci=256, full=1024)


def evaluate(model) -> dict:
    row = {name: task.evaluate(model, tok, n=eval_n)["accuracy"] for name, task in tasks.items()}
    row["pretraining mix"] = fta.tasks.make("pretraining_mix").evaluate(model, tok, n=eval_n)["accuracy"]
    return row


def from_flat(flat: torch.Tensor):
    return vectors[0].unflatten(flat).apply_to(base)


# %% [markdown]
# Task arithmetic adds the vectors, $\lambda \sum_t \tau_t$; TIES and DARE (followed by the same sum) are
# your functions. $\lambda$ is usually tuned on validation data; here every merge uses $\lambda = 1$, the
# value at which each single task vector gives its own fine-tuned model.

# %%
generator = torch.Generator().manual_seed(0)
merges = {
    "base": base,
    "fine-tuned on reverse": finetuned["reverse"],
    "fine-tuned on subtraction": finetuned["subtraction"],
    "task arithmetic": from_flat(taus.sum(0)),
    "TIES (k=0.2)": from_flat(ties_merge(taus, 0.2, 1.0)),
    "DARE (p=0.5) + sum": from_flat(sum(dare(tau, 0.5, generator) for tau in taus)),
}
table = pd.DataFrame({name: evaluate(model) for name, model in merges.items()}).T.round(3)
ax = table.plot.barh(figsize=(7, 4), xlim=(0, 1), title="accuracy after merging two skills")
table

# %% [markdown]
# Check that your TIES merge and the library's `TIES` give the same model, then read the table: every merge
# is compared with the two fine-tunes (what each skill reaches alone) and with the base (what merging must
# beat).

# %%
library = TIES(k=0.2, lam=1.0).merge(base, [finetuned["reverse"], finetuned["subtraction"]])
ids = torch.tensor([tok(tasks["subtraction"].examples(1)[0].prompt)["input_ids"]])
with torch.no_grad():
    assert torch.allclose(library(ids).logits, merges["TIES (k=0.2)"](ids).logits, atol=1e-5)
for name in tasks:
    assert table.loc[f"fine-tuned on {name}", name] > table.loc["base", name] + 0.3, f"the fine-tune did not learn {name}"

# %% [markdown]
# **What to see.** On this tiny model the two skills **interfere badly**: no merge keeps even half of either
# fine-tune's accuracy, and reversal, the skill furthest from anything the base knew, is lost almost
# entirely. Subtraction survives in part: the best merge stays above the base (by 0.1 to 0.2 in our runs; the
# exact numbers move with the fine-tunes, which differ slightly between machines and thread counts). About
# half of the entries that both fine-tunes change disagree in sign (0.5 is what independent random signs give), and full fine-tuning moved every
# weight of a small network, which is the setting where merging is known to break. Notebook 06 shows merges
# that work, on fine-tunes of a real pretrained encoder. Try it: does a smaller $\lambda$ (say 0.5) help the
# task-arithmetic merge here?

# %%
merged = ["task arithmetic", "TIES (k=0.2)", "DARE (p=0.5) + sum"]
kept = pd.DataFrame({name: {task: table.loc[name, task] / table.loc[f"fine-tuned on {task}", task] for task in tasks}
                     for name in merged}).T
print(kept.round(2))
assert (kept.max(axis=1) < 0.5).all(), "a merge kept half of a skill: update the text above"
assert table.loc[merged, "subtraction"].max() > table.loc["base", "subtraction"] + 0.05
