# %% [markdown]
# # 02 · Intruder dimensions: does LoRA change a pretrained model differently from full fine-tuning?
#
# **The question.** LoRA and full fine-tuning can reach the same accuracy on a task. Do they get there
# with the same kind of weight change? Shuttleworth et al., *LoRA vs Full Fine-tuning: An Illusion of
# Equivalence* (arXiv 2410.21228) say no. Take the SVD of a pretrained matrix `W0` and of its fine-tuned
# version `W1`. A top-k singular vector of `W1` is an **intruder dimension** when its largest |cosine| with
# every singular vector of `W0` is below `eps` (k = 10, eps = 0.5). The paper reports four findings:
#
# 1. LoRA creates intruder dimensions and full fine-tuning almost never does.
# 2. There are more of them with a larger alpha or learning rate, and fewer at high rank.
# 3. Models with more intruders forget more of what they knew.
# 4. Scaling the top intruder of each matrix down keeps the target accuracy and lowers the forgetting.
#
# **The setting.** The premise is a capable pretrained model that a fine-tune changes only a little.
# all-MiniLM-L6-v2 (`fta.zoo.load("minilm")`) is such a model: a 6-layer BERT sentence encoder with 22.7M
# parameters. We add a mean-pooled linear head (`fta.zoo.EncoderClassifier`). The target task is
# `sentiment_negation`: the sentiment of "the movie was (not) delightful .", built from words of the VADER
# lexicon. Train and test words are disjoint. On the tiny zoo decoder the premise fails: even full
# fine-tuning creates intruders there (see the reference notes), so this notebook uses MiniLM.
#
# **Forgetting.** The fine-tune trains only sentiment, but MiniLM knows more about these sentences. We
# measure three things it was never trained on here:
# - **Retention probe.** A fresh linear probe on the pooled embedding predicts the category of the
#   sentence's subject (food, media, place or person). Pretrained MiniLM gets it almost perfectly.
# - **Paraphrase retrieval.** For "the pizza was not awful ." the nearest neighbour among the other
#   phrasings should be "i think the pizza is not awful ." (top-1 accuracy). Retrieving paraphrases is what
#   the sentence encoder was trained for.
# - **Similarity drift.** The mean change in pairwise cosine similarities on held-out sentences.

# %%
import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import ftanalysis as fta
from ftanalysis.probes.forgetting import fit_logistic
from ftanalysis.probes.spectral_plots import (
    intruders_vs_eps_table,
    plot_cos_heatmap,
    plot_intruders_vs_eps,
    plot_intruders_vs_k,
    plot_lambda_tradeoff,
    plot_layer_bars,
)
from ftanalysis.tasks.sentences import SUBJECTS, TEMPLATES, sentiment_words

S = fta.notebook.setup(seed=0)
K, EPS = 10, 0.5  # the paper's defaults
STEPS = S.pick(ci=300, full=1000)
EVAL_N = S.pick(ci=512, full=2048)
PROBE_N = S.pick(ci=256, full=2048)  # sentences to fit / test the retention probe
PAIRS_N = S.pick(ci=128, full=1024)  # paraphrase pairs
pd.set_option("display.precision", 3)

# %% [markdown]
# ## The base model, the target task and the forgetting measures
# The full fine-tune uses the configuration that notebooks 02, 03 and 06 share: the same base name, task,
# method and hyper-parameters. `fta.cached_finetune` therefore trains it once per run.

# %%
body, tok = fta.zoo.load("minilm")
base = fta.zoo.EncoderClassifier(body, 2, seed=0).eval()
BASE_NAME = "minilm+head2(seed=0)"
target = fta.tasks.make("sentiment_negation")
subject = fta.tasks.make("subject_category")
for ex in target.examples(3):
    print(f"{ex.prompt!r:42} -> {ex.answer}")


@torch.no_grad()
def embed(model, texts, batch_size=128):
    """Pooled sentence embeddings of the model's encoder [n, 384]."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start : start + batch_size], padding=True, return_tensors="pt")
        out.append(model.embed(enc["input_ids"], enc["attention_mask"]))
    return torch.cat(out)


def paraphrase_pairs(n, seed=0):
    """n distinct (subject, held-out word, negation) contents, each written with two different templates."""
    rng = np.random.default_rng(seed)
    words = [w for w, _ in sentiment_words()["test"]]
    subjects = [s for group in SUBJECTS.values() for s in group]
    contents = set()
    while len(contents) < n:
        contents.add((subjects[rng.integers(len(subjects))], words[rng.integers(len(words))], bool(rng.integers(2))))
    a, b = [], []
    for s, w, neg in sorted(contents):
        t1, t2 = rng.choice(len(TEMPLATES), size=2, replace=False)
        a.append(TEMPLATES[t1].format(s=s, neg="not " if neg else "", w=w))
        b.append(TEMPLATES[t2].format(s=s, neg="not " if neg else "", w=w))
    return a, b


probe_train = subject.examples(PROBE_N, "train")
probe_test = subject.examples(PROBE_N, "test")
probe_y = {split: torch.tensor([subject.labels.index(e.answer) for e in exs]) for split, exs in (("train", probe_train), ("test", probe_test))}
pairs_a, pairs_b = paraphrase_pairs(PAIRS_N)
print(f"paraphrase pair: {pairs_a[0]!r} / {pairs_b[0]!r}")


def normalize(x):
    return torch.nn.functional.normalize(x, dim=-1)


base_a = normalize(embed(base, pairs_a))
base_sim = base_a @ base_a.T


def measure(model):
    """Target accuracy and the three forgetting measures of one model."""
    x_train = embed(model, [e.prompt for e in probe_train])
    x_test = embed(model, [e.prompt for e in probe_test])
    w, b = fit_logistic(x_train, probe_y["train"], subject.n_classes, seed=0)
    retention = float(((x_test @ w.T + b).argmax(-1) == probe_y["test"]).float().mean())
    za, zb = normalize(embed(model, pairs_a)), normalize(embed(model, pairs_b))
    retrieval = float(((za @ zb.T).argmax(-1) == torch.arange(len(za))).float().mean())
    off = ~torch.eye(len(za), dtype=torch.bool)
    drift = float((za @ za.T - base_sim)[off].abs().mean())
    return {"target_accuracy": target.evaluate(model, tok, n=EVAL_N)["accuracy"], "retention": retention, "retrieval": retrieval, "drift": drift}


t0 = time.perf_counter()
base_scores = measure(base)
print(f"pretrained MiniLM (+ untrained head): {base_scores}  [{time.perf_counter() - t0:.1f}s]")

# %% [markdown]
# ## The fine-tunes
# Every run trains for the same number of steps (batch 32) with the new head trained densely, as in the
# paper. The runs:
#
# - **Full fine-tuning** at lr 5e-5 (the shared run).
# - **LoRA r = 8, alpha = 16 (alpha = 2r, as the paper prescribes).**
#   - At lr 3e-4, the usual setting.
#   - At lr 3e-3, a large effective step (alpha * lr = 0.048, the regime in which the paper finds intruders).
#     Earlier measurements on MiniLM found intruders only there.
# - **LoRA r = 64, alpha = 128 at lr 3e-3.** The same scale alpha / r = 2 and the same learning rate at 8x
#   the rank. The paper predicts fewer intruders at high rank.
#
# `FTA_SCALE=full` adds ranks 1, 4, 16, rsLoRA and a fixed alpha = 8.

# %%
RUNS = {"full": (fta.methods.Full(), 5e-5)}
RUNS.update(
    S.pick(
        ci={
            "lora r=8 lr=3e-4": (fta.methods.LoRA(r=8, alpha=16), 3e-4),
            "lora r=8 lr=3e-3": (fta.methods.LoRA(r=8, alpha=16), 3e-3),
            "lora r=64 lr=3e-3": (fta.methods.LoRA(r=64, alpha=128), 3e-3),
        },
        full={
            "lora r=8 lr=3e-4": (fta.methods.LoRA(r=8, alpha=16), 3e-4),
            "lora r=8 lr=1e-3": (fta.methods.LoRA(r=8, alpha=16), 1e-3),
            "lora r=8 lr=3e-3": (fta.methods.LoRA(r=8, alpha=16), 3e-3),
            "lora r=1 lr=3e-3": (fta.methods.LoRA(r=1, alpha=2), 3e-3),
            "lora r=4 lr=3e-3": (fta.methods.LoRA(r=4, alpha=8), 3e-3),
            "lora r=16 lr=3e-3": (fta.methods.LoRA(r=16, alpha=32), 3e-3),
            "lora r=64 lr=3e-3": (fta.methods.LoRA(r=64, alpha=128), 3e-3),
            "rslora r=64 lr=3e-3": (fta.methods.LoRA(r=64, alpha=16, rslora=True), 3e-3),
            "lora r=64 alpha=8 lr=3e-3": (fta.methods.LoRA(r=64, alpha=8), 3e-3),
        },
    )
)
BIG = "lora r=8 lr=3e-3"  # the large-step LoRA run the causal test uses

models, rows = {}, []
for label, (method, lr) in RUNS.items():
    t0 = time.perf_counter()
    ft, history = fta.cached_finetune(BASE_NAME, base, tok, target, method, steps=STEPS, lr=lr, batch_size=32, seed=0)
    seconds = time.perf_counter() - t0
    models[label] = ft
    rows.append({"run": label, "lr": lr, "seconds": seconds, **measure(ft)})
runs = pd.DataFrame(rows).set_index("run")
runs.loc["pretrained"] = {"lr": 0.0, "seconds": 0.0, **base_scores}
runs

# %% [markdown]
# `seconds` is the wall time of each fine-tune, or of loading it when the cache already held it. The
# LoRA runs at lr 3e-3 are the ones whose target accuracy matters below: they reach the accuracy of full
# fine-tuning within a few points.

# %% [markdown]
# ## Spectral reports: intruders per matrix
# `fta.probes.spectral_report(base, ft)` compares every attention and MLP matrix of the body: 6 layers x
# (q, k, v, o, up, down) = 36 matrices. For each one it reports the intruders among the top k = 10 singular
# vectors at eps = 0.5, with the left singular vectors as in the paper. It also records each top vector's
# max |cos|, so the sweeps over eps and k below need no new SVD. The base's SVDs are cached, so each
# further report costs only the fine-tune's own decompositions.
#
# **Two controls.**
# - The base compared with itself.
# - A dense random perturbation: every matrix gets Gaussian noise with the same Frobenius norm as the full
#   fine-tune's update to that matrix.

# %%
view0, view_full = fta.nn.ModelView(base), fta.nn.ModelView(models["full"])
noisy = copy.deepcopy(base)
view_noisy, generator = fta.nn.ModelView(noisy), torch.Generator().manual_seed(0)
for name in view0.matrix_names():
    W0 = view0.get(name)
    noise = torch.randn(W0.shape, generator=generator)
    view_noisy.set(name, W0 + noise * (view_full.get(name) - W0).norm() / noise.norm())

t0 = time.perf_counter()
reports = {"base vs itself": fta.probes.spectral_report(base, base, k=K, eps=EPS), "dense noise (||dW|| of full)": fta.probes.spectral_report(base, noisy, k=K, eps=EPS)}
reports.update({label: fta.probes.spectral_report(base, ft, k=K, eps=EPS) for label, ft in models.items()})
print(f"{len(reports)} spectral reports in {time.perf_counter() - t0:.1f}s")
totals = pd.DataFrame(
    {
        label: {
            "intruders": int(r["intruders"].sum()),
            "matrices with intruders": int((r["intruders"] > 0).sum()),
            "min max|cos|": r["min_max_cos"].min(),
            "mean ||dW||/||W0||": r["dW_rel"].mean(),
            "mean effective rank of dW": r["effective_rank"].mean(),
        }
        for label, r in reports.items()
    }
).T
runs["intruders"] = totals["intruders"].reindex(runs.index).fillna(0).astype(int)
totals

# %% [markdown]
# ## The fingerprint: singular-vector similarity of one matrix
# Below is the matrix where the large-step LoRA run has the most intruders. Each row is one of the top-10
# singular vectors of the fine-tuned matrix, and each column one of the pretrained matrix's singular
# vectors, by rank. Each cell holds their |cosine|.
#
# - **Full fine-tuning** leaves a bright diagonal: every top vector is still a pretrained vector, perhaps
#   slightly rotated or re-ranked.
# - **LoRA** adds dark rows: new directions that are not close to any pretrained vector. These are the
#   intruders, and they sit among the highest-ranked vectors.

# %%
big = reports[BIG]
worst = big.sort_values(["intruders", "min_max_cos"], ascending=[False, True]).iloc[0]["name"]
view_big = fta.nn.ModelView(models[BIG])
res_full = fta.probes.intruder_dimensions(view0.get(worst), view_full.get(worst), k=K, eps=EPS)
res_big = fta.probes.intruder_dimensions(view0.get(worst), view_big.get(worst), k=K, eps=EPS)
fig, axes = plt.subplots(1, 2, figsize=(13, 3.6))
plot_cos_heatmap(res_full, n_base=30, ax=axes[0])
plot_cos_heatmap(res_big, n_base=30, ax=axes[1])
axes[0].set_title(f"full fine-tuning, {worst}: {res_full.count} intruder(s)", fontsize=9)
axes[1].set_title(f"{BIG}, {worst}: {res_big.count} intruder(s) at ranks {list(res_big.ranks)}", fontsize=9)
fig.tight_layout()
print(res_full, res_big, sep="\n")
# the report's fast certified path and the reference SVD agree on this matrix
assert res_big.count == int(big.set_index("name").loc[worst, "intruders"])

# %% [markdown]
# ## Intruders against eps and against k
# These are the paper's Figs. 4 and 15, summed over the 36 matrices. A curve that stays at zero up to a
# high eps means that every top vector of the fine-tuned model is close to some pretrained vector.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
plot_intruders_vs_eps(reports, eps_grid=np.round(np.linspace(0.1, 0.9, 17), 2), k=K, ax=axes[0])
plot_intruders_vs_k(reports, ks=range(1, K + 1), eps=EPS, ax=axes[1])
axes[0].set_title(f"k = {K}", fontsize=9)
axes[1].set_title(f"eps = {EPS}", fontsize=9)
fig.tight_layout()
eps_table = intruders_vs_eps_table(reports, [0.3, 0.5, 0.7, 0.9], k=K).pivot(index="label", columns="eps", values="intruders")
eps_table

# %% [markdown]
# Where the large-step LoRA run's intruders sit, per layer and matrix kind:

# %%
plot_layer_bars(big, "intruders", title=f"{BIG}: intruders per layer (k={K}, eps={EPS})")
fta.probes.summarize_report(big, by="kind")[["kind", "matrices", "intruders", "with_intruders", "min_max_cos", "effective_rank"]]

# %% [markdown]
# ### Claim 1: LoRA at a large step has intruder dimensions; full fine-tuning has (almost) none
# Both controls must give zero. Full fine-tuning must stay near zero. The large-step LoRA run must have
# many intruders while matching the accuracy of full fine-tuning within 5 points.

# %%
n_big, n_full = int(runs.loc[BIG, "intruders"]), int(runs.loc["full", "intruders"])
print(f"intruders: base vs itself {totals.loc['base vs itself', 'intruders']}, dense noise {totals.iloc[1]['intruders']}, "
      f"full {n_full}, {BIG} {n_big}")
print(f"target accuracy: full {runs.loc['full', 'target_accuracy']:.3f}, {BIG} {runs.loc[BIG, 'target_accuracy']:.3f}")
assert totals.loc["base vs itself", "intruders"] == 0
assert totals.iloc[1]["intruders"] == 0  # dense noise as large as the full update: no intruder
assert n_full <= 2
assert n_big >= 10 and n_big >= 5 * (n_full + 1)
assert runs.loc[BIG, "target_accuracy"] >= runs.loc["full", "target_accuracy"] - 0.05
# at eps = 0.9, where every top vector has to be a near copy of a pretrained one, full fine-tuning still
# keeps more of them than the large-step LoRA run
assert eps_table.loc["full", 0.9] < eps_table.loc[BIG, 0.9]

# %% [markdown]
# ### Claim 2: more intruders with a larger learning rate, fewer at high rank
# The learning rate is the first lever. At alpha = 2r and lr 3e-4 LoRA behaves like full fine-tuning. At
# lr 3e-3 it has intruders. The paper's second lever is rank: at the same alpha / r and the same learning
# rate, rank 64 should show fewer intruders than rank 8.

# %%
lever = runs.loc[[label for label in runs.index if label.startswith(("lora", "rslora"))], ["lr", "target_accuracy", "intruders", "retention"]]
lever

# %%
assert runs.loc["lora r=8 lr=3e-4", "intruders"] <= 2 < runs.loc[BIG, "intruders"]
R64 = "lora r=64 lr=3e-3"
print(f"rank 8 vs rank 64 at lr 3e-3: {runs.loc[BIG, 'intruders']} vs {runs.loc[R64, 'intruders']} intruders "
      f"(target {runs.loc[BIG, 'target_accuracy']:.3f} vs {runs.loc[R64, 'target_accuracy']:.3f})")

# %% [markdown]
# RANK_RESULT

# %% [markdown]
# ### Claim 3: the runs with more intruders forget more
# Across the fine-tunes, we rank the forgetting on each measure against the intruder count: the loss of
# retention-probe accuracy, the loss of paraphrase retrieval, and the similarity drift. The paper reports a
# Spearman correlation of 0.971 on RoBERTa, with forgetting measured as masked-LM pseudo-loss. Here there
# are only a few runs at `FTA_SCALE=ci`, so the correlation is descriptive. The assertion compares the
# extremes: the run with the most intruders against full fine-tuning.

# %%
fine_tunes = runs.drop(index="pretrained")
forgetting = pd.DataFrame(
    {
        "intruders": fine_tunes["intruders"],
        "target_accuracy": fine_tunes["target_accuracy"],
        "retention lost": base_scores["retention"] - fine_tunes["retention"],
        "retrieval lost": base_scores["retrieval"] - fine_tunes["retrieval"],
        "drift": fine_tunes["drift"],
    }
)
spearman = forgetting.drop(columns="target_accuracy").corr(method="spearman")["intruders"].drop("intruders")
print("Spearman correlation with the intruder count across runs:", spearman.round(3).to_dict())
forgetting

# %%
most = forgetting["intruders"].idxmax()
print(f"most intruders: {most}")
for column in ["retention lost", "retrieval lost", "drift"]:
    print(f"  {column}: {forgetting.loc[most, column]:.3f} vs full {forgetting.loc['full', column]:.3f}")
# TODO(unverified until executed): keep only the comparisons that hold, and say which do not in the markdown below
assert forgetting.loc[BIG, "retention lost"] > forgetting.loc["lora r=8 lr=3e-4", "retention lost"]

# %% [markdown]
# FORGETTING_RESULT

# %% [markdown]
# ## Claim 4: the causal test, scaling the top intruder
# `fta.probes.scale_intruders(base, ft, lam)` rewrites each matrix that has intruders:
#
#     W' = W0 + dW + (lam - 1) u s v^T
#
# Here `(u, s, v)` is that matrix's top intruder, the paper's intervention. The control
# (`control=True`) scales, by the same `lam`, a random singular direction of the fine-tuned matrix from
# its top 10 that is *not* an intruder. Both use the same matrices and the same number of directions.

# %%
LAMS = S.pick(ci=[0.5], full=[0.0, 0.25, 0.5, 0.75])
rows = [{"direction": d, "lam": 1.0, **runs.loc[BIG, ["target_accuracy", "retention", "retrieval", "drift"]].to_dict()} for d in ("top intruder", "control: non-intruder")]
t0 = time.perf_counter()
for lam in LAMS:
    for direction, control in (("top intruder", False), ("control: non-intruder", True)):
        scaled, info = fta.probes.scale_intruders(base, models[BIG], lam, k=K, eps=EPS, which="top", control=control, seed=0, return_info=True)
        rows.append({"direction": direction, "lam": lam, **measure(scaled)})
print(f"{len(info)} matrices scaled per model; {2 * len(LAMS)} models in {time.perf_counter() - t0:.1f}s")
tradeoff = pd.DataFrame(rows)
plot_lambda_tradeoff(tradeoff, y=("target_accuracy", "retention", "retrieval"))
tradeoff.pivot(index="lam", columns="direction", values=["target_accuracy", "retention", "retrieval"])

# %%
at = tradeoff.set_index(["direction", "lam"])
unscaled, half, ctrl = at.loc[("top intruder", 1.0)], at.loc[("top intruder", 0.5)], at.loc[("control: non-intruder", 0.5)]
print(f"lam=0.5 on the top intruder: target {unscaled.target_accuracy:.3f} -> {half.target_accuracy:.3f}, "
      f"retention {unscaled.retention:.3f} -> {half.retention:.3f}; control: target {ctrl.target_accuracy:.3f}, retention {ctrl.retention:.3f}")
# TODO(unverified until executed): the brief's claim, measured on MiniLM before (target 0.94 -> 0.93, retention 0.74 -> 0.84)
assert half.target_accuracy >= unscaled.target_accuracy - 0.03
assert half.retention > unscaled.retention
assert half.retention - unscaled.retention > ctrl.retention - unscaled.retention  # the control recovers less

# %% [markdown]
# SCALING_RESULT

# %% [markdown]
# ## What this notebook shows, and what it leaves out
# SUMMARY
