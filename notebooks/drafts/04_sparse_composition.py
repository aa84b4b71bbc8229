# %% [markdown]
# # 04 · Composable sparse fine-tuning: a task diff and a language diff that add up
#
# **The question.** Ansell, Ponti, Korhonen and Vulic (ACL 2022, arXiv 2110.07560) learn two *sparse*
# differences from one pretrained model: a **task** diff trained on labelled data in a source language L1, and a
# **language** diff trained by plain language modelling on unlabelled text of a target language L2. Adding both
# to the pretrained weights, `theta_0 + phi_task + phi_lang(L2)`, performs the task in L2 without a single
# labelled L2 example. Sparsity is what lets them add without interfering. Does that hold on a small model?
#
# **The setup.** The zoo's `gpt2-tiny` (2 layers, d_model 64) knows modular addition and never saw
# subtraction. L1 is its own vocabulary. **L2** is the same "language" with the 23 number words renamed by a
# fixed permutation (a bijective remapping of the vocabulary: `7 - 3 mod 23 = 4` reads `14 - 2 mod 23 = 9`).
# - **Task diff**: LT-SFT (Lottery-Ticket Sparse Fine-Tuning; `fta.methods.LTSFT`) on modular subtraction in
#   L1: full fine-tuning picks the K entries that moved most, the model rewinds and only those K retrain.
#   Embeddings stay frozen, as in the paper's task SFTs.
# - **Language diff**: LT-SFT on unlabelled L2 text (the pretraining mix rewritten in L2, next-word loss on
#   every word), with the embeddings maskable: a language is mostly its words.
# - **Dense control**: the same two trainings with full fine-tuning (`fta.methods.Full`), composed the same way.
#
# The zero-shot test: subtraction written in L2, scored against L2 answers.

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
STEPS = S.pick(ci=300, full=2000)  # per fine-tune (LT-SFT: half full fine-tuning, half sparse retraining)
EVAL_N = S.pick(ci=512, full=2048)
DENSITIES = S.pick(ci=[0.002, 0.01, 0.05], full=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1])  # of the language diff
K_MAIN = 0.01
timings = {}
started = time.perf_counter()

# %% [markdown]
# ## L2: the same language with the number words renamed
# `InL2` wraps any task and rewrites its prompts and answers word by word. With `as_text=True` an example
# becomes unlabelled text: the first word is the prompt and the loss covers every following word.

# %%
NUMBERS = [str(i) for i in range(23)]
rng = random.Random(0)
renamed = NUMBERS[:]
while any(a == b for a, b in zip(renamed, NUMBERS)):  # a derangement: every number word changes
    rng.shuffle(renamed)
L2_WORDS = tuple(zip(NUMBERS, renamed))


@dataclass(frozen=True)
class InL2(Task):
    """``inner`` with every word renamed by ``mapping`` (splits follow the L1 example, so they stay disjoint)."""

    inner: Task = None
    mapping: tuple = ()
    as_text: bool = False

    name: ClassVar[str] = "in_l2"

    def _rename(self, ex: Example) -> Example:
        table = dict(self.mapping)
        prompt = " ".join(table.get(w, w) for w in ex.prompt.split())
        answer = " ".join(table.get(w, w) for w in ex.answer.split())
        if self.as_text:
            words = f"{prompt} {answer}".split()
            return Example(prompt=words[0], answer=" ".join(words[1:]))
        return Example(prompt=prompt, answer=answer)

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
text_l2 = InL2(inner=fta.tasks.make("pretraining_mix"), mapping=L2_WORDS, as_text=True)
for t in (sub_l1, sub_l2):
    ex = t.examples(1)[0]
    print(f"{t.name:20} {ex.prompt!r} -> {ex.answer!r}")
print("L2 text:", repr(text_l2.examples(1, "train")[0].prompt + " " + text_l2.examples(1, "train")[0].answer))

PROBES = {"subtraction L1": sub_l1, "subtraction L2": sub_l2, "addition L1": add_l1, "addition L2": add_l2}
NAMES = list(dict(model.named_parameters()))  # the tied output head counted once


def scores(m) -> dict:
    return {k: t.evaluate(m, tok, n=EVAL_N)["accuracy"] for k, t in PROBES.items()}


def train(method, task) -> SparseDiff:
    """Fine-tune the pretrained model and return its difference as a SparseDiff (dense for Full)."""
    tuned, _ = fta.cached_finetune("gpt2-tiny", model, tok, task, method, steps=STEPS, lr=1e-3, batch_size=64, seed=0)
    return SparseDiff.between(model, tuned, names=NAMES)


rows = [{"model": "pretrained", **scores(model)}]
pd.DataFrame(rows).set_index("model").round(3)

# %% [markdown]
# ## Train the four diffs and compose them
# `SparseDiff` stores indices and values per tensor; `+` adds two diffs and `apply_to` adds one to a model.

# %%
t0 = time.perf_counter()
diffs = {
    "task sparse": train(fta.methods.LTSFT(density=K_MAIN), sub_l1),
    "lang sparse": train(fta.methods.LTSFT(density=K_MAIN, exclude_embeddings=False), text_l2),
    "task dense": train(fta.methods.Full(), sub_l1),
    "lang dense": train(fta.methods.Full(), text_l2),
}
timings["four fine-tunes"] = time.perf_counter() - t0
pd.DataFrame([{"diff": k, "nnz": d.nnz, "density": d.density} for k, d in diffs.items()]).set_index("diff")

# %%
models = {
    "task sparse": diffs["task sparse"],
    "lang sparse": diffs["lang sparse"],
    "task + lang sparse": diffs["task sparse"] + diffs["lang sparse"],
    "task dense": diffs["task dense"],
    "lang dense": diffs["lang dense"],
    "task + lang dense": diffs["task dense"] + diffs["lang dense"],
}
for label, diff in models.items():
    rows.append({"model": label, **scores(diff.apply_to(model, copy=True))})
table = pd.DataFrame(rows).set_index("model")
print(f"chance: {sub_l1.chance:.3f}")
table.round(3)

# %%
fig, ax = plt.subplots(figsize=(7, 3.2))
table[["subtraction L1", "subtraction L2", "addition L2"]].plot.bar(ax=ax, rot=20)
ax.axhline(sub_l1.chance, color="grey", ls=":", lw=1, label="chance")
ax.set_ylabel("accuracy")
ax.set_title("task diff (L1 subtraction) + language diff (L2 text)")
ax.legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# **Claim.** Neither diff alone does subtraction in L2: the task diff computes with the L1 meaning of the
# words, the language diff knows L2 but not subtraction. Their sum does it zero-shot, far above chance and
# above either part. The language diff also carries what the model already knew into L2 (addition).
# The sparse sum keeps more of each skill than the dense sum: dense diffs overlap everywhere and interfere.

# %%
t = table
margin = 5 * sub_l1.chance  # five times chance
assert t.loc["task sparse", "subtraction L1"] > 0.5, t
assert t.loc["lang sparse", "addition L2"] > t.loc["pretrained", "addition L2"] + 0.3, t
assert t.loc["task + lang sparse", "subtraction L2"] > margin, t
assert t.loc["task + lang sparse", "subtraction L2"] > max(t.loc["task sparse", "subtraction L2"], t.loc["lang sparse", "subtraction L2"]) + 0.2, t
assert t.loc["task + lang sparse", "subtraction L2"] > t.loc["task + lang dense", "subtraction L2"], t

# %% [markdown]
# ## How much do the diffs overlap?
# Entries changed by both diffs, against the overlap expected of random diffs of the same sizes.

# %%
n_total = diffs["task dense"].numel
rows_o = []
for kind in ("sparse", "dense"):
    a, b = diffs[f"task {kind}"], diffs[f"lang {kind}"]
    rows_o.append({"kind": kind, "task nnz": a.nnz, "lang nnz": b.nnz, "shared": a.overlap(b),
                   "chance shared": a.nnz * b.nnz / n_total})
pd.DataFrame(rows_o).set_index("kind").round(1)

# %% [markdown]
# ## The effect of K
# The language diff must rename 23 words, whose embedding rows alone hold 23 x 64 = 1,472 entries (the output
# head is tied to them). Retrain it at several densities K (a fraction of the maskable entries) and compose
# each with the same task diff.

# %%
t0 = time.perf_counter()
rows_k = []
for density in DENSITIES:
    lang_d = diffs["lang sparse"] if density == K_MAIN else train(fta.methods.LTSFT(density=density, exclude_embeddings=False), text_l2)
    alone = scores(lang_d.apply_to(model, copy=True))
    composed = scores((diffs["task sparse"] + lang_d).apply_to(model, copy=True))
    rows_k.append({"K": density, "nnz": lang_d.nnz, "lang alone, addition L2": alone["addition L2"],
                   "composed, subtraction L2": composed["subtraction L2"], "composed, addition L2": composed["addition L2"],
                   "shared entries": diffs["task sparse"].overlap(lang_d)})
timings["K sweep"] = time.perf_counter() - t0
by_k = pd.DataFrame(rows_k).set_index("K")
by_k.round(3)

# %%
fig, ax = plt.subplots(figsize=(4.6, 3.2))
for col in ("lang alone, addition L2", "composed, subtraction L2", "composed, addition L2"):
    ax.plot(by_k.index * 100, by_k[col], marker="o", label=col)
ax.axhline(table.loc["task + lang dense", "subtraction L2"], color="C3", ls="--", lw=1, label="dense sum, subtraction L2")
ax.axhline(sub_l1.chance, color="grey", ls=":", lw=1, label="chance")
ax.set_xscale("log")
ax.set_xlabel("K of the language diff (% of maskable entries)")
ax.set_ylabel("accuracy")
ax.legend(fontsize=7)
fig.tight_layout()

# %%
# NBVAL_IGNORE_OUTPUT
timings["total"] = time.perf_counter() - started
pd.Series(timings).round(1)
