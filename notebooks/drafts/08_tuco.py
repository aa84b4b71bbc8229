# %% [markdown]
# # 08 · TuCo: how much of a response is the fine-tuning's doing?
#
# **The question.** A fine-tuned model answers a prompt. How much of that answer comes from what fine-tuning
# added, and how much from what the pretrained model already computed? TuCo (Nuti, Franzmeyer, Henriques,
# ICML 2025, arXiv 2506.23423) answers per prompt. Run the fine-tuned model; at every block `l`, feed the
# *same* residual state `x_l` to the pretrained block and to the fine-tuned block, and split the update:
#
# - pretrained component `PTC_l = f_PT(x_l) - x_l`, fine-tuning component `FTC_l = f_FT(x_l) - f_PT(x_l)`,
# - `x_{l+1} = x_l + PTC_l + FTC_l` (exactly the fine-tuned forward pass),
# - `TuCo = |sum_l FTC_l| / (|sum_l PTC_l| + |sum_l FTC_l|)` at the last prompt token, in [0, 1].
#
# The paper's two claims we test: TuCo is higher on prompts from the fine-tuning distribution than on
# pretraining prompts, and scaling the fine-tuning component by `alpha` (`PTC_l + alpha FTC_l`) moves the
# behaviour between the base (`alpha = 0`) and the fine-tuned model (`alpha = 1`).
#
# **The setup.** As in notebook 07: `gpt2-tiny` was pretrained on a mix that includes counting the token `a`
# (`"count : b a c a d a ."` -> `"3"`), and we fine-tune it (full fine-tuning, lr 1e-4, the same cached run
# as notebook 07) to count `b` on the same prompts. The control is a fine-tune with the same budget on the
# pretraining mix itself, which should contribute little anywhere.

# %%
import time

import matplotlib.pyplot as plt
import pandas as pd

import ftanalysis as fta
from ftanalysis.probes import contribution

S = fta.notebook.setup(seed=0)
STEPS = S.pick(ci=300, full=1000)
EVAL_N = S.pick(ci=256, full=1024)
TUCO_N = S.pick(ci=128, full=512)
FT = dict(steps=STEPS, lr=1e-4, batch_size=32, seed=0)
T0 = time.time()

# %%
base, tok = fta.zoo.load("gpt2-tiny")
count_a = fta.tasks.make("counting", token="a")
count_b = fta.tasks.make("counting", token="b")
mix = fta.tasks.make("pretraining_mix")
ft, _ = fta.cached_finetune("gpt2-tiny", base, tok, count_b, fta.methods.Full(), **FT)
control, _ = fta.cached_finetune("gpt2-tiny", base, tok, mix, fta.methods.Full(), **FT)


def accuracy(model, task, n=EVAL_N):
    return task.evaluate(model, tok, n=n)["accuracy"]


pd.DataFrame(
    {name: {"counts a": accuracy(m, count_a), "counts b": accuracy(m, count_b), "mix": mix.evaluate(m, tok, n=EVAL_N // 4)["accuracy"]}
     for name, m in (("base", base), ("fine-tuned (count b)", ft), ("control (pretraining mix)", control))}
).T.round(3)

# %% [markdown]
# ## TuCo on fine-tuning prompts and on pretraining prompts
# `contribution.tuco(base, ft, tok, prompts)` runs the fine-tuned model with hooks that also run the base
# block on each block's input and record both components. Prompts in the fine-tuning distribution are the
# counting prompts; pretraining prompts are those of the other tasks of the mix (entity tracking,
# associative recall, copying, modular addition, facts).

# %%
prompt_sets = {"counting (fine-tuning)": count_a, **{t.name: t for t in mix.tasks if t.name != "counting"}}
scores = {
    (model_name, set_name): contribution.tuco(base, m, tok, task, n=TUCO_N)
    for model_name, m in (("fine-tuned", ft), ("control", control))
    for set_name, task in prompt_sets.items()
}
tuco_table = pd.DataFrame({k: {"mean TuCo": r.mean, "median": float(r.tuco.median())} for k, r in scores.items()}).T
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
for ax, model_name in zip(axes, ("fine-tuned", "control")):
    for set_name in prompt_sets:
        scores[(model_name, set_name)].plot(ax=ax, label=set_name)
    ax.set_title(f"TuCo of the {model_name} model")
axes[1].legend(frameon=False, fontsize=7)
tuco_table.round(3)

# %% [markdown]
# Which blocks carry the fine-tuning component? Mean norm of each block's two components at the last prompt
# token, on counting prompts.

# %%
scores[("fine-tuned", "counting (fine-tuning)")].layer_frame().round(3)

# %% [markdown]
# ## Steering: scale the fine-tuning component
# `contribution.steer(base, ft, alpha)` runs each block as `PTC_l + alpha FTC_l`. A full fine-tune also moved
# the embeddings and the final layer norm, which the paper's decomposition leaves out; with the default
# `ends="interpolate"` they are interpolated too, so `alpha = 0` is exactly the base and `alpha = 1` exactly
# the fine-tuned model. `ends="finetuned"` keeps the fine-tuned ones (the paper's setting).

# %%
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
rows = []
for ends in ("interpolate", "finetuned"):
    for alpha in ALPHAS:
        with contribution.steer(base, ft, alpha, ends=ends) as steered:
            rows.append({"ends": ends, "alpha": alpha, "counts a": accuracy(steered, count_a), "counts b": accuracy(steered, count_b)})
steering = pd.DataFrame(rows)
fig, ax = plt.subplots(figsize=(5, 3.2))
for (ends, column), style in zip([(e, c) for e in ("interpolate", "finetuned") for c in ("counts a", "counts b")], ["o-", "s-", "o--", "s--"]):
    part = steering[steering["ends"] == ends]
    ax.plot(part["alpha"], part[column], style, label=f"{column} ({ends})")
ax.axvline(1.0, color="0.7", lw=1)
ax.set_xlabel("alpha (scale of the fine-tuning component)")
ax.set_ylabel("accuracy")
ax.legend(frameon=False, fontsize=7)
fig.tight_layout()
steering.round(3)

# %% [markdown]
# ## Claims, checked against their controls

# %%
# 1. TuCo is higher on prompts of the fine-tuning distribution than on every set of pretraining prompts,
#    and higher than the control fine-tune's TuCo on the same prompts.
ft_means = {s: scores[("fine-tuned", s)].mean for s in prompt_sets}
ctl_means = {s: scores[("control", s)].mean for s in prompt_sets}
counting_key = "counting (fine-tuning)"
assert ft_means[counting_key] > max(v for s, v in ft_means.items() if s != counting_key), ft_means
assert ft_means[counting_key] > ctl_means[counting_key], (ft_means, ctl_means)

# %%
# 2. Scaling the fine-tuning component moves behaviour between base and fine-tuned: alpha = 0 is the base,
#    alpha = 1 the fine-tuned model, and counting b rises (counting a falls) along the way.
part = steering[steering["ends"] == "interpolate"].set_index("alpha")
assert abs(part.loc[0.0, "counts a"] - accuracy(base, count_a)) < 1e-9 and abs(part.loc[1.0, "counts b"] - accuracy(ft, count_b)) < 1e-9
b_path, a_path = part.loc[[a for a in ALPHAS if a <= 1.0], "counts b"], part.loc[[a for a in ALPHAS if a <= 1.0], "counts a"]
assert (b_path.diff().dropna() > -0.05).all() and (a_path.diff().dropna() < 0.05).all(), part
assert b_path.iloc[-1] - b_path.iloc[0] > 0.5 and a_path.iloc[0] - a_path.iloc[-1] > 0.5, part
print(f"all claims hold ({time.time() - T0:.0f} s)")
