# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# DRAFT (2026-11-23 18:10 UTC, executed at ci with --allow-errors in ~3 min): the shipped fine-tunes are built
# (data/finetuned/, entity tracking 5-8 boxes + 50% replay, 1500 steps; control: subtraction). Measured at 8 boxes:
# Claim 1 holds (base 0.201 [0.169, 0.238] -> fine-tuned 0.418 [0.376, 0.461]; control 0.229). Claim 4 (CMAP)
# holds (recovered 0.97, random heads 0.49) and Claim 5 (attribution vs exact patching, Spearman 0.999).
# Open: (1) the object-mover path-patching scores are exactly 0.0 for every layer-0 head: not a bug, the value
# fetchers attend to the object token itself (4 before the context label), so their value input at the label is
# unused; the base likely fetches by position, so the search needs a K-composition step (what writes the
# fetchers' keys at the object positions). Without it every head off the last token is mean-ablated and
# faithfulness is 0.58 (random 0.43) in the base and 0.29 in the fine-tuned model; (2) Claim 3's 2x-chance assertion cannot hold with 8 heads (4 of 4 shared, chance 2.49):
# use the hypergeometric probability of an overlap that large (1/70 here); (3) DCM selects empty sets at
# 'previous query label'. Measured since: keeping layer-0 head L0.H0 at the object positions (with L0.H1 and
# L1.H0-2 at the last token) gives faithfulness 0.98 in the fine-tuned model (0.438 of 0.449) and 1.81 in the
# base (0.367 > 0.203: the other heads interfere at 8 boxes); the label position does not matter.

# %% [markdown]
# # 05 · Fine-tuning enhances an existing mechanism: the entity-tracking circuit
#
# **The question.** Prakash, Shaham, Haklay, Belinkov and Bau, *Fine-Tuning Enhances Existing Mechanisms: A
# Case Study on Entity Tracking* (ICLR 2024, arXiv 2402.14811) found that LLaMA-7B fine-tuned on arithmetic
# (Goat, FLoat) tracks entities better than LLaMA-7B, and that it does so **with the same circuit**: the
# heads found by path patching in the base carry the behaviour in the fine-tuned models too, they encode the
# same information (desiderata-based component masking, DCM), and patching the fine-tuned model's head
# outputs into the base (cross-model activation patching, CMAP) recovers the fine-tuned accuracy.
#
# **The task** (Kim and Schuster 2023): `the apple is in box F , the key is in box C , ... . box C contains
# the` -> `key`. Chance is 1 / (number of boxes).
#
# **How this setup differs from the paper's.**
# - The base is `gpt2-tiny`, a 2-layer, 4-head GPT-2 (8 heads in all, not 1,024) pretrained by the package
#   on a mix of procedural tasks that includes entity tracking with 2-7 boxes.
# - In a tiny model, fine-tuning on *another* task (the paper's arithmetic) does not enhance entity
#   tracking: alone it destroys it, with replay it holds but does not rise (`shared/reference/zoo-
#   pretraining.md`). So we evaluate where the base is imperfect and the fine-tune *exercises the
#   mechanism*. The base was pretrained on 2-7 boxes; at **8 boxes** it is above chance but weak (0.20 vs
#   1/8), so that is the evaluated setting (the paper used 7). The fine-tune trains entity tracking with 5-8
#   boxes, mixed 50/50 with replay of the pretraining mix. The **control** fine-tune has the same budget and
#   replay but trains modular
#   subtraction, a task that does not use the mechanism.
# - The two fine-tunes are shipped in `data/finetuned/` (a few hundred KB each) so that this notebook
#   stays within its CPU budget. Their recipes are `ftanalysis.probes.circuits.finetunes.RECIPES`; each
#   folder's `card.json` records the recipe, the base's weight digest, the training time and both models'
#   accuracies, and the command that rebuilds it: `python -m ftanalysis.probes.circuits.finetunes`.
# - With 8 heads a circuit is a handful of heads: a head joins a group when its path-patching score is at
#   most -0.1 (the paper keeps the top-k of 1,024). The groups a 2-layer model can hold are **object
#   movers** (layer 0, at the box label in the context: copy the object onto its label), **query movers**
#   (layer 0, at the last token: bring the queried label there) and **value fetchers** (layer 1, at the last
#   token: attend to the queried box and write its object into the logits).

# %%
import random

import pandas as pd
import torch

import ftanalysis as fta
from ftanalysis.probes import circuits as C
from ftanalysis.probes.circuits import finetunes
from ftanalysis.stats import wilson_interval

S = fta.notebook.setup(seed=0)
BOXES = 8                              # the evaluated setting (the base was pretrained on 2-7)
N_EVAL = S.pick(ci=512, full=2048)     # evaluation prompts (accuracy, faithfulness, CMAP)
N_PATCH = S.pick(ci=128, full=512)     # prompts for path, activation and attribution patching
N_DCM = S.pick(ci=256, full=2000)      # (base, source) pairs for DCM (half train, a quarter val, a quarter test)
N_RANDOM = S.pick(ci=5, full=10)       # random circuits per control
torch.set_grad_enabled(False)

# %% [markdown]
# ## The base and the two fine-tunes
# Accuracy at 3, 5, 7 and 8 boxes (fresh test prompts, 95% Wilson intervals), plus what each fine-tune
# trained for: the control's own task (modular subtraction) and the pretraining mix (forgetting).

# %%
base, tok = fta.zoo.load("gpt2-tiny")
ft, _, ft_card = C.load_finetuned("gpt2-tiny-et-more-boxes")
control, _, control_card = C.load_finetuned("gpt2-tiny-control-subtraction")
for card in (ft_card, control_card):
    assert card["base_digest"] == finetunes.weights_digest(base), f"{card['name']} was made from another base: {card['rebuild']}"
    print(f"{card['name']}: {card['recipe']['description']} {card['recipe']['steps']} steps, lr {card['recipe']['lr']}, "
          f"batch {card['recipe']['batch_size']}, entity tracking with {card['entity_tracking_boxes']} boxes")

models = {"base": base, "fine-tuned": ft, "control": control}
test = {b: C.entity_batch(tok, N_EVAL, n_boxes=b, split="test") for b in (3, 5, 7, BOXES)}


def accuracy(model, batch):
    """Last-token accuracy on an EntityBatch and its 95% Wilson interval."""
    hits = int((model(batch.ids).logits[:, -1].argmax(-1) == batch.answers).sum())
    return (hits / len(batch), *wilson_interval(hits, len(batch)))


subtraction = fta.tasks.make("modular_arithmetic", op="-", modulus=23)
mix = fta.tasks.make("pretraining_mix")
acc = {name: {b: accuracy(model, batch) for b, batch in test.items()} for name, model in models.items()}
table = pd.DataFrame({
    name: {**{f"ET {b} boxes": acc[name][b][0] for b in test}, f"ET {BOXES} ci_low": acc[name][BOXES][1], f"ET {BOXES} ci_high": acc[name][BOXES][2],
           "subtraction": subtraction.evaluate(model, tok, n=256)["accuracy"],
           "pretraining mix": mix.evaluate(model, tok, n=128)["accuracy"]}
    for name, model in models.items()}).T
table.round(3)

# %% [markdown]
# **Claim 1.** The fine-tuned model tracks 8 boxes better than the base by a clear margin (the 95% intervals
# do not overlap) and its gain is larger than the control fine-tune's, which did learn its own task.

# %%
gain = {name: acc[name][BOXES][0] - acc["base"][BOXES][0] for name in ("fine-tuned", "control")}
print(f"{BOXES} boxes: base {acc['base'][BOXES][0]:.3f}, fine-tuned {acc['fine-tuned'][BOXES][0]:.3f} ({gain['fine-tuned']:+.3f}), "
      f"control {acc['control'][BOXES][0]:.3f} ({gain['control']:+.3f})")
assert acc["fine-tuned"][BOXES][1] > acc["base"][BOXES][2]
assert gain["fine-tuned"] > gain["control"] + 0.05
assert table.loc["control", "subtraction"] > table.loc["base", "subtraction"] + 0.2

# %% [markdown]
# ## The base's circuit, by iterated path patching
# Path patching (Wang et al. 2022) scores a head by how much corrupting it *alone, through one path*
# breaks the clean behaviour; normalised, 0 is no effect and -1 means the path carries the whole effect.
# The search runs backwards from the logits, as in Prakash et al.'s `path_patching.py`:
# 1. **value fetchers**: direct path to the logits, at the last token (corruption: another box is queried);
# 2. **query movers**: path into the fetchers' *queries* at the last token (Q-composition, same corruption);
# 3. **object movers**: path into the fetchers' *values* at the queried label in the context
#    (V-composition; corruption: the objects rotated among the boxes, so only the binding changes).

# %%
patch = C.entity_batch(tok, N_PATCH, n_boxes=BOXES, split="val")
query_corrupt = C.corrupt_query(patch, tok, seed=0)
binding_corrupt = C.corrupt_binding(patch, tok, seed=0)
search = C.find_entity_circuit(base, patch, query_corrupt, binding_corrupt, threshold=0.1)
circuit = search.circuit
search.plot();
circuit.plot(title="entity-tracking circuit of the base");
circuit.to_frame()

# %% [markdown]
# ## Faithfulness: the circuit alone, in the base and inside the fine-tuned model
# Every head outside the circuit, and every circuit head away from its group's position, is replaced by its
# mean output over reference prompts (other objects, labels and queries); faithfulness = accuracy of the
# circuit alone / accuracy of the full model. The control: random circuits of the same group sizes at the
# same positions.

# %%
reference = C.entity_batch(tok, N_EVAL, n_boxes=BOXES, split="val", seed=1)
batch = test[BOXES]
evals = {name: C.evaluate_circuit(models[name], batch.ids, batch.answers, circuit, reference.ids, roles=batch.roles,
                                  n_random=N_RANDOM, seed=0) for name in ("base", "fine-tuned")}
pd.DataFrame({name: {"full model": e.full_accuracy, "base circuit only": e.circuit_accuracy, "faithfulness": e.faithfulness,
                     "random circuits": e.random_accuracy, "random faithfulness": e.random_faithfulness}
              for name, e in evals.items()}).T.round(3)

# %% [markdown]
# **Claim 2.** The base circuit is faithful in the base (>= 0.9) and still largely faithful inside the
# fine-tuned model (>= 0.8), while random circuits of the same size are far below it.

# %%
for name, e in evals.items():
    print(f"{name}: faithfulness {e.faithfulness:.3f}, random circuits {e.random_faithfulness:.3f}")
assert evals["base"].faithfulness >= 0.9
assert evals["fine-tuned"].faithfulness >= 0.8
for e in evals.values():
    assert e.random_faithfulness < 0.5 * e.faithfulness

# %% [markdown]
# ## The fine-tuned model's own circuit
# The same search on the fine-tuned model. **Claim 3**: its circuit overlaps the base circuit far more than
# chance. Chance is the mean number of shared heads between the base circuit and 1,000 random circuits with
# the fine-tuned circuit's group sizes, drawn from the candidate heads of each group (value fetchers above
# layer 0, movers below the fetchers).

# %%
search_ft = C.find_entity_circuit(ft, patch, query_corrupt, binding_corrupt, threshold=0.1)
circuit_ft = search_ft.circuit
overlap = circuit.overlap(circuit_ft)
n_layers, n_heads = base.config.n_layer, base.config.n_head


def candidates(group):
    """Heads the search can put in ``group``: fetchers above layer 0, movers in the layers below layer 1."""
    layers = range(1, n_layers) if group == "value fetcher" else range(n_layers - 1)
    return [(layer, head) for layer in layers for head in range(n_heads)]


rng = random.Random(0)
chance = {}
for group, heads in circuit_ft.groups.items():
    own = set(circuit.groups.get(group, ()))
    draws = [len(own & set(rng.sample(candidates(group), len(heads)))) for _ in range(1000)]
    chance[group] = sum(draws) / len(draws)
overlap["chance shared"] = overlap["group"].map(chance)
overlap.loc[overlap["group"] == "all", "chance shared"] = sum(chance.values())
circuit_ft.plot(title="entity-tracking circuit of the fine-tuned model");
overlap.round(3)

# %%
row = overlap.set_index("group").loc["all"]
print(f"shared heads {row['shared']} of {row['this']} (base) / {row['other']} (fine-tuned); chance {row['chance shared']:.2f}")
assert row["shared"] >= 2 * row["chance shared"]
assert row["recall"] >= 0.75

# %% [markdown]
# ## What the heads encode: desiderata-based component masking
# DCM (Davies et al. 2023, as used by Prakash et al.) learns a binary mask over candidate heads: a masked
# head's output at one position is taken from a *source* prompt, and the mask is trained so that the output
# becomes a stated *target*, with an L1 pressure towards few heads. Base and source have disjoint objects and
# labels, queries at different box indices, and the source's query label also labels a third box `j` of
# the base. Targets:
# - **object value**: the source's answer object (the object itself was moved);
# - **positional**: the base's object at the source's query *index* (a positional pointer was moved);
# - **box label**: the base's object in box `j` (the queried *label* was moved).
#
# Candidates: all 8 heads at the last token, and the 4 layer-0 heads at the queried label in the context.
# The no-patch baseline (nothing patched) is the control; chance is 0 since the target is never the base's
# answer.

# %%
dcm_base, dcm_source, targets = C.desiderata(tok, N_DCM, n_boxes=BOXES, seed=0, split="val")
all_heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
layer0 = [(0, head) for head in range(n_heads)]
settings = {
    ("last", "object_value"): (all_heads, dcm_base.roles["last"], dcm_source.roles["last"]),
    ("last", "positional"): (all_heads, dcm_base.roles["last"], dcm_source.roles["last"]),
    ("last", "box_label_value"): (all_heads, dcm_base.roles["last"], dcm_source.roles["last"]),
    ("previous query label", "object_value"): (layer0, dcm_base.roles["previous query label"],
                                               dcm_source.roles["previous query label"]),
}
dcm_rows = []
for name in ("base", "fine-tuned"):
    for (where, desideratum), (heads, base_pos, source_pos) in settings.items():
        r = C.dcm(models[name], dcm_base.ids, dcm_source.ids, targets[desideratum], heads, base_pos, source_pos, seed=0)
        dcm_rows.append({"model": name, "position": where, "desideratum": desideratum, "selected heads": r.selected_,
                         "accuracy": r.accuracy, "no patch": r.no_patch_accuracy, "all candidates patched": r.all_heads_accuracy})
dcm_table = pd.DataFrame(dcm_rows)
dcm_table.round(3)

# %% [markdown]
# **Claim (DCM).** At each position one kind of information dominates, the heads DCM picks for it are the
# circuit's heads of that position, and the base and the fine-tuned model pick the same heads: the
# fine-tune did not change what the circuit encodes.

# %%
best = dcm_table.loc[dcm_table.groupby(["model", "position"])["accuracy"].idxmax()].set_index(["model", "position"])
print(best[["desideratum", "selected heads", "accuracy", "no patch"]])
for (_name, _where), r in best.iterrows():
    assert r["accuracy"] > r["no patch"] + 0.3
for where in ("last", "previous query label"):
    assert best.loc[("base", where), "desideratum"] == best.loc[("fine-tuned", where), "desideratum"]
    assert set(best.loc[("base", where), "selected heads"]) & set(best.loc[("fine-tuned", where), "selected heads"])

# %% [markdown]
# ## CMAP: the fine-tuned model's circuit outputs, patched into the base
# Same input to both models; the base runs with the chosen heads' outputs (at their group's position)
# replaced by the fine-tuned model's, its own output projection unchanged. `recovered` is the fraction of
# the accuracy gap closed. Controls: random heads of the same size at the same positions, and the same
# circuit patched from the *control* fine-tune.

# %%
cmap_ft = C.cmap(base, ft, batch.ids, batch.answers, circuit, roles=batch.roles, n_random=N_RANDOM, seed=0)
cmap_control = C.cmap(base, control, batch.ids, batch.answers, circuit, roles=batch.roles, n_random=0)
cmap_ft.plot(title=f"CMAP, {BOXES} boxes: fine-tuned circuit outputs -> base");
cmp = cmap_ft.to_frame()[["group", "heads", "accuracy", "ci_low", "ci_high", "recovered", "random_accuracy", "random_recovered"]]
cmp["from control fine-tune"] = cmap_control.to_frame()["accuracy"].values
cmp.round(3)

# %% [markdown]
# **Claim 4.** Patching the whole circuit's outputs from the fine-tuned model recovers most of the accuracy
# gap; random heads of the same size recover far less, and the control fine-tune's outputs do not help.

# %%
rows = cmp.set_index("group")
whole = rows.loc["all"] if "all" in rows.index else rows.iloc[0]
print(f"base {cmap_ft.base_accuracy:.3f} -> circuit from fine-tuned {whole['accuracy']:.3f} "
      f"(recovered {whole['recovered']:.2f}; random heads {whole['random_recovered']:.2f}); fine-tuned {cmap_ft.ft_accuracy:.3f}")
assert whole["recovered"] >= 0.5
assert whole["recovered"] > whole["random_recovered"] + 0.25
assert whole["from control fine-tune"] < cmap_ft.base_accuracy + 0.5 * (cmap_ft.ft_accuracy - cmap_ft.base_accuracy)

# %% [markdown]
# ## Attribution patching agrees with exact activation patching
# Activation patching (run the corrupted prompt, patch one head's clean output at one position) for every
# head at the three positions where the query corruption acts (the query label and the two tokens after
# it), against attribution patching's first-order estimate from two forward and one backward pass.
# **Claim 5**: the estimate ranks the heads with the largest exact effect like exact patching does.

# %%
metric = C.logit_diff(patch.answers, query_corrupt.answers)
seq = patch.ids.shape[1]
positions = [seq - 3, seq - 2, seq - 1]
exact = C.activation_patching(base, patch.ids, query_corrupt.ids, metric, component="z", positions=positions)
with torch.enable_grad():
    estimate = C.attribution_patching(base, patch.ids, query_corrupt.ids, metric, component="z", positions=positions)
comparison = C.compare_with_exact(estimate, exact, top_k=8)
comparison.plot();
print(f"Spearman over all {exact.effect.numel()} (layer, position, head): {comparison.spearman:.3f}; "
      f"over the top {comparison.top_k}: {comparison.spearman_top:.3f}; top-{comparison.top_k} overlap {comparison.top_overlap:.2f}")
assert comparison.spearman_top >= 0.6
assert comparison.top_overlap >= 0.6

# %% [markdown]
# ## Summary
# | claim (Prakash et al. 2024) | measured here |
# |---|---|
# | fine-tuning improves entity tracking | see Claim 1 (7 boxes, against a same-budget control) |
# | the base circuit is faithful in the base and in the fine-tuned model | Claim 2 |
# | the fine-tuned model's circuit contains the base circuit | Claim 3 |
# | the circuit encodes the same information before and after | DCM |
# | the gain lives in the circuit heads' outputs | Claim 4 (CMAP) |
#
# The numbers are printed above each assertion. Differences from the paper: a 2-layer model with 8 heads,
# a fine-tune that exercises the mechanism directly (the paper's arithmetic fine-tune of a 7B model
# enhanced it as a side effect), and groups chosen by a threshold rather than a top-k.
