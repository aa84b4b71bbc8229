# %% [markdown]
# # Lab 04 · Skill localization
#
# **Goal.** Fine-tuning moves every weight of a network. Does the new skill need all of those changes? Panigrahi,
# Saunshi, Zhao and Arora ("Task-Specific Skill Localization in Fine-tuned Language Models", ICML 2023, arXiv
# 2302.06600) *graft* a few fine-tuned weights back onto the pretrained model. With the task vector
# $\tau = \theta_{ft} - \theta_{pre}$ and a binary mask $\gamma$:
#
# $$\theta_{graft} = \theta_{pre} + \gamma \odot \tau, \qquad \text{recovery} = \frac{acc(\theta_{graft}) - acc(\theta_{pre})}{acc(\theta_{ft}) - acc(\theta_{pre})}.$$
#
# On RoBERTa they find masks over about 0.01% of the parameters that recover most of the fine-tuned accuracy.
# The mask starts as the top-$k$ entries of $|\tau|$ and is then *learned* through a real-valued relaxation
# $\gamma(S) = \gamma_{base} + (1 - 2\gamma_{base})\, \sigma(S - b)$, with a few gradient steps on $S$.
# You will write the top-k mask, the graft, the recovery and the relaxation, check each, then graft a
# fine-tune of the zoo's tiny GPT-2 and compare your masks with a random mask of the same size (the control)
# and with the library's learned mask.
#
# **Time:** about 45 minutes. **Prerequisites:** PyTorch tensors (`topk`, `cat`, `split`) and autograd.
# Every exercise is followed by a check cell: run it after you fill in the code marked `YOUR CODE HERE`.

# %%
import copy

import pandas as pd
import torch

import ftanalysis as fta
from ftanalysis.labs.checks import localization as checks

S = fta.notebook.setup(seed=0)

# %% [markdown]
# ## Exercise 1 · The top-k mask
# *Difficulty ●●○ · about 10 minutes*
#
# Parameters and masks are dicts, parameter name -> tensor. Write `top_k_mask(deltas, sparsity)`: given the
# changes `deltas[name] = theta_ft - theta_pre`, return a dict of **bool** tensors (same names and shapes) that
# keeps the `k = max(1, round(sparsity * N))` entries with the largest `|delta|`, where `N` counts the entries of
# **all** tensors: one global ranking, not one per tensor. `sparsity` is the fraction of entries *kept*.
#
# <details><summary>Hint</summary>Flatten and concatenate: <code>flat = torch.cat([d.abs().reshape(-1) for d in
# deltas.values()])</code>; mark <code>torch.topk(flat, k).indices</code> in a bool vector, then cut it back with
# <code>torch.split(keep, sizes)</code> and <code>reshape</code> each piece.</details>

# %%
def top_k_mask(deltas: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    ### BEGIN SOLUTION
    names = list(deltas)
    flat = torch.cat([deltas[n].abs().reshape(-1) for n in names])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, max(1, round(sparsity * flat.numel()))).indices] = True
    pieces = torch.split(keep, [deltas[n].numel() for n in names])
    return {n: piece.reshape(deltas[n].shape) for n, piece in zip(names, pieces)}
    ### END SOLUTION


# %% tags=["check"]
checks.check_top_k_mask(top_k_mask)

# %% [markdown]
# ## Exercise 2 · Grafting
# *Difficulty ●○○ · about 5 minutes*
#
# Write `graft(base, ft, mask)`: for every name in `mask`, `base + mask * (ft - base)`. Selected entries take
# their fine-tuned value, the others keep their pretrained value. Return new tensors: do not modify `base`.
#
# <details><summary>Hint</summary><code>torch.where(mask[n], ft[n], base[n])</code> does it in one call.</details>

# %%
def graft(base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ### BEGIN SOLUTION
    return {n: base[n] + mask[n].to(base[n].dtype) * (ft[n] - base[n]) for n in mask}
    ### END SOLUTION


# %% tags=["check"]
checks.check_graft(graft)

# %% [markdown]
# ## Exercise 3 · How much of the gain comes back
# *Difficulty ●○○ · about 5 minutes*
#
# Write `recovery(acc_graft, acc_base, acc_ft)`: the recovered fraction of the fine-tuning gain,
# `(acc_graft - acc_base) / (acc_ft - acc_base)`. It is 0 for the pretrained model and 1 for the fine-tuned one;
# return `float("nan")` when fine-tuning gained nothing (`acc_ft == acc_base`).
#
# <details><summary>Hint</summary>Accuracy alone misleads: a graft at 0.5 is a full recovery if fine-tuning went
# from 0.0 to 0.5, and none if the pretrained model was at 0.5 already.</details>

# %%
def recovery(acc_graft: float, acc_base: float, acc_ft: float) -> float:
    ### BEGIN SOLUTION
    if acc_ft == acc_base:
        return float("nan")
    return (acc_graft - acc_base) / (acc_ft - acc_base)
    ### END SOLUTION


# %% tags=["check"]
checks.check_recovery(recovery)

# %% [markdown]
# ## Exercise 4 · The relaxed mask
# *Difficulty ●●○ · about 10 minutes*
#
# A binary mask has no gradient. The paper learns a real-valued score `S` per entry and uses
#
# $$\gamma(S) = \gamma_{base} + (1 - 2\gamma_{base})\,\sigma(S - b)$$
#
# with $\gamma_{base}$ the top-k mask (as 0/1) and $b = 10$: inside the initial mask $\gamma = 1 - \sigma(S - b)$,
# outside it $\gamma = \sigma(S - b)$, and with $S \sim U[0, 1)$ the relaxed mask starts next to the binary one.
# Write `relaxed_mask(S, base_mask, bias=10.0)` (`base_mask` is a bool tensor of `S`'s shape). The result must
# stay differentiable in `S`.
#
# <details><summary>Hint</summary>Turn the mask into numbers with <code>base_mask.to(S.dtype)</code>, then it is
# one line with <code>torch.sigmoid</code>.</details>

# %%
def relaxed_mask(S: torch.Tensor, base_mask: torch.Tensor, bias: float = 10.0) -> torch.Tensor:
    ### BEGIN SOLUTION
    gamma_base = base_mask.to(S.dtype)
    return gamma_base + (1 - 2 * gamma_base) * torch.sigmoid(S - bias)
    ### END SOLUTION


# %% tags=["check"]
checks.check_relaxed_mask(relaxed_mask)

# %% [markdown]
# ## Grafting a fine-tune of the zoo's GPT-2
#
# The zoo's `gpt2-tiny` (0.1 M parameters) was pretrained on copying, counting, addition, facts and entity
# tracking, but never saw *reverse* (reverse a list of letters): its accuracy there is 0. It is fully fine-tuned
# on it with frozen embeddings, as in the paper's protocol, so every change is in the graftable parameters:
# every parameter of the transformer blocks and the final LayerNorm (the output head is tied to the frozen
# embeddings). This is the fine-tune of notebook 03; `fta.cached_finetune` trains it once and shares it.

# %%
base, tok = fta.zoo.load("gpt2-tiny")
reverse = fta.tasks.make("reverse")
ft, _ = fta.cached_finetune("gpt2-tiny", base, tok, reverse, fta.methods.Full(freeze_embeddings=True),
                            steps=S.pick(ci=400, full=2000), lr=1e-3, batch_size=64, seed=0)
EVAL_N = S.pick(ci=512, full=2048)  # test examples per accuracy

base_params = {n: p.detach() for n, p in base.named_parameters()}
ft_params = {n: p.detach() for n, p in ft.named_parameters()}
names = [n for n in ft_params if ".wte." not in n and ".wpe." not in n]  # blocks and final LayerNorm
assert set(names) == set(fta.probes.top_delta_mask(base, ft, 0.01))  # the library's maskable parameters
assert all(torch.equal(ft_params[n], base_params[n]) for n in ft_params if n not in names)  # embeddings frozen
deltas = {n: ft_params[n] - base_params[n] for n in names}
N = sum(d.numel() for d in deltas.values())


def grafted_model(mask):
    """A copy of the pretrained model with your graft of `mask` loaded into it."""
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, value in graft({n: base_params[n] for n in names}, {n: ft_params[n] for n in names}, mask).items():
            params[n].copy_(value)
    return model


def accuracy(model):
    return reverse.evaluate(model, tok, n=EVAL_N)["accuracy"]


acc_base, acc_ft = accuracy(base), accuracy(ft)
print(f"{N:,} graftable entries in {len(names)} tensors; reverse accuracy: pretrained {acc_base:.3f}, fine-tuned {acc_ft:.3f}")

# %% [markdown]
# **Your top-k graft against the control.** At each sparsity, graft your top-|delta| mask and a uniformly random
# mask of the same size (`fta.probes.random_mask`). If the size of the changes marks where the skill is, top-k
# must beat random. Your mask must also be exactly the library's (`fta.probes.top_delta_mask`).

# %%
MY_SPARSITIES = S.pick(ci=[0.05, 0.2, 0.5], full=[0.01, 0.05, 0.1, 0.2, 0.3, 0.5])
rows = []
for sparsity in MY_SPARSITIES:
    mine = top_k_mask(deltas, sparsity)
    library = fta.probes.top_delta_mask(base, ft, sparsity)
    assert all(torch.equal(mine[n], library[n]) for n in names), f"your mask differs from the library's at {sparsity}"
    control = fta.probes.random_mask(base, ft, sparsity, seed=0)
    rows.append({"sparsity": sparsity, "entries": sum(int(m.sum()) for m in mine.values()),
                 "top-k recovery": recovery(accuracy(grafted_model(mine)), acc_base, acc_ft),
                 "random recovery": recovery(accuracy(grafted_model(control)), acc_base, acc_ft)})
mine_table = pd.DataFrame(rows).set_index("sparsity")
mine_table.round(3)

# %% [markdown]
# **What to see.** At 5% nothing comes back, top-k or random: this tiny model has to *build* a skill it never had,
# and a few weights cannot carry it (on the paper's large pretrained models, 0.01% could). At 20% the top-k graft
# recovers a fifth of the gain (0.20) and a random mask nothing (0.00); at 50% top-k recovers it all (1.00), random
# 0.05 (measured at `FTA_SCALE=ci`). The size
# of the change does mark the weights that matter, but only coarsely.

# %%
top, rand = mine_table["top-k recovery"], mine_table["random recovery"]
assert (top.loc[[s for s in MY_SPARSITIES if s <= 0.05]] < 0.05).all(), mine_table
assert (rand.loc[[s for s in MY_SPARSITIES if s <= 0.2]] < 0.1).all(), mine_table
assert top.loc[0.2] > rand.loc[0.2] + 0.15, mine_table
assert top.loc[0.5] > 0.9 and top.loc[0.5] > rand.loc[0.5] + 0.5, mine_table

# %% [markdown]
# ## The learned mask
#
# Your relaxed mask at the paper's initialisation: `S ~ U[0, 1)`, `bias = 10`, around the 20% top-k mask.
# It starts within $\sigma(1 - 10) \approx 1.2\times10^{-4}$ of the binary mask, and
# $\partial\gamma / \partial S = \pm\sigma'(S - 10)$, between $4.5\times10^{-5}$ and $1.2\times10^{-4}$, scales every
# gradient down: that is why the paper steps `S` with a learning rate of about $10^7$ (the library sets the step
# size from the gradient itself, so that the k-th strongest entry moves `S` by one unit per step).

# %%
flat_mask = torch.cat([m.reshape(-1) for m in top_k_mask(deltas, 0.2).values()])
scores = torch.rand(N, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
gamma = relaxed_mask(scores, flat_mask)
(slope,) = torch.autograd.grad(gamma.sum(), scores)
distance = float((gamma.detach() - flat_mask.float()).abs().max())
print(f"max |gamma - binary mask| = {distance:.2e}; "
      f"|d gamma / d S| between {float(slope.abs().min()):.2e} and {float(slope.abs().max()):.2e}")
assert distance < float(torch.sigmoid(torch.tensor(-9.0))) and float(slope.abs().max()) < 1.3e-4

# %% [markdown]
# `fta.probes.graft_sweep` learns the mask this way: `GRAFT_STEPS` gradient steps on `S` for the task loss of
# $\theta_{pre} + \gamma(S)\odot\tau$ (64 training examples per step); after each step the mask is rounded back to
# exactly `k` entries and scored on validation examples, and the best step is kept (step 0 is the top-k mask).
# The sweep also grafts the top-|delta| and random masks of the same size, on the same test examples as yours.

# %%
SPARSITIES = S.pick(ci=[0.01, 0.05, 0.1, 0.2, 0.5], full=[0.001, 0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5])
GRAFT_STEPS = S.pick(ci=10, full=40)
sweep = fta.probes.graft_sweep(base, ft, reverse, tok, sparsities=SPARSITIES, steps=GRAFT_STEPS, seed=0,
                               eval_n=EVAL_N, label="gpt2-tiny on reverse", progress=False)
frame = sweep.to_frame()
curves = frame.pivot(index="target_sparsity", columns="kind", values="recovery")
fig = sweep.plot(title="grafting: recovered fraction of the gain")
fig.axes[0].scatter(mine_table.index * 100, mine_table["top-k recovery"], marker="x", s=40, color="k", zorder=3, label="your top-k graft")
fig.axes[0].legend(fontsize=7)
curves.round(3)

# %% [markdown]
# **What to see.** The library's top-|delta| curve repeats your numbers (same masks, same graft, same test
# examples). At `FTA_SCALE=ci` the learned mask recovers the whole gain (1.01) at 20% of the entries, where
# top-|delta| gets a fifth (0.20) and random nothing (0.00): the skill *is* localized in a fifth of the weights,
# but not exactly in the ones that changed most. At 5% and below, top-|delta| and random recover nothing on this
# model and the learned mask a few percent; at 10% the learned mask gets about half of the gain (0.48). (At full
# scale, with a longer fine-tune and 40 steps per mask, the learned mask reaches 1.00 at 10%, where top-|delta|
# gets 0.02.)

# %%
one_example = 1 / EVAL_N / (acc_ft - acc_base)  # one test example, in recovery units
for sparsity in [s for s in MY_SPARSITIES if s in curves.index]:
    # the same mask grafted the same way: equal up to float rounding (at most one example flips, if any)
    assert abs(curves.loc[sparsity, "top_delta"] - mine_table.loc[sparsity, "top-k recovery"]) <= one_example + 1e-9, (sparsity, curves)
learned, top_delta, random_curve = curves["learned"], curves["top_delta"], curves["random"]
# two accuracies on EVAL_N test examples differ by noise of about sqrt(0.25 / EVAL_N), here in recovery units
noise = (0.25 / EVAL_N) ** 0.5 / (acc_ft - acc_base)
assert (learned >= top_delta - noise).all(), curves
# the smallest mask that recovers 90% of the gain when learned: top-|delta| and random masks of its size do not
smallest = learned[learned >= 0.9].index.min()
print(f"smallest learned mask with recovery >= 0.9: {smallest:.0%} (learned {learned[smallest]:.3f}, "
      f"top-|delta| {top_delta[smallest]:.3f}, random {random_curve[smallest]:.3f})")
assert top_delta[smallest] < 0.6 and learned[smallest] > top_delta[smallest] + 0.4 and random_curve[smallest] < 0.1, curves
assert (curves.loc[[s for s in SPARSITIES if s <= 0.05], ["top_delta", "random"]] < 0.1).all().all(), curves

# %% [markdown]
# **How far did the learned mask move?** Its history at 20%: per step, how many entries differ from the
# top-|delta| mask it started from, and the validation accuracy. Then the overlap of the two masks (Jaccard
# index) against two random masks of the same size (`fta.probes.chance_jaccard`).

# %%
learned_20, top_20 = sweep.get("learned", 0.2), sweep.get("top_delta", 0.2)
overlap = fta.probes.jaccard(learned_20.mask, top_20.mask)
chance = fta.probes.chance_jaccard(learned_20.n_selected, top_20.n_selected, learned_20.n_maskable)
print(f"Jaccard(learned, top-|delta|) at 20%: {overlap:.3f} (two random masks: {chance:.3f})")
learned_20.history[["step", "changed", "val_accuracy", "val_loss"]].round(3)

# %% [markdown]
# **What to see.** At `FTA_SCALE=ci`, ten gradient steps swap out 8,842 of the top-|delta| mask's 20,019 entries while the
# validation accuracy climbs from 0.23 to 0.96; the learned mask still shares much more with the top-|delta| mask
# (Jaccard 0.64) than a random mask would (0.11). The size of a change is a good first guess at where a
# skill lives, and the gradient through the relaxed mask corrects it. Notebook 03 shows the paper's picture
# on a real pretrained encoder (MiniLM), where 5% of the weights recover 90% of the gain.

# %%
assert learned_20.history["changed"].iloc[-1] > 0.1 * learned_20.n_selected, learned_20.history
assert 3 * chance < overlap < 1.0, (overlap, chance)
