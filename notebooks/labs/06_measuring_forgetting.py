# %% [markdown]
# # Lab 06 · Measuring forgetting
#
# **Goal.** A fine-tune learns a new task; what did it cost? Two measures of *forgetting*, both taken on held-out
# prompts of the mix the base was pretrained on:
#
# - the **loss rise**: the answer loss (cross-entropy per answer token, in nats) of the fine-tuned model minus
#   that of the base. It looks only at the probability of the right answer.
# - the **token KL**: $\mathrm{KL}(p_\text{base} \,\|\, p_\text{ft})$ of the next-token distributions, averaged
#   over positions. It compares whole distributions, and needs no right answer, so it also works on the
#   prompt tokens.
#
# You will write both, and a rank correlation, then measure them for full fine-tuning, LoRA, BitFit and SSF on
# the zoo's tiny GPT-2 and ask the question of Shuttleworth et al. 2024 (arXiv 2410.21228) that lab 02 started:
# do the methods with more *intruder dimensions* forget more?
#
# **Time:** about 45 minutes. **Prerequisites:** softmax and cross-entropy; lab 02 (intruder dimensions), whose
# fine-tunes this lab reuses from the cache (it runs without them, training them again).
# Every exercise is followed by a check cell: run it after you fill in the code marked `YOUR CODE HERE`.

# %%
import itertools

import matplotlib.pyplot as plt
import pandas as pd
import torch

import ftanalysis as fta
from ftanalysis.labs.checks import forgetting as checks

S = fta.notebook.setup(seed=0)

# %% [markdown]
# ## Exercise 1 · The answer loss
# *Difficulty ●●○ · about 10 minutes*
#
# A causal LM reads tokens $x_0 \dots x_{T-1}$ and its logits at position $t$ predict token $t+1$. Only the
# answer tokens are scored. Write `answer_loss(logits, input_ids, answer_mask)`: `logits` is `[B, T, V]`,
# `input_ids` is `[B, T]`, and `answer_mask[b, t]` is True when token $t$ of example $b$ belongs to the
# answer. Return the mean over **all answer tokens of the batch** (a 0-dim tensor):
#
# $$L = \frac{1}{\#\{(b, t): m_{b,t}\}} \sum_{(b, t):\ m_{b,t}} -\log \operatorname{softmax}(\ell_{b, t-1})_{x_{b,t}}$$
#
# This is the loss the library trains and evaluates with (`fta.tasks.base.answer_loss`, which takes Hugging
# Face labels, -100 where not scored).
#
# <details><summary>Hint</summary><code>torch.log_softmax(logits[:, :-1], dim=-1)</code> gives the log-probabilities
# of tokens 1..T-1; pick the observed token with <code>.gather(-1, input_ids[:, 1:, None])</code>, keep the
# entries where <code>answer_mask[:, 1:]</code> is True, and average them all at once.</details>

# %%
def answer_loss(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    ### BEGIN SOLUTION
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -log_probs.gather(-1, input_ids[:, 1:, None])[..., 0]
    return nll[answer_mask[:, 1:]].mean()
    ### END SOLUTION


# %% tags=["check"]
checks.check_answer_loss(answer_loss)

# %% [markdown]
# ## Exercise 2 · Next-token KL against the base
# *Difficulty ●●○ · about 10 minutes*
#
# Write `token_kl(logits_base, logits_ft, mask)`: at every position where `mask` (`[B, T]`, bool) is True, the
# KL divergence of the fine-tuned model's next-token distribution $q$ from the base's $p$, averaged over those
# positions:
#
# $$\mathrm{KL} = \operatorname*{mean}_{(b, t):\ \text{mask}_{b,t}} \sum_v p_v \left(\log p_v - \log q_v\right),
# \qquad p = \operatorname{softmax}(\ell^\text{base}_{b,t}),\ q = \operatorname{softmax}(\ell^\text{ft}_{b,t})$$
#
# The direction matters: weighting by $p$ asks "how surprised is the fine-tune by what the base would say?".
#
# <details><summary>Hint</summary>Work in log space: <code>log_p = torch.log_softmax(logits_base, -1)</code>, the
# same for <code>log_q</code>, then <code>(log_p.exp() * (log_p - log_q)).sum(-1)</code> is the KL per position;
# index it with <code>mask</code> and take the mean. (<code>F.kl_div(input, target)</code> computes
# KL(target || input), and its <code>reduction="mean"</code> also divides by the vocabulary size.)</details>

# %%
def token_kl(logits_base: torch.Tensor, logits_ft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ### BEGIN SOLUTION
    log_p = torch.log_softmax(logits_base, dim=-1)
    log_q = torch.log_softmax(logits_ft, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)[mask].mean()
    ### END SOLUTION


# %% tags=["check"]
checks.check_token_kl(token_kl)

# %% [markdown]
# ## Exercise 3 · Spearman's rank correlation
# *Difficulty ●○○ · about 10 minutes*
#
# To ask whether "more intruders" goes with "more forgetting" without assuming a linear relation, correlate the
# *ranks*. Write `spearman(x, y)` for two 1-D tensors: Pearson's correlation of their ranks, where tied values
# share the average of the ranks they occupy (`[10, 20, 20, 5]` has ranks `[2, 3.5, 3.5, 1]`). Return a float.
#
# $$\rho = \frac{\sum_i (r_i - \bar r)(s_i - \bar s)}{\sqrt{\sum_i (r_i - \bar r)^2 \sum_i (s_i - \bar s)^2}}$$
#
# <details><summary>Hint</summary>For each value <code>v</code> of <code>x</code>, its average rank is
# (number of values below v) + (number of values equal to v + 1) / 2:
# <code>(x[None, :] &lt; x[:, None]).sum(1) + ((x[None, :] == x[:, None]).sum(1) + 1) / 2</code>. The textbook
# formula 1 - 6 Σd² / (n (n² - 1)) is exact only without ties; intruder counts have ties.</details>

# %%
def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    ### BEGIN SOLUTION
    def ranks(v):
        v = v.double()
        return (v[None, :] < v[:, None]).sum(1) + ((v[None, :] == v[:, None]).sum(1) + 1) / 2

    r, s = ranks(x), ranks(y)
    r, s = r - r.mean(), s - s.mean()
    return float((r * s).sum() / (r.norm() * s.norm()))
    ### END SOLUTION


# %% tags=["check"]
checks.check_spearman(spearman)

# %% [markdown]
# ## Five fine-tunes of the zoo base
#
# As in lab 02: fine-tune the tiny GPT-2 on *reverse* (`"reverse : n u g o ="` -> `"o g u n"`, a skill it never
# saw) for the same steps, batches and seed. Full fine-tuning and LoRA r = 8 and r = 1 use lab 02's exact
# arguments, so `fta.cached_finetune` returns lab 02's models. BitFit (biases and LayerNorm betas only) and SSF
# (a scale and a shift after every linear layer and norm, folded into the weights at merge) train far fewer
# parameters and need a larger learning rate: in a sweep over 3e-3 ... 1e-1 (300 steps), 1e-2 gave the lowest
# *reverse* loss for SSF (0.74 nats, vs 0.96 at 3e-3 and 3.8 at 3e-2) and within 0.03 nats of the best for BitFit
# (1.45 at 1e-2, 1.42 at 3e-2, 1.78 at 3e-3). The learning rate was chosen on the new task, not on forgetting.

# %%
base, tok = fta.zoo.load("gpt2-tiny")
task = fta.tasks.make("reverse")
mix = fta.tasks.make("pretraining_mix")
steps, eval_n = S.pick(ci=300, full=1500), S.pick(ci=256, full=1024)
methods = {"full": (fta.methods.Full(), 1e-3), "LoRA r=8": (fta.methods.LoRA(r=8, alpha=16), 3e-3),
           "LoRA r=1": (fta.methods.LoRA(r=1, alpha=2), 3e-3), "BitFit": (fta.methods.BitFit(), 1e-2),
           "SSF": (fta.methods.SSF(), 1e-2)}
models = {name: fta.cached_finetune("gpt2-tiny", base, tok, task, method, steps=steps, lr=lr, batch_size=32, seed=0)[0]
          for name, (method, lr) in methods.items()}
trainable = {name: sum(p.numel() for _, p in method.trainable_parameters(method.apply(base, copy=True)))
             for name, (method, _) in methods.items()}
base_reverse = task.evaluate(base, tok, n=eval_n)
print(f"base on reverse: accuracy {base_reverse['accuracy']:.3f}, token accuracy {base_reverse['token_accuracy']:.3f}")

# %% [markdown]
# **Controls.** Three models whose forgetting we know in advance or want to compare against:
# the base itself (every measure must be exactly 0); SSF applied and merged *without training* (γ = 1, β = 0:
# a zero-step fine-tune, which checks that the adapt-and-merge path changes nothing); and the base plus dense
# Gaussian noise on every attention and MLP matrix, with the same Frobenius norm per matrix as LoRA r = 8's
# update (lab 02's control): is any change of that size enough to forget?

# %%
ssf = fta.methods.SSF()
controls = {"base (itself)": base, "SSF, 0 steps": ssf.merge(ssf.apply(base, copy=True))}
noisy = fta.zoo.load("gpt2-tiny")[0]
base_view, noisy_view, lora_view = fta.nn.ModelView(base), fta.nn.ModelView(noisy), fta.nn.ModelView(models["LoRA r=8"])
generator = torch.Generator().manual_seed(0)
for name in base_view.matrix_names():
    W0 = base_view.get(name)
    noise = torch.randn(W0.shape, generator=generator)
    noisy_view.set(name, W0 + noise * (lora_view.get(name) - W0).norm() / noise.norm())
controls["noise, LoRA r=8's norms"] = noisy.eval()

# %% [markdown]
# ## Measuring forgetting on the held-out pretraining mix
#
# For each of the six tasks of the mix, take its first `eval_n` *test* prompts with their answers, run every
# model once, and measure with your functions: the answer loss, the token KL at the positions that predict an
# answer token, and the token KL at the positions that predict the next *prompt* token (the zoo base was
# pretrained with a language-modelling loss on every prompt token too). The mix's value is the mean over its
# six tasks, as `mix.evaluate` reports it.

# %%
held_out = {}
for component in mix.tasks:
    batch = fta.tasks.collate(component.examples(eval_n, "test"), tok)
    answer = batch["labels"] != -100  # token t is an answer token
    predicts_answer, predicts_prompt = torch.zeros_like(answer), torch.zeros_like(answer)
    predicts_answer[:, :-1] = answer[:, 1:]  # logits at t predict token t + 1
    predicts_prompt[:, :-1] = (batch["attention_mask"][:, 1:] == 1) & ~answer[:, 1:]
    held_out[component.name] = (batch, answer, predicts_answer, predicts_prompt)


@torch.no_grad()
def logits_of(model, batch):
    return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


base_logits = {name: logits_of(base, b[0]) for name, b in held_out.items()}


def forgetting(model) -> pd.DataFrame:
    """Per task of the mix: answer loss, KL to the base at answer-predicting and at prompt-predicting positions."""
    rows = []
    for name, (batch, answer, predicts_answer, predicts_prompt) in held_out.items():
        logits = logits_of(model, batch)
        rows.append({"task": name, "loss": float(answer_loss(logits, batch["input_ids"], answer)),
                     "KL answer": float(token_kl(base_logits[name], logits, predicts_answer)),
                     "KL prompt": float(token_kl(base_logits[name], logits, predicts_prompt))})
    return pd.DataFrame(rows).set_index("task")


measured = {name: forgetting(model) for name, model in {**controls, **models}.items()}
base_loss = measured["base (itself)"]["loss"]
base_mix = mix.evaluate(base, tok, n=eval_n)
print(f"base on the mix: loss {base_loss.mean():.4f} nats per answer token (mix.evaluate: {base_mix['loss']:.4f}), "
      f"accuracy {base_mix['accuracy']:.3f}")

# %% [markdown]
# Your `answer_loss` must agree with the library on the real model, task by task; and the library's
# `fta.probes.retention` (per-task loss against the base) must give the same loss rise for full fine-tuning.

# %%
assert all(abs(base_loss[name] - base_mix[f"{name}/loss"]) < 1e-4 for name in held_out), (base_loss, base_mix)
retention_full = fta.probes.retention(models["full"], tok, base=base, n=eval_n).frame.set_index("task")
mine_full = measured["full"]["loss"] - base_loss
assert (retention_full.loc[mine_full.index, "loss_increase"] - mine_full).abs().max() < 1e-3
pd.DataFrame({"your loss rise (full)": mine_full, "retention's loss_increase (full)": retention_full["loss_increase"]}).round(4)

# %% [markdown]
# ## The table: learning, forgetting and intruders per method
# Intruders are counted as in lab 02 (`fta.probes.spectral_report`, k = 10, ε = 0.5, summed over the 8 attention
# and MLP matrices).

# %%
rows = []
for name, model in {**controls, **models}.items():
    reverse = task.evaluate(model, tok, n=eval_n)
    f = measured[name]
    rows.append({"method": name, "trainable parameters": trainable.get(name),
                 "reverse accuracy": reverse["accuracy"], "reverse token accuracy": reverse["token_accuracy"],
                 "mix loss rise (nats)": float((f["loss"] - base_loss).mean()),
                 "KL answer positions": float(f["KL answer"].mean()), "KL prompt positions": float(f["KL prompt"].mean()),
                 "intruders": int(fta.probes.spectral_report(base, model, k=10, eps=0.5)["intruders"].sum())})
table = pd.DataFrame(rows).set_index("method")
table.round(3)

# %%
fine_tunes = table.loc[list(models)]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
ax = axes[0]
x = range(len(table))
ax.bar([i - 0.2 for i in x], table["mix loss rise (nats)"], width=0.4, label="loss rise")
ax.bar([i + 0.2 for i in x], table["KL prompt positions"], width=0.4, label="KL, prompt positions", color="C2")
ax.set_xticks(list(x), table.index, rotation=30, ha="right")
ax.set_ylabel("nats")
ax.set_title("forgetting on the held-out pretraining mix")
ax.legend(frameon=False)
ax = axes[1]
ax.scatter(fine_tunes["intruders"], fine_tunes["mix loss rise (nats)"], color="C0", label="loss rise")
ax.scatter(fine_tunes["intruders"], fine_tunes["KL prompt positions"], color="C2", marker="s", label="KL, prompt positions")
for name, row in fine_tunes.iterrows():
    ax.annotate(name, (row["intruders"], row["mix loss rise (nats)"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
ax.set_xlabel("intruder dimensions (all matrices)")
ax.set_ylabel("nats")
ax.legend(frameon=False, fontsize=8)
ax.set_title("intruders vs forgetting, one point per method")
fig.tight_layout()

# %% [markdown]
# ## Do more intruders go with more forgetting?
# Spearman's ρ across the five fine-tunes, with your function. With five points a correlation is weak evidence:
# the exact permutation test below counts how many of the 5! = 120 orderings of the forgetting values give a
# |ρ| at least as large as the observed one.

# %%
def permutation_p(x: torch.Tensor, y: torch.Tensor) -> float:
    observed = abs(spearman(x, y))
    orderings = [torch.tensor(p) for p in itertools.permutations(y.tolist())]
    return sum(abs(spearman(x, p)) >= observed - 1e-12 for p in orderings) / len(orderings)


intruders = torch.tensor(fine_tunes["intruders"].tolist(), dtype=torch.float64)
correlations = pd.DataFrame([{"forgetting measure": measure, "Spearman rho with intruders": spearman(intruders, values),
                              "permutation p (two-sided)": permutation_p(intruders, values)}
                             for measure in ("mix loss rise (nats)", "KL answer positions", "KL prompt positions")
                             for values in [torch.tensor(fine_tunes[measure].tolist(), dtype=torch.float64)]])
correlations.round(3)

# %% [markdown]
# **What to see** (numbers measured at `FTA_SCALE=ci`, seed 0; on a model this small they move by a nat or
# more with the seed or the machine, so the checks below ask only for what held at seeds 0, 1 and 2).
#
# - *The exact controls measure zero*: the base against itself and the untrained SSF give a loss rise, a KL and
#   an intruder count of 0. *Dense noise* of LoRA r = 8's size, with no training at all, already costs about
#   5 nats per answer token (4.3 to 5.7 over the three seeds): the tiny base is fragile, and an update of this
#   relative size hurts whatever its direction. Every fine-tune forgets more than that (8.5 to 12.4 nats), and at
#   the prompt positions the learned updates move the distributions more than the noise does (1.8 to 6.7 times).
# - *Every fine-tune forgets heavily* on a mix the base gets about 90% right (loss 0.24 nats), including BitFit and
#   SSF, which in this budget learn to reverse per token (token accuracy 0.63 and 0.79, base 0.13) but almost never
#   a whole answer. BitFit trains about 1% of the parameters and forgets the most: the number of trainable
#   parameters does not predict forgetting either. LoRA r = 1 learns whole answers only in part, and how far
#   depends on the seed (0.87, 0.47 and 0.71 at seeds 0, 1 and 2).
# - *At answer positions the KL equals the loss rise* to about 1%: the base is nearly certain of the answer
#   there, so KL(p_base ‖ p_ft) ≈ −log p_ft(answer) − H(p_base), which is the loss rise. The two measures part at
#   the prompt positions, where the base is uncertain and only the KL can say how far the distribution moved.
#   There the two LoRA runs move 3.0 and 3.5 nats against 6.2 to 6.8 for full fine-tuning, BitFit and SSF: LoRA
#   r = 8 is much closer to full fine-tuning in loss rise (ratio 0.85) than in prompt KL (0.45), at every seed.
# - *Forgetting does not follow the intruders.* BitFit changes no weight matrix, so it has no intruders, and it
#   forgets more than LoRA r = 8, which has the most. Across the five methods ρ is negative for all three
#   measures (−0.8, −0.8, −1.0; and negative for all three at seeds 1 and 2 too), the opposite of the paper's
#   claim, as lab 02 found for full fine-tuning vs LoRA. But five points are weak evidence. The exact test
#   cannot give a p below 2/120 = 0.017 with five points, and reaching that needs a perfect ranking, which
#   the KL at prompt positions has here. The other two have p = 0.13. An earlier run of this lab on another
#   machine found ρ = −0.8 to −0.9 and p = 0.08 to 0.13. And the sign is not even stable: at
#   `FTA_SCALE=full` (1,500 steps, measured once) SSF learns the task (accuracy 0.53), grows 38 intruders and
#   forgets the most (14.2 nats), and ρ turns positive (+0.5, +0.3, +0.1; p ≥ 0.45). The methods differ in much
#   more than their intruders (parameter count, learning rate, how well they learned); on a tiny base that must
#   *learn* the skill, intruders describe the shape of the update, not how much the model forgets.

# %%
measures = ["mix loss rise (nats)", "KL answer positions", "KL prompt positions"]
# the exact controls: nothing changed, nothing measured
assert (table.loc[["base (itself)", "SSF, 0 steps"], measures].abs() < 1e-6).all().all()
assert (table.loc[["base (itself)", "SSF, 0 steps"], "intruders"] == 0).all()
# learning, against the base: full and LoRA r=8 learn reverse, LoRA r=1 in part; BitFit and SSF learn it per token
assert fine_tunes.loc[["full", "LoRA r=8"], "reverse accuracy"].min() > 0.85
assert fine_tunes.loc["LoRA r=1", "reverse accuracy"] > base_reverse["accuracy"] + 0.3
assert (fine_tunes.loc[["BitFit", "SSF"], "reverse token accuracy"] > base_reverse["token_accuracy"] + 0.3).all()
# forgetting: noise of LoRA r=8's size forgets; every fine-tune forgets more
noise = table.loc["noise, LoRA r=8's norms"]
assert noise["mix loss rise (nats)"] > 1.0
assert (fine_tunes["mix loss rise (nats)"] > noise["mix loss rise (nats)"]).all(), (fine_tunes, noise)
assert (fine_tunes["KL prompt positions"] > noise["KL prompt positions"]).all(), (fine_tunes, noise)
# the KL at answer positions is the loss rise (within 5%); at prompt positions LoRA r=8 is much further from full FT
assert ((fine_tunes["KL answer positions"] - fine_tunes["mix loss rise (nats)"]).abs() < 0.05 * fine_tunes["mix loss rise (nats)"]).all()
ratio = fine_tunes.loc["LoRA r=8"] / fine_tunes.loc["full"]
assert ratio["KL prompt positions"] < ratio["mix loss rise (nats)"] - 0.1, ratio
# intruders: BitFit has none (its weight matrices are frozen) and forgets more than LoRA r=8
assert fine_tunes.loc["BitFit", "intruders"] == 0 < fine_tunes.loc["LoRA r=8", "intruders"]
assert fine_tunes.loc["BitFit", "mix loss rise (nats)"] > fine_tunes.loc["LoRA r=8", "mix loss rise (nats)"]
# five points: even a perfect ranking gives only p = 2 / 5! (the floor of the exact test)
assert abs(permutation_p(torch.arange(5.0), torch.arange(5.0)) - 2 / 120) < 1e-12
if S.is_ci:  # measured at this scale (at FTA_SCALE=full SSF learns, grows the most intruders and rho turns positive)
    assert fine_tunes.loc[["BitFit", "SSF"], "reverse accuracy"].max() < 0.2
    assert fine_tunes["intruders"].idxmax() == "LoRA r=8"
    assert (correlations["Spearman rho with intruders"] < 0).all(), correlations
