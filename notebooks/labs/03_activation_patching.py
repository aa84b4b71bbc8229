# %% [markdown]
# # Lab 03 · Activation patching
#
# **Goal.** Find which attention heads carry a behaviour by *patching*: run the model on a corrupted input,
# put back one component's activation from the clean input, and see how much of the clean behaviour returns.
# You will build the metric, the hooks, one patch and the full sweep yourself, check each against
# `ftanalysis.probes`, then use the same hooks across two models: cross-model activation patching (CMAP)
# asks whether a fine-tuned model's gain lives in a few heads.
#
# The rule (Meng et al. 2022, arXiv 2202.05262; Wang et al. 2022, arXiv 2211.00593; conventions of
# Heimersheim and Nanda 2024, arXiv 2404.15255): for a component $c$,
#
# $$\text{effect}(c) = \frac{m(\text{corrupt} \leftarrow c_\text{clean}) - m(\text{corrupt})}{m(\text{clean}) - m(\text{corrupt})},$$
#
# so 0 means "restoring $c$ alone does nothing" and 1 means "restoring $c$ alone restores the clean
# behaviour". CMAP (Prakash et al. 2024, arXiv 2402.14811) runs the *base* model with some heads' outputs
# taken from the *fine-tuned* model on the same input.
#
# **Task.** Entity tracking on the zoo's tiny GPT-2: `the apple is in box F , the key is in box C , ... box C
# contains the` → `key`. The corrupted prompt asks for another box of the same context, so only the
# query-label token differs and the right answer changes.
#
# **Time:** about 50 minutes. **Prerequisites:** PyTorch modules, forward hooks, `einops`.
# Every exercise is followed by a check cell: run it after you fill in the code marked `YOUR CODE HERE`.

# %%
import einops
import torch

import ftanalysis as fta
from ftanalysis.labs.checks import patching as checks
from ftanalysis.probes.circuits import activation_patching, cmap, corrupt_query, entity_batch, load_finetuned

S = fta.notebook.setup(seed=0)
torch.set_grad_enabled(False)  # patching needs forward passes only

model, tok = fta.zoo.load("gpt2-tiny")
clean = entity_batch(tok, S.pick(ci=48, full=256), n_boxes=3)
corrupt = corrupt_query(clean, tok, seed=0)
print(clean.prompts[0], "->", tok.convert_ids_to_tokens(int(clean.answers[0])))
print(corrupt.prompts[0], "->", tok.convert_ids_to_tokens(int(corrupt.answers[0])))
print("ids:", tuple(clean.ids.shape), "| layers:", model.config.n_layer, "| heads:", model.config.n_head)

# %% [markdown]
# ## Exercise 1 · The metric: logit difference
# *Difficulty ●○○ · about 5 minutes*
#
# Write `logit_diff(logits, answer_ids, wrong_ids)`: for logits of shape `[batch, pos, vocab]`, return the
# `[batch]` tensor `logits[i, -1, answer_i] - logits[i, -1, wrong_i]`, read at the last position where the
# model predicts the answer. Here the wrong answer of a clean prompt is the corrupted prompt's answer.
#
# <details><summary>Hint</summary>Index with two tensors at once:
# <code>logits[torch.arange(batch), -1, answer_ids]</code>.</details>

# %%
def logit_diff(logits: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor) -> torch.Tensor:
    ### BEGIN SOLUTION
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, -1, answer_ids] - logits[rows, -1, wrong_ids]
    ### END SOLUTION


# %% tags=["check"]
checks.check_logit_diff(logit_diff)

# %%
def metric(logits):
    return logit_diff(logits, clean.answers, corrupt.answers)


m_clean, m_corrupt = metric(model(clean.ids).logits).mean(), metric(model(corrupt.ids).logits).mean()
print(f"logit difference: clean {m_clean:.2f}, corrupt {m_corrupt:.2f}")

# %% [markdown]
# ## Exercise 2 · Reading head outputs with hooks
# *Difficulty ●●○ · about 10 minutes*
#
# GPT-2's attention concatenates the heads' outputs `z` (each of size `d_head`) and feeds them to the output
# projection `model.transformer.h[l].attn.c_proj`. The input of that layer is therefore every head's output,
# side by side. Write `head_outputs(model, input_ids)` returning `{layer: z}` with `z` of shape
# `[batch, pos, head, d_head]`:
# - register a **forward pre-hook** on each `c_proj` (`module.register_forward_pre_hook(fn)`; `fn(module,
#   args)` receives the inputs as a tuple) that stores `args[0]` split into heads with `einops.rearrange`;
# - run the model once;
# - remove every hook in a `finally` block, even if the forward pass fails.
#
# <details><summary>Hint</summary><code>einops.rearrange(x, "b p (h d) -> b p h d", h=model.config.n_head)</code>;
# keep the handles that <code>register_forward_pre_hook</code> returns and call <code>.remove()</code> on each.</details>

# %%
def head_outputs(model, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    ### BEGIN SOLUTION
    n_heads = model.config.n_head
    cache, handles = {}, []
    for layer, block in enumerate(model.transformer.h):
        def store(module, args, layer=layer):
            cache[layer] = einops.rearrange(args[0].detach(), "b p (h d) -> b p h d", h=n_heads)

        handles.append(block.attn.c_proj.register_forward_pre_hook(store))
    try:
        model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return cache
    ### END SOLUTION


# %% tags=["check"]
checks.check_head_outputs(head_outputs)

# %% [markdown]
# ## Exercise 3 · One patch
# *Difficulty ●●○ · about 10 minutes*
#
# Write `patch_head(model, clean_ids, corrupt_ids, layer, head, pos)`: the logits of the **corrupted** run in
# which head `head` of layer `layer`, at position `pos` only, outputs what it output on the **clean** run.
# A pre-hook may *return* a new tuple of inputs; the module then runs on those.
#
# <details><summary>Hint</summary>Get the clean <code>z</code> with your <code>head_outputs</code>. In the hook,
# rearrange <code>args[0]</code> into heads, <code>clone()</code> it, overwrite <code>z[:, pos, head]</code>,
# rearrange back and <code>return (new,)</code>.</details>

# %%
def patch_head(model, clean_ids, corrupt_ids, layer: int, head: int, pos: int) -> torch.Tensor:
    ### BEGIN SOLUTION
    n_heads = model.config.n_head
    clean_z = head_outputs(model, clean_ids)[layer]

    def patch(module, args):
        z = einops.rearrange(args[0], "b p (h d) -> b p h d", h=n_heads).clone()
        z[:, pos, head] = clean_z[:, pos, head]
        return (einops.rearrange(z, "b p h d -> b p (h d)"),)

    handle = model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(patch)
    try:
        return model(corrupt_ids).logits
    finally:
        handle.remove()
    ### END SOLUTION


# %% tags=["check"]
checks.check_patch_head(patch_head)

# %% [markdown]
# ## Exercise 4 · The sweep
# *Difficulty ●○○ · about 5 minutes*
#
# Write `patching_sweep(model, clean_ids, corrupt_ids, metric)`: a tensor `[layer, pos, head]` of normalised
# effects, one `patch_head` per component, the metric averaged over the batch. (The library batches many
# patches into one forward pass; a plain loop is fine here.)

# %%
def patching_sweep(model, clean_ids, corrupt_ids, metric) -> torch.Tensor:
    ### BEGIN SOLUTION
    n_layers, n_heads, n_pos = model.config.n_layer, model.config.n_head, clean_ids.shape[1]
    m_clean = metric(model(clean_ids).logits).mean()
    m_corrupt = metric(model(corrupt_ids).logits).mean()
    effect = torch.zeros(n_layers, n_pos, n_heads)
    for layer in range(n_layers):
        for pos in range(n_pos):
            for head in range(n_heads):
                patched = metric(patch_head(model, clean_ids, corrupt_ids, layer, head, pos)).mean()
                effect[layer, pos, head] = (patched - m_corrupt) / (m_clean - m_corrupt)
    return effect
    ### END SOLUTION


# %% tags=["check"]
checks.check_patching_sweep(patching_sweep)

# %% [markdown]
# ## What the sweep shows on entity tracking
#
# Run your sweep and the library's `activation_patching` on the zoo model, and draw the library's heatmap.
# The clean and corrupted prompts are identical up to the query label (three tokens from the end), so by
# causality no head *before* that position can matter: those effects must be exactly zero. Everything the
# model needs reaches the last position through attention, so the heads that matter read at the last
# position.

# %%
mine = patching_sweep(model, clean.ids, corrupt.ids, metric)
result = activation_patching(model, clean.ids, corrupt.ids, metric, "z")
print("largest |mine - library|:", float((mine - result.effect).abs().max()))
query_pos, last = int(clean.roles["query label"][0]), clean.ids.shape[1] - 1
fig = result.plot(title="head outputs (z): effect of patching clean into corrupt")
result.top(5)

# %%
assert torch.allclose(mine, result.effect, atol=1e-4), "your sweep disagrees with the library on the zoo model"
assert result.effect[:, :query_pos].abs().max() < 1e-5, "positions before the only changed token cannot matter"
# one head at the last position alone restores a large share of the logit difference
assert result.effect[:, last].max() > 0.2, result.effect[:, last]

# %% [markdown]
# The residual stream is a useful control. Patching `resid_pre` of layer 0 (the token embedding plus the
# position) at the query label copies the *only* difference between the prompts, so it must restore
# everything (effect 1); at every other position it changes nothing (effect 0).

# %%
resid = activation_patching(model, clean.ids, corrupt.ids, metric, "resid_pre")
print(resid.effect[:, query_pos - 1 : query_pos + 3].round(decimals=3))
others = torch.cat([resid.effect[0, :query_pos], resid.effect[0, query_pos + 1 :]])
assert abs(float(resid.effect[0, query_pos]) - 1) < 1e-4 and others.abs().max() < 1e-4

# %% [markdown] tags=["solution"]
# **Why does the layer-1 residual stream at the query label restore less than 1?** By layer 1, attention
# heads of layer 0 have already moved information about the query label to the *last* position. Restoring
# the query-label position alone no longer restores what those heads wrote elsewhere: the effect that moved
# shows up at the last position instead.

# %% [markdown]
# ## Exercise 5 · Cross-model patching (CMAP)
# *Difficulty ●●○ · about 10 minutes*
#
# Now two models on the **same** input: the base and a fine-tuned copy. Write
# `cross_model_patch(base, ft, input_ids, heads)`: the logits of `base` in which every `(layer, head)` listed
# in `heads` outputs, at every position, what it outputs in `ft`. The rest of `base` (its `c_proj`, its MLPs)
# stays the base's.
#
# <details><summary>Hint</summary>Your <code>head_outputs(ft, input_ids)</code> gives the fine-tuned outputs;
# group the heads by layer and register one pre-hook per layer on the base.</details>

# %%
def cross_model_patch(base, ft, input_ids, heads) -> torch.Tensor:
    ### BEGIN SOLUTION
    n_heads = base.config.n_head
    ft_z = head_outputs(ft, input_ids)
    by_layer = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    handles = []
    for layer, chosen in by_layer.items():
        def swap(module, args, layer=layer, chosen=chosen):
            z = einops.rearrange(args[0], "b p (h d) -> b p h d", h=n_heads).clone()
            z[:, :, chosen] = ft_z[layer][:, :, chosen]
            return (einops.rearrange(z, "b p h d -> b p (h d)"),)

        handles.append(base.transformer.h[layer].attn.c_proj.register_forward_pre_hook(swap))
    try:
        return base(input_ids).logits
    finally:
        for handle in handles:
            handle.remove()
    ### END SOLUTION


# %% tags=["check"]
checks.check_cross_model_patch(cross_model_patch)

# %% [markdown]
# ## Does the fine-tune's gain live in the heads?
#
# The package ships a fine-tune of this base that tracks entities better: full fine-tuning on entity tracking
# with 5 to 8 boxes, mixed with replay of the pretraining mix (`data/finetuned/`; notebook 05 studies it in
# depth). The base was pretrained on 2 to 7 boxes, so evaluate on **8 boxes**, where it is weak. CMAP
# patches groups of heads from the fine-tune into the base: a layer's heads, the three heads with the largest
# patching effect at the last position, and random head sets of the same size (the control).

# %%
ft, _, card = load_finetuned("gpt2-tiny-et-more-boxes")
print(card["recipe"]["description"])
evalset = entity_batch(tok, S.pick(ci=256, full=1024), n_boxes=8, split="test")


def accuracy(logits):
    return float((logits[:, -1].argmax(-1) == evalset.answers).float().mean())


all_heads = [(layer, head) for layer in range(model.config.n_layer) for head in range(model.config.n_head)]
acc_base, acc_ft = accuracy(model(evalset.ids).logits), accuracy(ft(evalset.ids).logits)
acc_all = accuracy(cross_model_patch(model, ft, evalset.ids, all_heads))
print(f"8 boxes: base {acc_base:.3f} | fine-tuned {acc_ft:.3f} | base with every head from the fine-tune {acc_all:.3f}")

last = clean.ids.shape[1] - 1
top3 = [(int(r.layer), int(r.head)) for r in result.to_frame().query("pos == @last").nlargest(3, "effect").itertuples()]
groups = {f"layer {layer}": [(layer, h) for h in range(model.config.n_head)] for layer in range(model.config.n_layer)}
groups["top-3 patching heads"] = top3
table = cmap(model, ft, evalset.ids, evalset.answers, groups, n_random=S.pick(ci=5, full=20), seed=0)
fig = table.plot()
table.to_frame().drop(columns=["heads"]).round(3)

# %%
assert acc_ft > acc_base + 0.1, "the fine-tune should improve entity tracking on 8 boxes"
row_all = table.to_frame().set_index("group").loc["all"]
assert abs(row_all["accuracy"] - acc_all) < 1e-9, "your cross_model_patch and the library's cmap disagree"

# %% [markdown]
# **What to see.** Patching every head from the fine-tune recovers the whole gap (the MLPs and the output
# projections are still the base's). The three heads your sweep ranked highest on *3-box* prompts recover
# most of the 8-box gap on their own, far more than random sets of three heads: the fine-tune improved the
# heads that already carried the behaviour. Notebook 05 finds them as a circuit (a query mover and value
# fetchers) with path patching.

# %%
row_top = table.to_frame().set_index("group").loc["top-3 patching heads"]
print(f"top-3 heads recover {row_top['recovered']:.2f} of the gap; random sets of 3: {row_top['random_recovered']:.2f}")
assert row_top["recovered"] >= 0.6
assert row_top["recovered"] > row_top["random_recovered"] + 0.3
