# %% [markdown]
# # 04 · Composable sparse fine-tuning: does a task diff plus a language diff add up?
#
# **The question.** Ansell, Ponti, Korhonen and Vulic (ACL 2022, arXiv 2110.07560) learn two *sparse*
# differences from one pretrained model: a **task** diff trained on labelled data in a source language L1, and a
# **language** diff trained by language modelling on unlabelled text of a target language L2. Adding both
# to the pretrained weights, `theta_0 + phi_task + phi_lang`, performs the task in L2 without a single
# labelled L2 example. Sparsity is what lets them add without interfering. Does that hold on a small model?
#
# **The setup.** The zoo's `gpt2-tiny` (2 layers, d_model 64, tied input and output embeddings) knows modular
# addition mod 23 and never saw subtraction. **L2** is L1 with the 23 number words renamed by a fixed
# derangement (a bijective remapping of the vocabulary: `7 - 3 mod 23 =` reads `2 - 10 mod 23 =`).
# - **Task diff**: LT-SFT (Lottery-Ticket Sparse Fine-Tuning, `fta.methods.LTSFT`) on subtraction in L1. Full
#   fine-tuning picks the K entries that moved most, the model rewinds and only those K retrain. Embeddings
#   stay frozen, as in the paper's task diffs.
# - **Language diff**: LT-SFT on L2 text, embeddings included. The text is the arithmetic part of the
#   pretraining mix (addition of every pair, loss on the answer) written in L2. It contains no subtraction.
# - **Dense control**: the same two trainings with full fine-tuning (`fta.methods.Full`; the task one with
#   frozen embeddings), composed the same way.
#
# With tied embeddings there is an exact language diff: move each number word's embedding row to its L2 name.
# It has 23 x 64 = 1,472 entries, about 1.2% of the model. We use it as the **oracle**: it shows what a
# language diff that composes looks like, and how many entries K it needs. The zero-shot test is subtraction
# written in L2, scored against L2 answers.

# %%
import random
import time
from dataclasses import dataclass
from typing import ClassVar

import matplotlib.pyplot as plt
import pandas as pd

import ftanalysis as fta
from ftanalysis.methods.sparse import SparseDiff
from ftanalysis.tasks import Example, Task

S = fta.notebook.setup(seed=0, threads=1)  # one thread: the fastest for a 0.1 M-parameter model
STEPS = S.pick(ci=600, full=3000)  # per fine-tune (LT-SFT: half full fine-tuning, half sparse retraining)
EVAL_N = S.pick(ci=512, full=2048)
K_TASK = 0.05  # task diff: 5% of the maskable (non-embedding) entries
K_LANG = 1472  # language diff: as many entries as the oracle
K_SWEEP = S.pick(ci=[1472, 5888], full=[184, 368, 736, 1472, 2944, 5888, 11776])  # LT-SFT language diffs
timings = {}
started = time.perf_counter()

# %% [markdown]
# ## L2: the same language with the number words renamed
# `InL2` wraps any task and renames the words of its prompts and answers (the splits follow the L1 example,
# so they stay disjoint).

# %%
NUMBERS = [str(i) for i in range(23)]
rng = random.Random(0)
renamed = NUMBERS[:]
while any(a == b for a, b in zip(renamed, NUMBERS)):  # a derangement: every number word changes
    rng.shuffle(renamed)
L2_WORDS = tuple(zip(NUMBERS, renamed))


@dataclass(frozen=True)
class InL2(Task):
    """``inner`` with every word renamed by ``mapping``."""

    inner: Task = None
    mapping: tuple = ()

    name: ClassVar[str] = "in_l2"

    def _rename(self, ex):
        table = dict(self.mapping)
        return Example(*(" ".join(table.get(w, w) for w in s.split()) for s in (ex.prompt, ex.answer)))

    def sample(self, rng):
        return self._rename(self.inner.sample(rng))

    def _draw(self, rng, split):
        return self._rename(self.inner._draw(rng, split))

    @property
    def chance(self):
        return self.inner.chance

    @property
    def memorization(self):
        return self.inner.memorization


model, tok = fta.zoo.load("gpt2-tiny")
sub_l1 = fta.tasks.make("modular_arithmetic", op="-", modulus=23)
add_l1 = fta.tasks.make("modular_arithmetic", op="+", modulus=23)
sub_l2, add_l2 = InL2(inner=sub_l1, mapping=L2_WORDS), InL2(inner=add_l1, mapping=L2_WORDS)
# the language text: the pretraining mix's arithmetic component (every pair), written in L2
text_l2 = InL2(inner=fta.tasks.make("modular_arithmetic", op="+", modulus=23, holdout=False), mapping=L2_WORDS)
for t in (sub_l1, sub_l2, text_l2):
    ex = t.examples(1, "train")[0]
    print(f"{'L2 text' if t is text_l2 else t.name:20} {ex.prompt!r} -> {ex.answer!r}")

PROBES = {"subtraction L1": sub_l1, "subtraction L2": sub_l2, "addition L1": add_l1, "addition L2": add_l2}
NAMES = list(dict(model.named_parameters()))  # the tied output head counted once
EMB = "transformer.wte.weight"
N_PARAMS = sum(p.numel() for p in model.parameters())  # 125,504
CHANCE = sub_l1.chance


def scores(diff) -> dict:
    m = diff.apply_to(model, copy=True) if diff is not None else model
    return {k: t.evaluate(m, tok, n=EVAL_N)["accuracy"] for k, t in PROBES.items()}


def train(method, task, lr) -> SparseDiff:
    """Fine-tune the pretrained model and return its difference as a SparseDiff (dense for Full)."""
    tuned, _ = fta.cached_finetune("gpt2-tiny", model, tok, task, method, steps=STEPS, lr=lr, batch_size=64, seed=0)
    return SparseDiff.between(model, tuned, names=NAMES)


rows = {"pretrained": scores(None)}
print(f"chance: {CHANCE:.3f}")
pd.DataFrame(rows).T.round(3)

# %% [markdown]
# ## The oracle language diff
# `SparseDiff.from_dense` keeps the nonzero entries: the 23 moved rows. Alone it makes the model fluent in L2
# (and, since the rows moved, no longer in L1). Added to a task diff trained in L1 (below), it should carry the
# task into L2.

# %%
E = model.get_input_embeddings().weight.detach()
moved = E.clone()
for l1, l2 in L2_WORDS:
    moved[tok.convert_tokens_to_ids(l2)] = E[tok.convert_tokens_to_ids(l1)]
oracle = SparseDiff.from_dense({EMB: moved - E})
print(oracle)

# %% [markdown]
# ## Train the four diffs and compose them
# `SparseDiff` stores indices and values per tensor; `+` adds two diffs and `apply_to` adds one to a model.
# The task's LT-SFT uses lr 3e-3 (at 1e-3 it reached 0.48 on L1 subtraction in 600 steps); everything else
# uses 1e-3.

# %%
t0 = time.perf_counter()
diffs = {
    "task sparse": train(fta.methods.LTSFT(density=K_TASK), sub_l1, lr=3e-3),
    "task dense": train(fta.methods.Full(freeze_embeddings=True), sub_l1, lr=1e-3),
    "lang sparse": train(fta.methods.LTSFT(count=K_LANG, exclude_embeddings=False), text_l2, lr=1e-3),
    "lang dense": train(fta.methods.Full(), text_l2, lr=1e-3),
    "lang oracle": oracle,
}
timings["four fine-tunes"] = time.perf_counter() - t0
pd.DataFrame([{"diff": k, "nnz": d.nnz, "% of the model": 100 * d.nnz / N_PARAMS} for k, d in diffs.items()]).set_index("diff").round(2)

# %%
combos = {
    "task sparse": diffs["task sparse"],
    "task dense": diffs["task dense"],
    "lang sparse": diffs["lang sparse"],
    "lang dense": diffs["lang dense"],
    "lang oracle": oracle,
    "task + lang sparse": diffs["task sparse"] + diffs["lang sparse"],
    "task + lang dense": diffs["task dense"] + diffs["lang dense"],
    "task sparse + oracle": diffs["task sparse"] + oracle,
    "task dense + oracle": diffs["task dense"] + oracle,
}
t0 = time.perf_counter()
for label, diff in combos.items():
    rows[label] = scores(diff)
timings["evaluations"] = time.perf_counter() - t0
table = pd.DataFrame(rows).T
table.round(3)

# %%
fig, ax = plt.subplots(figsize=(8, 3.4))
table[["subtraction L1", "subtraction L2", "addition L2"]].plot.bar(ax=ax, rot=30)
ax.axhline(CHANCE, color="grey", ls=":", lw=1, label="chance")
ax.set_ylabel("accuracy")
ax.set_title("task diff (L1 subtraction) + language diff (L2 text)")
ax.legend(fontsize=7)
plt.setp(ax.get_xticklabels(), ha="right", fontsize=8)
fig.tight_layout()

# %% [markdown]
# **Claim (the mechanism).** The oracle language diff composes. With the sparse task diff the sum does
# subtraction in L2 at 0.75, with the dense one at 0.93 (chance 0.04). Each part alone is at or below 0.06:
# the task diff computes with the L1 meanings of the words, the oracle knows L2 but not subtraction.
#
# **Claim (the paper's recipe): did not hold here.** The dense language diff learns L2 (addition in L2
# 0.99). But its sum with the dense task diff is at 0.05 on L2 subtraction, and L1 subtraction falls from
# 0.95 to 0.08. The LT-SFT language diff, at the oracle's size, does not even learn L2 (0.09), and its sum is
# at 0.02. The sparse sum does keep more of the task in L1 than the dense sum (0.33 against 0.08). Part of
# that is less interference, and part is a language diff that learned little.
#
# This is the setting where the premise went furthest. Other settings we measured (not re-run here):
# - The whole pretraining mix in L2, with loss on every word: L2 addition 0.02 after
#   300 steps.
# - Learning rates of 3e-3 and 1e-2 did not help.
# - LT-SFT language diffs of up to 10% of the model, with or without embeddings, trained for 900 steps: L2
#   addition stayed below 0.2.
# - A three-word L2 (new words for `+`, `mod` and `=`): the dense diff learned it in 300 steps, but its sums
#   with either task diff stayed at or below 0.14 on L2 subtraction.

# %%
t = table
assert t.loc["pretrained", "subtraction L1"] < 0.1 and t.loc["pretrained", "addition L2"] < 0.1, t
assert t.loc["task sparse", "subtraction L1"] > 0.6 and t.loc["task dense", "subtraction L1"] > 0.8, t
# the oracle: fluent in L2 alone, and its sum with either task diff does L2 subtraction
assert t.loc["lang oracle", "addition L2"] > 0.95, t
for task in ("task sparse", "task dense"):
    summed = t.loc[f"{task} + oracle", "subtraction L2"]
    assert summed > 0.6 and summed > max(t.loc[task, "subtraction L2"], t.loc["lang oracle", "subtraction L2"]) + 0.5, t
# the learned language diffs: dense learns L2, LT-SFT does not (measured), and neither sum transfers
assert t.loc["lang dense", "addition L2"] > 0.8, t
assert t.loc["lang sparse", "addition L2"] < 0.2, t
assert t.loc["task + lang sparse", "subtraction L2"] < 3 * CHANCE, t
assert t.loc["task + lang dense", "subtraction L2"] < 3 * CHANCE, t
# interference in L1: the sparse sum keeps more of the task than the dense sum
assert t.loc["task + lang sparse", "subtraction L1"] > t.loc["task + lang dense", "subtraction L1"] + 0.2, t

# %% [markdown]
# ## Where did the LT-SFT language diff put its entries?
# LT-SFT keeps the K entries that moved most in its full fine-tuning phase. The oracle needs all of them in
# the 23 number-word rows. The table counts the entries of each diff by where they lie. "Absent-word rows" are
# the rows of the embedding/output matrix whose word never occurs in the L2 text.

# %%
number_ids = {tok.convert_tokens_to_ids(w) for w in NUMBERS}
present_ids = set(number_ids) | set(tok("+ mod 23 =")["input_ids"])


def where(diff) -> dict:
    emb_rows = (diff.indices[EMB] // E.shape[1]).tolist() if EMB in diff.indices else []
    n_numbers = sum(r in number_ids for r in emb_rows)
    n_absent = sum(r not in present_ids for r in emb_rows)
    return {"number-word rows": n_numbers, "absent-word rows": n_absent,
            "other embedding rows": len(emb_rows) - n_numbers - n_absent, "blocks and positions": diff.nnz - len(emb_rows)}


placement = pd.DataFrame({k: where(diffs[k]) for k in ("lang oracle", "lang sparse", "lang dense")}).T
placement

# %%
dense_emb = diffs["lang dense"].to_dense(EMB).abs().mean(1)
absent = [i for i in range(E.shape[0]) if i not in present_ids]
print(f"mean |delta| of the dense language diff: number-word rows {dense_emb[sorted(number_ids)].mean():.3f}, "
      f"absent-word rows {dense_emb[absent].mean():.3f}; the oracle moves number-word rows by "
      f"{oracle.to_dense(EMB).abs().mean(1)[sorted(number_ids)].mean():.3f}")

# %% [markdown]
# The LT-SFT language diff puts 48 of its 1,472 entries in the number-word rows and 950 in absent-word rows.
# Full fine-tuning learns L2 but barely moves the number-word rows (0.03 per entry against the oracle's 0.21):
# it learns L2 in the blocks. Meanwhile the rows of words absent from the L2 text drift. Their only gradient
# is the small softmax push away from them, of constant sign, and AdamW moves every such entry at its full
# step size. LT-SFT's ranking by |delta| then spends most of its budget on that drift. The official LT-SFT
# code adds an L1 penalty towards `theta_0`, which `fta.methods.LTSFT` does not implement. In a quick test
# here (full fine-tuning plus 1e-4 x sum |delta|) that penalty stopped the drift, but the number-word rows
# still moved no more than above. The oracle's route, moving those rows, is the one that composes.

# %%
assert placement.loc["lang oracle", "number-word rows"] == 1472
assert placement.loc["lang sparse", "number-word rows"] < 0.1 * K_LANG, placement
assert placement.loc["lang sparse", "absent-word rows"] > 0.3 * K_LANG, placement
assert dense_emb[absent].mean() > dense_emb[sorted(number_ids)].mean()

# %% [markdown]
# ## How much do the diffs overlap?
# Entries changed by both diffs, against the overlap expected of random diffs of the same sizes. The oracle
# and the task diffs share nothing: the task diffs exclude embeddings.

# %%
n_total = diffs["task dense"].numel
rows_o = []
for kind in ("sparse", "dense", "oracle"):
    a, b = diffs["task sparse" if kind == "oracle" else f"task {kind}"], diffs[f"lang {kind}"]
    rows_o.append({"language diff": kind, "task nnz": a.nnz, "lang nnz": b.nnz, "shared": a.overlap(b),
                   "chance shared": a.nnz * b.nnz / n_total})
overlap = pd.DataFrame(rows_o).set_index("language diff")
overlap.round(1)

# %%
assert overlap.loc["oracle", "shared"] == 0
assert overlap.loc["sparse", "shared"] < 2 * overlap.loc["sparse", "chance shared"] + 10, overlap

# %% [markdown]
# ## The effect of K
# Two sweeps over the size K of the language diff, each composed with the same sparse task diff:
# - the **oracle cut to its K largest entries** (no training), below and at its 1,472: how many entries does
#   L2 need?
# - **LT-SFT retrained** at the oracle's size and four times it (at full scale, from 184 to 11,776).

# %%
def top_k(diff, k):
    keep = diff.values[EMB].abs().topk(k).indices
    return SparseDiff({EMB: diff.indices[EMB][keep]}, {EMB: diff.values[EMB][keep]}, {EMB: diff.shapes[EMB]})


t0 = time.perf_counter()
rows_k = []
for k in sorted({184, 368, 736, 1104, 1472} | set(K_SWEEP)):
    candidates = {"oracle, top K": top_k(oracle, k) if k <= 1472 else None}
    if k in K_SWEEP:
        candidates["LT-SFT"] = diffs["lang sparse"] if k == K_LANG else train(
            fta.methods.LTSFT(count=k, exclude_embeddings=False), text_l2, lr=1e-3)
    for kind, lang_d in candidates.items():
        if lang_d is None:
            continue
        alone, composed = scores(lang_d), scores(diffs["task sparse"] + lang_d)
        rows_k.append({"language diff": kind, "K": k, "alone, addition L2": alone["addition L2"],
                       "composed, subtraction L2": composed["subtraction L2"],
                       "composed, subtraction L1": composed["subtraction L1"],
                       "number-word rows": where(lang_d)["number-word rows"]})
timings["K sweep"] = time.perf_counter() - t0
by_k = pd.DataFrame(rows_k).set_index(["language diff", "K"])
by_k.round(3)

# %%
fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.2), sharey=True)
for ax, col in zip(axes, ("alone, addition L2", "composed, subtraction L2")):
    for kind, marker in (("oracle, top K", "o"), ("LT-SFT", "s")):
        part = by_k.loc[kind][col]
        ax.plot(part.index, part.values, marker=marker, label=f"{kind} language diff")
    ax.axvline(1472, color="grey", ls="--", lw=0.8, label="oracle size (1,472)")
    ax.axhline(CHANCE, color="grey", ls=":", lw=1, label="chance")
    ax.set_xscale("log")
    ks = sorted(by_k.index.get_level_values("K").unique())
    ax.set_xticks(ks, [str(k) for k in ks], fontsize=7, rotation=45)
    ax.minorticks_off()
    ax.set_xlabel("K, entries of the language diff")
    ax.set_title(col, fontsize=9)
axes[0].set_ylabel("accuracy")
axes[1].legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# **Claim.** K matters, but only on the right entries. A quarter of the oracle's entries carries little into
# L2 (0.16 on L2 subtraction), half carries part of the task (0.41), three quarters as much as the whole
# (0.79 and 0.75). LT-SFT learns no L2 at the oracle's size or at four times it, and its sum with the task
# stays near chance in L2. The larger LT-SFT diff also costs more of the task in L1 (0.14 against 0.33).

# %%
oracle_k = by_k.loc["oracle, top K"]
assert oracle_k.loc[1472, "composed, subtraction L2"] > oracle_k.loc[368, "composed, subtraction L2"] + 0.4, oracle_k
assert oracle_k.loc[368, "composed, subtraction L2"] < 0.3 and oracle_k.loc[1104, "composed, subtraction L2"] > 0.6, oracle_k
assert (by_k.loc["LT-SFT", "composed, subtraction L2"] < 3 * CHANCE).all(), by_k
assert (by_k.loc["LT-SFT", "alone, addition L2"] < 0.3).all(), by_k
lt = by_k.loc["LT-SFT"]
assert lt.loc[max(K_SWEEP), "composed, subtraction L1"] < lt.loc[K_LANG, "composed, subtraction L1"], lt

# %% [markdown]
# ## Summary
# - **Holds:** a sparse language diff *can* compose with a task diff on this model. The oracle (1,472
#   embedding entries, disjoint from the task diff) turns L1 subtraction into L2 subtraction with either task
#   diff. Cut to a quarter of its entries, it fails.
# - **Does not hold here:** learning that diff. Dense fine-tuning learns L2 but hardly moves the number-word
#   rows, and its sum with the task is near chance in L2. LT-SFT's language diff spends its budget on
#   embedding rows that drift under AdamW and learns no L2 at any K we tried. The zero-shot transfer needs a
#   language diff that acts where the task diff does not read. Neither learned diff is one here.
# - **Interference:** the sparse sum keeps more of the L1 task than the dense sum.

# %%
# NBVAL_IGNORE_OUTPUT
timings["total"] = time.perf_counter() - started
pd.Series(timings).round(1)
