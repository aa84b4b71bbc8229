# %% [markdown]
# # Lab 07 · The IOI circuit in a real LM
#
# **Goal.** Find the attention heads of a real pretrained language model that solve *indirect object
# identification* (IOI): `When Mary and John went to the store, John gave a drink to` → ` Mary`. Wang et al. 2022
# ("Interpretability in the Wild", arXiv 2211.00593) traced it in GPT-2 small to a circuit of heads: *name
# movers* copy the indirect object (IO) to the output, *negative name movers* write against it, and
# *S-inhibition* heads tell the name movers which name **not** to copy, the repeated subject S. Here the model is
# SmolLM2-135M-Instruct (30 layers × 9 heads; grouped-query attention with 3 key/value heads; RMSNorm), which
# prefers IO to S on every one of 60 test prompts (mean logit difference 5.2).
#
# You will write four tools and check each against `ftanalysis.probes`:
#
# 1. the **logit difference** $\mathrm{LD} = \ell_\text{IO} - \ell_\text{S}$ at the last position (the metric);
# 2. **direct logit attribution** (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"): what
#    each head writes *straight* into the logit difference,
#    $$\mathrm{DLA}(l, h) = \frac{C\,(W_O^{l,h} z^{l,h})}{s} \odot w_\text{norm}
#      \cdot \big(W_U[\text{IO}] - W_U[\text{S}]\big),$$
#    with $z^{l,h}$ the head's output, $W_O^{l,h}$ its columns of the output projection, $s$ the final norm's scale
#    on this run (frozen), $C$ the centring of LayerNorm (none for RMSNorm), $w_\text{norm}$ the final norm's weight;
# 3. **activation patching** of head outputs (lab 03): run the corrupted prompt, restore one head's clean output
#    at every position, and let everything downstream react;
# 4. **path patching to the logits** (Wang et al. 2022, Appendix B): restore one head's clean output but let it
#    reach the logits only *directly*, every other head and every MLP frozen.
#
# The corruption is Wang et al.'s ABC: the second mention of S is replaced by a third name C (`..., Bob gave a
# drink to`), which removes the repeated-name signal but keeps every token position. All effects are normalised
#
# $$\text{effect} = \frac{m(\text{patched}) - m(\text{corrupt})}{m(\text{clean}) - m(\text{corrupt})}.$$
#
# **Time:** about 60 minutes. **Prerequisites:** lab 03 (hooks, activation patching), `einops`. Every exercise is
# followed by a check cell: run it after you fill in the code marked `YOUR CODE HERE`. The checks run your code
# on small random GPT-2 *and* Llama models, so it must handle both (LayerNorm or RMSNorm, `Conv1D` or `Linear`).

# %%
import einops
import matplotlib.pyplot as plt
import torch

import ftanalysis as fta
from ftanalysis.labs.checks import ioi as checks
from ftanalysis.probes.circuits import (
    activation_patching,
    direct_logit_attribution,
    ioi_batch,
    path_patching,
    run_with_cache,
    run_with_hooks,
)
from ftanalysis.probes.circuits.plots import head_heatmap

S = fta.notebook.setup(seed=0)
torch.set_grad_enabled(False)  # everything here is forward passes

model, tok = fta.zoo.load("smollm2-135m", device=S.device)
view = fta.nn.ModelView(model)  # weights in (out, in) orientation, whatever the architecture
batch = ioi_batch(tok, S.pick(ci=8, full=64), corruption="abc")  # one template, so every prompt has one length
clean, corrupt = batch.clean_ids.to(S.device), batch.corrupt_ids.to(S.device)
io, s = batch.io_ids.to(S.device), batch.s_ids.to(S.device)
print(view)
print(f"{batch.prompts[0]!r} -> {tok.decode(io[:1])!r} (not {tok.decode(s[:1])!r})")
print(f"{batch.corrupt_prompts[0]!r}   (ABC corruption)")
print("ids:", tuple(clean.shape))


def final_norm(model):
    """The norm before the unembedding: GPT-2's ``transformer.ln_f`` (LayerNorm) or Llama's ``model.norm`` (RMSNorm)."""
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


print(type(final_norm(model)).__name__, "| unembedding W_U:", tuple(model.get_output_embeddings().weight.shape))

# %% [markdown]
# ## Exercise 1 · The metric: logit difference
# *Difficulty ●○○ · about 5 minutes*
#
# As in lab 03: `logit_diff(logits, answer_ids, wrong_ids)` returns the `[batch]` tensor
# `logits[i, -1, answer_i] - logits[i, -1, wrong_i]`. For IOI the answer is IO and the wrong token is S.
#
# <details><summary>Hint</summary><code>logits[torch.arange(batch), -1, answer_ids]</code>.</details>

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
    return logit_diff(logits, io, s)


m_clean, m_corrupt = float(metric(model(clean).logits).mean()), float(metric(model(corrupt).logits).mean())
print(f"IO - S logit difference: clean {m_clean:.2f}, ABC-corrupted {m_corrupt:.2f}")

# %%
# the model solves IOI, and the corruption takes most of it away: something to restore
assert m_clean > 3 and (metric(model(clean).logits) > 0).all()
assert m_corrupt < 0.3 * m_clean

# %% [markdown]
# ## Exercise 2 · Direct logit attribution per head
# *Difficulty ●●● · about 20 minutes*
#
# The final residual stream $x$ at the last position is a *sum*: embeddings + every head's output + every MLP's
# output (+ biases). The logits are $W_U\,\mathrm{norm}(x)$, and the norm is linear once its scale $s$ is fixed.
# Freeze $s$ at its value on this run, and each head's output gets its own term of the logit difference.
#
# Write `head_dla(model, input_ids, answer_ids, wrong_ids)` returning `[layer, head]`, the formula above averaged
# over the batch:
# - cache every `layers.{l}.attn.hook_z` (`[batch, pos, head, d_head]`) and the final norm's input,
#   `layers.{L-1}.hook_resid_post`, with `run_with_cache(model, input_ids, names_filter=[...])`;
#   work at the last position;
# - the scale: LayerNorm (GPT-2) divides by $\sqrt{\mathrm{var}(x) + \epsilon}$ (`norm.eps`) after subtracting the
#   mean; RMSNorm (Llama) by $\sqrt{\mathrm{mean}(x^2) + \epsilon}$ (`norm.variance_epsilon`), no mean;
# - the output projection of layer `l` as an `(out, in)` matrix is `view.get(f"layers.{l}.attn.o")`, shape
#   `(d_model, n_heads * d_head)`: head `h` owns the input columns `h*d_head:(h+1)*d_head` (the view
#   already transposes GPT-2's `Conv1D`);
# - `W_U = model.get_output_embeddings().weight` is `[vocab, d_model]`.
#
# Grouped-query attention changes nothing here: `hook_z` has one slice per *query* head.
#
# <details><summary>Hint</summary>Build one direction per prompt, <code>u = (W_U[answer] - W_U[wrong]) *
# norm.weight / s</code> (<code>[batch, d_model]</code>); for LayerNorm centre it, <code>u - u.mean(-1)</code>
# (centring the output or the direction gives the same dot product). Then
# <code>einops.einsum(z, W_O, u, "batch head d_head, head d_head d_model, batch d_model -> head")</code> with
# <code>W_O = einops.rearrange(view.get(...), "d_model (head d_head) -> head d_head d_model", d_head=...)</code>,
# divided by the batch size.</details>

# %%
def head_dla(model, input_ids, answer_ids, wrong_ids) -> torch.Tensor:
    """``[layer, head]``: each head's direct term of logit(answer) - logit(wrong) at the last position, batch mean."""
    ### BEGIN SOLUTION
    view = fta.nn.ModelView(model)
    last = view.n_layers - 1
    names = [f"layers.{layer}.attn.hook_z" for layer in range(view.n_layers)] + [f"layers.{last}.hook_resid_post"]
    _, cache = run_with_cache(model, input_ids, names_filter=names)
    norm = final_norm(model)
    layernorm = isinstance(norm, torch.nn.LayerNorm)
    x = cache[f"layers.{last}.hook_resid_post"][:, -1]  # [batch, d_model]: what the final norm reads
    if layernorm:
        x = x - x.mean(-1, keepdim=True)
    eps = norm.eps if layernorm else norm.variance_epsilon
    scale = torch.sqrt(x.pow(2).mean(-1) + eps)  # [batch], frozen at this run's value
    W_U = model.get_output_embeddings().weight  # [vocab, d_model]
    u = (W_U[answer_ids] - W_U[wrong_ids]) * norm.weight / scale[:, None]  # [batch, d_model]
    if layernorm:
        u = u - u.mean(-1, keepdim=True)
    rows = []
    for layer in range(view.n_layers):
        z = cache[f"layers.{layer}.attn.hook_z"][:, -1]  # [batch, head, d_head]
        W_O = einops.rearrange(view.get(f"layers.{layer}.attn.o"), "d_model (head d_head) -> head d_head d_model",
                               d_head=view.d_head)
        per_head = einops.einsum(z, W_O, u, "batch head d_head, head d_head d_model, batch d_model -> head")
        rows.append(per_head / len(input_ids))
    return torch.stack(rows)  # [layer, head]
    ### END SOLUTION


# %% tags=["check"]
checks.check_head_dla(head_dla)

# %% [markdown]
# On SmolLM2: your DLA against the library's, and the map. The heads sum to part of the logit difference; the
# embeddings and the MLPs write the rest.

# %%
dla = head_dla(model, clean, io, s).cpu()
library_dla = direct_logit_attribution(model, clean, io, s)
print(f"largest |mine - library|: {float((dla - library_dla).abs().max()):.2e}")
print(f"sum over heads {float(dla.sum()):.2f} of a logit difference of {m_clean:.2f}")
fig = head_heatmap(dla, title="direct logit attribution (IO - S), clean prompts", label="logit difference")

# %%
assert torch.allclose(dla, library_dla, atol=1e-3)

# %% [markdown]
# ## Exercise 3 · Activation patching of head outputs
# *Difficulty ●●○ · about 15 minutes*
#
# DLA reads one run. Patching asks a causal question: on the *corrupted* prompt, restore head $h$'s *clean*
# output (at every position at once) and let every later layer react. Write
# `head_patching(model, clean_ids, corrupt_ids, metric, layers)` returning `[len(layers), n_heads]` normalised
# effects. Batch it: one forward pass per layer, the corrupted batch repeated `n_heads` times, copy `h` patched at
# head `h` (in the hook, `einops.rearrange(z, "(copy n) pos head d -> copy n pos head d", copy=n_heads)`).
# `run_with_hooks(model, ids, fwd_hooks=[(name, fn)])` calls `fn(z, hook_point)` with `z` in
# `[batch, pos, head, d_head]` and uses what it returns. The metric takes `n` prompts at a time.
#
# <details><summary>Hint</summary>Cache the clean <code>hook_z</code> of the swept layers once. Passing
# <code>logits_to_keep=1</code> to <code>run_with_hooks</code> computes the logits of the last position only,
# all the metric reads (about a third less time on SmolLM2).</details>

# %%
def head_patching(model, clean_ids, corrupt_ids, metric, layers) -> torch.Tensor:
    """``[len(layers), n_heads]``: normalised effect of restoring one head's clean output (every position) in the
    corrupted run."""
    ### BEGIN SOLUTION
    n_heads = fta.nn.ModelView(model).n_heads
    names = [f"layers.{layer}.attn.hook_z" for layer in layers]
    clean_logits, clean_cache = run_with_cache(model, clean_ids, names_filter=names)
    m_clean, m_corrupt = metric(clean_logits).mean(), metric(model(corrupt_ids).logits).mean()
    effect = torch.zeros(len(layers), n_heads)
    for i, layer in enumerate(layers):
        clean_z = clean_cache[f"layers.{layer}.attn.hook_z"]  # [n, pos, head, d_head]

        def patch(z, hook, clean_z=clean_z):
            z = einops.rearrange(z, "(copy n) pos head d -> copy n pos head d", copy=n_heads).clone()
            for head in range(n_heads):
                z[head, :, :, head] = clean_z[:, :, head]  # copy `head` restores that head only
            return einops.rearrange(z, "copy n pos head d -> (copy n) pos head d")

        hook = (f"layers.{layer}.attn.hook_z", patch)
        logits = run_with_hooks(model, corrupt_ids.repeat(n_heads, 1), fwd_hooks=[hook], logits_to_keep=1)
        copies = einops.rearrange(logits, "(copy n) pos vocab -> copy n pos vocab", copy=n_heads)
        for head in range(n_heads):
            effect[i, head] = (metric(copies[head]).mean() - m_corrupt) / (m_clean - m_corrupt)
    return effect
    ### END SOLUTION


# %% tags=["check"]
checks.check_head_patching(head_patching)

# %% [markdown]
# On SmolLM2. At `FTA_SCALE=ci` the sweep covers the upper half of the model (layers 15 to 29, where the
# heads of the IOI circuit sit; a sweep of all 30 layers takes about twice as long); at `full`, every layer.
# The library's batched `activation_patching` checks one layer of it.

# %%
swept = list(range(S.pick(ci=15, full=0), view.n_layers))
patched = head_patching(model, clean, corrupt, metric, swept)
ap = torch.full((view.n_layers, view.n_heads), float("nan"))
ap[swept] = patched.cpu()
top_layer = swept[int(patched.abs().max(1).values.argmax())]
library_ap = activation_patching(model, clean, corrupt, metric, "z", layers=[top_layer], per_position=False)
print(f"layer {top_layer}: largest |mine - library| {float((ap[top_layer] - library_ap.effect[0]).abs().max()):.2e}")
fig = head_heatmap(ap, title="activation patching of head outputs (clean into ABC-corrupted), all positions")

# %%
assert torch.allclose(ap[top_layer], library_ap.effect[0], atol=1e-3)
assert float(patched.max()) > 0.3  # one head alone restores a large share of the logit difference

# %% [markdown]
# ## Exercise 4 · Path patching to the logits
# *Difficulty ●●○ · about 15 minutes*
#
# Activation patching mixes two things: what a head writes to the logits itself, and what it changes in later
# heads and MLPs. Path patching separates them. Restore head $h$'s clean output on the corrupted run, but freeze
# every other head and every MLP at their corrupted values: then the only change anywhere is that the final
# residual stream gains the head's output difference,
#
# $$x' = x_\text{corrupt} + W_O^{l,h}\big(z^{l,h}_\text{clean} - z^{l,h}_\text{corrupt}\big),$$
#
# and the logits are $W_U\,\mathrm{norm}(x')$, the norm **recomputed** on $x'$. No forward pass per head is
# needed. Write `path_patch_to_logits(model, clean_ids, corrupt_ids, metric)` returning `[layer, head]`
# normalised effects. The metric reads the last position, so logits of shape `[n, 1, vocab]` are enough.
#
# <details><summary>Hint</summary>Cache <code>hook_z</code> of every layer and <code>hook_resid_post</code> of the last
# one on both runs. For one layer, <code>delta = einops.einsum(dz, W_O, "n head d_head, head d_head d_model -> head n
# d_model")</code>; then <code>model.get_output_embeddings()(final_norm(model)(x + delta))</code> gives every head's
# patched logits at once.</details>

# %%
def path_patch_to_logits(model, clean_ids, corrupt_ids, metric) -> torch.Tensor:
    """``[layer, head]``: normalised effect of one head's clean output on the corrupted run through its direct path
    to the logits only (every other head and every MLP frozen, the final norm recomputed)."""
    ### BEGIN SOLUTION
    view = fta.nn.ModelView(model)
    last = view.n_layers - 1
    names = [f"layers.{layer}.attn.hook_z" for layer in range(view.n_layers)] + [f"layers.{last}.hook_resid_post"]
    clean_logits, clean_cache = run_with_cache(model, clean_ids, names_filter=names)
    corrupt_logits, corrupt_cache = run_with_cache(model, corrupt_ids, names_filter=names)
    m_clean, m_corrupt = metric(clean_logits).mean(), metric(corrupt_logits).mean()
    norm, unembed = final_norm(model), model.get_output_embeddings()
    x = corrupt_cache[f"layers.{last}.hook_resid_post"][:, -1:]  # [n, 1, d_model]
    effect = torch.zeros(view.n_layers, view.n_heads)
    for layer in range(view.n_layers):
        name = f"layers.{layer}.attn.hook_z"
        dz = clean_cache[name][:, -1] - corrupt_cache[name][:, -1]  # [n, head, d_head]
        W_O = einops.rearrange(view.get(f"layers.{layer}.attn.o"), "d_model (head d_head) -> head d_head d_model",
                               d_head=view.d_head)
        delta = einops.einsum(dz, W_O, "n head d_head, head d_head d_model -> head n d_model")
        logits = unembed(norm(x + delta[:, :, None]))  # [head, n, 1, vocab], the norm recomputed on x'
        for head in range(view.n_heads):
            effect[layer, head] = (metric(logits[head]).mean() - m_corrupt) / (m_clean - m_corrupt)
    return effect
    ### END SOLUTION


# %% tags=["check"]
checks.check_path_patch_to_logits(path_patch_to_logits)

# %% [markdown]
# On SmolLM2, checked against the library's `path_patching` for a few senders. The library follows Wang et al.:
# it runs its *first* input and gives the sender its *second* input's output, normalising by
# $m(\text{first}) - m(\text{second})$. Called with `(corrupt, clean)` it is this exercise, with the sign flipped.
#
# DLA of the clean run minus DLA of the corrupted run is the same quantity to first order: it freezes the
# norm's scale (at each run's own value) instead of recomputing it.

# %%
pp = path_patch_to_logits(model, clean, corrupt, metric).cpu()
order = pp.flatten().abs().argsort(descending=True).tolist()
senders = [divmod(i, view.n_heads) for i in order[:3]] + [(0, 0), (swept[0], 1)]
library_pp = path_patching(model, corrupt, clean, metric, senders=senders, receiver_input="logits", freeze_mlps=True)
mine_at = torch.tensor([float(pp[h]) for h in senders])
library_at = torch.tensor([-float(library_pp.effect[h]) for h in senders])
print("senders:", senders)
print("mine:   ", mine_at.numpy().round(4), "\nlibrary:", library_at.numpy().round(4))

dla_corrupt = head_dla(model, corrupt, io, s).cpu()
first_order = (dla - dla_corrupt) / (m_clean - m_corrupt)
r = torch.corrcoef(torch.stack([pp.flatten(), first_order.flatten()]))[0, 1]
print(f"correlation of path patching to the logits with (DLA clean - DLA corrupt) / gap: {float(r):.3f}")
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
head_heatmap(pp, title="path patching to the logits", ax=axes[0])
axes[1].scatter(first_order.flatten(), pp.flatten(), s=8)
axes[1].axline((0, 0), slope=1, color="grey", lw=0.8, ls="--")
axes[1].set_xlabel("(DLA clean - DLA corrupt) / gap")
axes[1].set_ylabel("path patching to the logits")
fig.tight_layout()

# %%
assert torch.allclose(mine_at, library_at, atol=1e-3)
assert r > 0.9

# %% [markdown]
# ## What you found
#
# Three rankings of the same heads, each computed above by your own code: DLA on the clean prompts, activation
# patching and path patching to the logits (the last two within the swept layers). A head is
#
# - a **name mover** if it writes IO directly (positive DLA and a positive direct path),
# - a **negative name mover** if it writes against IO directly (negative DLA and direct path),
# - **indirect** if restoring it matters (activation patching) but its direct path carries less than a tenth of that:
#   it works through later heads.

# %%
k = 8
heads = [(layer, head) for layer in swept for head in range(view.n_heads)]


def top(values: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` swept heads with the largest |value|."""
    return sorted(heads, key=lambda h: -abs(float(values[h])))[:k]


top_dla, top_ap, top_pp = top(dla, k), top(ap, k), top(pp, k)


def role(h) -> str:
    if abs(float(pp[h])) < 0.1 * abs(float(ap[h])):
        return "indirect"
    if float(dla[h]) > 0 and float(pp[h]) > 0:
        return "name mover"
    if float(dla[h]) < 0 and float(pp[h]) < 0:
        return "negative name mover"
    return "mixed"


found = sorted(set(top_dla) | set(top_ap), key=lambda h: -abs(float(ap[h])))  # by patching effect
print(f"{'head':>8} {'DLA':>7} {'patching':>9} {'path->logits':>13}  role")
for h in found:
    print(f"L{h[0]:>2}.H{h[1]} {float(dla[h]):7.2f} {float(ap[h]):9.3f} {float(pp[h]):13.3f}  {role(h)}")

# how much top-k DLA and top-k patching agree, against random k-sets of the swept heads
overlap = len(set(top_dla) & set(top_ap))
g = torch.Generator().manual_seed(0)
chance = torch.tensor([len({heads[i] for i in torch.randperm(len(heads), generator=g)[:k].tolist()} & set(top_ap))
                       for _ in range(2000)]).float()
print(f"\ntop-{k} DLA heads among the top-{k} patching heads: {overlap} "
      f"(random sets of {k}: mean {float(chance.mean()):.2f}, 99th percentile {float(chance.quantile(0.99)):.0f})")
fig = head_heatmap(ap - pp, title="activation patching minus the direct path: what acts through later layers")

# %%
assert overlap > float(chance.quantile(0.99)), "top DLA and top patching heads overlap no more than chance"
assert any(role(h) == "name mover" for h in top_ap[:3]), "a name mover among the three strongest patching heads"
assert any(float(dla[h]) < 0 for h in top_dla[:4]), "a negative name mover among the four largest DLA heads"

# %% [markdown]
# **The indirect heads.** Wang et al.'s S-inhibition heads write, at the last position, *which name is repeated*;
# the name movers read it in their **queries** and avoid that name. Path patching through the name movers' queries
# (the library's `path_patching` with `receiver_input="q"`: clean run, sender corrupted, effect read after the
# receivers' queries alone see the change; -1 would mean this path carries the whole corruption) tests that for
# the indirect heads you found, with the name movers you found as receivers and random heads as a control.

# %%
indirect = [h for h in top_ap[:5] if role(h) == "indirect"]
movers = [h for h in found if role(h) == "name mover"]
below = [h for h in heads if h[0] < max(layer for layer, _ in movers) and h not in top_ap and h not in movers]
controls = [below[i] for i in torch.randperm(len(below), generator=torch.Generator().manual_seed(1))[:3].tolist()]
through_q = path_patching(model, clean, corrupt, metric, senders=indirect + controls, receivers=movers,
                          receiver_input="q")
print("name movers (receivers):", movers)
for h in indirect + controls:
    print(f"  L{h[0]}.H{h[1]} ({'indirect' if h in indirect else 'control'}): effect through the name movers' queries "
          f"{float(through_q.effect[h]):+.3f}")
strongest = min(float(through_q.effect[h]) for h in indirect)
negative = [h for h in found if role(h) == "negative name mover"]
print(f"\nThe heads this lab found (strongest patching effect first): name movers {movers}, negative name movers "
      f"{negative}, indirect {[h for h in found if role(h) == 'indirect']}.")

# %%
assert indirect, "no head with a large patching effect and a small direct path"
# at least one indirect head acts through the name movers' queries, far beyond any random head
assert strongest < -0.05 and strongest < min(float(through_q.effect[h]) for h in controls) - 0.05

# %% [markdown] tags=["solution"]
# **What to see** (numbers measured at `FTA_SCALE=ci`, 8 prompts). Both methods put a name mover at the top
# (L23.H3: restoring it alone brings back about two thirds of the logit difference, most of it through its direct
# path), and both find negative name movers (L24.H4, L29.H0) that *lower* the logit difference. The heads they
# disagree on are the instructive ones: L20.H0 and L17.H4 restore a large share when patched but write almost
# nothing to the logits. L20.H0 acts through the name movers' queries, Wang et al.'s S-inhibition mechanism; L17.H4
# does not, so it acts further upstream (on the S-inhibition heads themselves, for instance), which path patching
# with L20.H0 as the receiver would show. DLA alone would miss these heads; activation patching alone would not say
# *how* they act.
