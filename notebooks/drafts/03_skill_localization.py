# %% [markdown]
# # 03 · Where did the skill go? Skill localization by grafting
#
# **The question.** Fine-tuning moves every weight of a model. Does the new skill need all of those changes,
# or does it live in a few of them? Panigrahi, Saunshi, Zhao and Arora (ICML 2023, arXiv 2302.06600) find
# that *grafting* a tiny subset of the fine-tuned weights onto the pretrained model recovers almost all of the
# fine-tuned accuracy, that the graft is better calibrated, and that different tasks localize to nearly
# disjoint regions.
#
# **The method.** With the task vector `tau = theta_ft - theta_pre` and a binary mask `gamma`, the grafted
# model is `theta_pre + gamma * tau`. Three masks of the same size are compared at each sparsity:
# - **learned**: start from the top-|tau| mask and take a few gradient steps on a real-valued score `S`,
#   `gamma = gamma_base + (1 - 2 gamma_base) * sigmoid(S - 10)` (the paper's parametrisation), keeping the
#   `k` entries with the largest `gamma` so the size stays exactly at its target;
# - **top-|delta|**: the `k` largest `|tau|` over all block parameters (one global ranking), no optimisation;
# - **random**: `k` entries drawn uniformly (the control).
#
# Embeddings are excluded from every mask (they keep their pretrained value); the classifier head, which the
# pretrained model does not have, is taken from the fine-tuned model in every graft. The **recovered fraction
# of the gain** is `(acc_graft - acc_ref) / (acc_ft - acc_ref)`, where the reference is the empty graft
# (pretrained body, fine-tuned head).
#
# **Two models.** The real pretrained encoder all-MiniLM-L6-v2 (22.7 M parameters) learns a sentence task
# made of real English words, a skill it nearly has; the tiny zoo GPT-2 (about 0.1 M parameters) learns to
# reverse a list, a skill it does not have. The contrast is the point.

# %%
import time

import matplotlib.pyplot as plt
import pandas as pd

import ftanalysis as fta

S = fta.notebook.setup(seed=0)
SPARSITIES = S.pick(ci=[1e-4, 1e-3, 1e-2, 5e-2, 1e-1], full=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 5e-2, 1e-1])
GRAFT_STEPS = S.pick(ci=10, full=40)  # gradient steps on S per learned mask
EVAL_N = S.pick(ci=512, full=2048)  # test sentences per score
OTHER_STEPS = S.pick(ci=100, full=1000)  # the second task and the second seed (for the mask overlaps)
timings = {}
started = time.perf_counter()

# %% [markdown]
# ## MiniLM fine-tuned on negated sentiment
# `sentiment_negation`: "the movie was (not) delightful ." with the word's VADER sentiment flipped by "not";
# train, validation and test sentences never share a sentiment word. The fine-tune is the one shared by the
# MiniLM notebooks (`fta.cached_finetune` trains it once per run).

# %%
body, tok = fta.zoo.load("minilm")
negation = fta.tasks.make("sentiment_negation")
clf = fta.zoo.EncoderClassifier(body, 2, seed=0)
t0 = time.perf_counter()
ft_neg, history = fta.cached_finetune(
    "minilm+head2(seed=0)", clf, tok, negation, fta.methods.Full(),
    steps=S.pick(ci=300, full=1000), lr=5e-5, batch_size=32, seed=0,
)
timings["MiniLM fine-tune (cached when shared)"] = time.perf_counter() - t0
for ex in negation.examples(3):
    print(f"{ex.prompt!r:40} -> {ex.answer}")

# %% [markdown]
# ## Recovery against sparsity on MiniLM
# One `graft_sweep` computes `tau` once and grafts learned, top-|delta| and random masks of the same size at
# every sparsity. Each learned mask takes `GRAFT_STEPS` steps on `S` (64 training sentences each) and keeps
# the step with the best validation accuracy.

# %%
t0 = time.perf_counter()
sweep_minilm = fta.probes.graft_sweep(
    body, ft_neg, negation, tok, sparsities=SPARSITIES, steps=GRAFT_STEPS, seed=0, eval_n=EVAL_N,
    keep_models=False, label="MiniLM", progress=False,
)
timings["MiniLM graft sweep"] = time.perf_counter() - t0
minilm = sweep_minilm.to_frame()
first = sweep_minilm.results[0]
print(f"maskable entries: {first.n_maskable:,}; reference (pretrained body + fine-tuned head) "
      f"{first.scores['reference']['accuracy']:.3f}, fine-tuned {first.scores['fine-tuned']['accuracy']:.3f}, "
      f"chance {negation.chance:.2f}")
minilm.pivot(index="target_sparsity", columns="kind", values="recovery").round(3)

# %% [markdown]
# ## The contrast: the zoo GPT-2 learning something new
# The zoo's `gpt2-tiny` was pretrained on copying, counting, addition, facts and entity tracking, but never
# saw `reverse` (its accuracy is 0). Fully fine-tuned on it (embeddings frozen, as in the paper's protocol, so
# that every change is graftable), the skill has to be *built*, not elicited.

# %%
zoo, zoo_tok = fta.zoo.load("gpt2-tiny")
reverse = fta.tasks.make("reverse")
t0 = time.perf_counter()
ft_rev, _ = fta.cached_finetune(
    "gpt2-tiny", zoo, zoo_tok, reverse, fta.methods.Full(freeze_embeddings=True),
    steps=S.pick(ci=400, full=2000), lr=1e-3, batch_size=64, seed=0,
)
timings["zoo fine-tune"] = time.perf_counter() - t0
t0 = time.perf_counter()
sweep_zoo = fta.probes.graft_sweep(
    zoo, ft_rev, reverse, zoo_tok, sparsities=SPARSITIES, steps=GRAFT_STEPS, seed=0, eval_n=EVAL_N,
    keep_models=False, label="zoo gpt2-tiny", progress=False,
)
timings["zoo graft sweep"] = time.perf_counter() - t0
zoo_frame = sweep_zoo.to_frame()
first = sweep_zoo.results[0]
print(f"maskable entries: {first.n_maskable:,}; base {first.scores['reference']['accuracy']:.3f}, "
      f"fine-tuned {first.scores['fine-tuned']['accuracy']:.3f}")
zoo_frame.pivot(index="target_sparsity", columns="kind", values="recovery").round(3)

# %%
fig = fta.probes.plot_recovery([sweep_minilm, sweep_zoo], title="grafting: recovered fraction of the fine-tuning gain")
fig.set_size_inches(6.4, 4.0)

# %% [markdown]
# **Claim.** On MiniLM a small graft carries the skill: the learned mask recovers most of the gain at a few
# percent of the parameters, where a random mask of the same size recovers little, and learned >= top-|delta|
# >= random at every sparsity. On the zoo model the same sparsities recover clearly less: fine-tuning a
# capable pretrained model *elicits* a skill it nearly has through a few large changes, while a small model
# that must *learn* a new skill changes everywhere.

# %%
def curve(frame, kind):
    return frame[frame["kind"] == kind].set_index("target_sparsity")["recovery"]


# Two accuracies on the same EVAL_N test sentences differ by noise of about sqrt(0.5 / EVAL_N) (0.03 at
# 512 sentences): the order is asserted up to that noise, expressed in recovery units.
scores0 = sweep_minilm.results[0].scores
tol_minilm = (0.5 / EVAL_N) ** 0.5 / (scores0["fine-tuned"]["accuracy"] - scores0["reference"]["accuracy"])
learned, top, rand = curve(minilm, "learned"), curve(minilm, "top_delta"), curve(minilm, "random")
assert (learned >= top - tol_minilm).all(), (learned, top)
assert (top >= rand - tol_minilm).all(), (top, rand)
assert (top.loc[[s for s in SPARSITIES if s >= 1e-2]] > rand.loc[[s for s in SPARSITIES if s >= 1e-2]] + 0.2).all()
small = [s for s in SPARSITIES if s <= 0.05]
good = [s for s in small if learned[s] >= 0.9 and rand[s] < 0.3]
print("sparsities <= 5% where the learned graft recovers >= 90% and random < 30%:", good)
assert good, learned

# %%
zl = curve(zoo_frame, "learned")
print(pd.DataFrame({"MiniLM learned": learned, "zoo learned": zl}).round(3))
for s in [s for s in SPARSITIES if 1e-2 <= s <= 0.05]:
    assert zl[s] < learned[s] - 0.25, (s, zl[s], learned[s])

# %% [markdown]
# ## Calibration: is the graft better calibrated than the fine-tuned model?
# Expected calibration error with 15 equal-width confidence bins (Guo et al. 2017), on the test sentences,
# for the learned graft at the smallest sparsity that recovers 90% of the gain.

# %%
s_cal = good[0]
graft_model = fta.probes.apply_mask(body, ft_neg, sweep_minilm.get("learned", s_cal).mask)
results = [
    fta.probes.calibration(ft_neg, tok, negation, n=EVAL_N, label="fine-tuned"),
    fta.probes.calibration(graft_model, tok, negation, n=EVAL_N, label=f"graft {s_cal:.2%}"),
]
ece = pd.DataFrame([r.summary() for r in results]).set_index("label")
print(ece.round(4))
fig = fta.probes.reliability_diagram(results, title="MiniLM, negated sentiment")

# %%
assert ece.loc[results[1].label, "ece"] <= ece.loc["fine-tuned", "ece"] + 0.01, ece

# %% [markdown]
# ## Do different tasks use different weights?
# A second task on the same sentences (`subject_category`: is the subject food, media, a place or a person)
# and a second seed of the negation task (other batches, same initialisation), each fine-tuned for
# `OTHER_STEPS` steps. Each is compared with the shared negation fine-tune through its top-|delta| mask at 1%;
# chance is the Jaccard index of two random masks of the same sizes. The cosine of the two task vectors is a
# task similarity.

# %%
t0 = time.perf_counter()
category = fta.tasks.make("subject_category")
clf4 = fta.zoo.EncoderClassifier(body, 4, seed=0)
ft_cat, _ = fta.cached_finetune("minilm+head4(seed=0)", clf4, tok, category, fta.methods.Full(), steps=OTHER_STEPS, lr=5e-5, batch_size=32, seed=0)
ft_neg1, _ = fta.cached_finetune("minilm+head2(seed=0)", clf, tok, negation, fta.methods.Full(), steps=OTHER_STEPS, lr=5e-5, batch_size=32, seed=1)
timings["two more MiniLM fine-tunes"] = time.perf_counter() - t0
print({"category": category.evaluate(ft_cat, tok, n=EVAL_N)["accuracy"], "negation seed 1": negation.evaluate(ft_neg1, tok, n=EVAL_N)["accuracy"]})

S_OVERLAP = 0.01
masks = {
    "negation s0": fta.probes.top_delta_mask(body, ft_neg, S_OVERLAP),
    "negation s1": fta.probes.top_delta_mask(body, ft_neg1, S_OVERLAP),
    "category": fta.probes.top_delta_mask(body, ft_cat, S_OVERLAP),
}
similarity = {("negation s0", "negation s1"): fta.probes.delta_cosine(body, ft_neg, ft_neg1),
              ("negation s0", "category"): fta.probes.delta_cosine(body, ft_neg, ft_cat),
              ("negation s1", "category"): fta.probes.delta_cosine(body, ft_neg1, ft_cat)}
overlap = fta.probes.mask_overlap(masks, similarity=similarity)
overlap[["a", "b", "jaccard", "chance_jaccard", "jaccard_ratio", "overlap", "similarity"]].round(4)

# %%
o = overlap.set_index(["a", "b"])
same, other = o.loc[("negation s0", "negation s1")], o.loc[("negation s0", "category")]
assert same["jaccard"] > 10 * same["chance_jaccard"] and other["jaccard"] > other["chance_jaccard"]
assert same["jaccard"] > 2 * other["jaccard"], o

# %% [markdown]
# ## Where does the mask lie?
# Share of the 1% top-|delta| mask per layer and per module type.

# %%
profile = fta.probes.mask_profile(masks["negation s0"], ft_neg)
fig, axes = plt.subplots(1, 2, figsize=(8, 3))
profile.groupby("layer")["share"].sum().plot.bar(ax=axes[0], title="share of the mask per layer")
profile.groupby("module")["share"].sum().sort_values().plot.barh(ax=axes[1], title="share per module type")
fig.tight_layout()
profile.groupby("module")[["selected", "total"]].sum().assign(density=lambda f: f["selected"] / f["total"]).round(4)

# %%
# NBVAL_IGNORE_OUTPUT
timings["total"] = time.perf_counter() - started
pd.Series(timings).round(1)
