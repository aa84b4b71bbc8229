"""Benchmark: head activation patching on SmolLM2-135M (IOI), batched vs one pass per head vs nnsight 0.8.

The real-model counterpart of ``patching_batched.py``. ``n`` IOI prompts of one token length (Wang et al.
2022: "When Mary and John went to the store, John gave a drink to" -> " Mary"), the ABC corruption (S2
replaced by a third name, same length), the logit difference IO - S at the last position. Each of the
30 x 9 = 270 heads has its ``hook_z`` (the input of ``o_proj``) patched clean-into-corrupted at every position
at once (``per_position=False``), three ways:

- ``fta.probes.activation_patching(..., method="batched")``: many patched copies per forward pass;
- ``method="loop"``: one forward pass per head (the package's reference);
- nnsight 0.8 (``NNsight(model)``, the closest peer: it wraps the Hugging Face model without conversion),
  one ``trace`` per head overwriting that head's slice of ``o_proj``'s input.

All three must give the same effects (max |difference| reported); the ratios are wall-clock and CPU time of
this process, measured in one run. ``--per-position K`` patches each head at each of the last ``K`` positions
separately instead (``270 K`` components).

Usage::

    python benchmarks/patching_smollm2.py --threads 1          # about 6 minutes on one CPU thread
    python benchmarks/patching_smollm2.py --per-position 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import ftanalysis as fta
from ftanalysis.probes.circuits import activation_patching, logit_diff


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def ioi_batch(tok, n: int, seed: int):
    """``(clean ids, ABC-corrupted ids, IO ids, S ids)`` of ``n`` prompts that share one token length."""
    task = fta.tasks.make("ioi", seed=seed)
    examples, length = [], None
    for ex in task.examples(20 * n, "test"):
        ids = tok(ex.prompt)["input_ids"]
        length = length or len(ids)
        if len(ids) == length and len(tok(task.abc(ex).prompt)["input_ids"]) == length:
            examples.append(ex)
        if len(examples) == n:
            break
    clean = torch.tensor([tok(ex.prompt)["input_ids"] for ex in examples])
    corrupt = torch.tensor([tok(task.abc(ex).prompt)["input_ids"] for ex in examples])
    io = [tok(" " + ex.io)["input_ids"][0] for ex in examples]
    s = [tok(" " + ex.s1)["input_ids"][0] for ex in examples]
    return clean, corrupt, io, s


def nnsight_run(model, clean, corrupt, metric, positions=None):
    """The same patches with nnsight 0.8: one trace per (layer, head[, position]); effects like ours."""
    from nnsight import NNsight

    view = fta.nn.ModelView(model)
    n_layers, n_heads, dh = view.n_layers, view.n_heads, view.d_head
    wrapped = NNsight(model)
    with torch.no_grad():
        saved = []
        with wrapped.trace(clean):
            for layer in range(n_layers):
                saved.append(wrapped.model.layers[layer].self_attn.o_proj.input.save())
        with wrapped.trace(clean):
            clean_logits = wrapped.output.logits.save()
        with wrapped.trace(corrupt):
            corrupt_logits = wrapped.output.logits.save()
        clean_m, corrupt_m = float(metric(clean_logits).mean()), float(metric(corrupt_logits).mean())
        spots = [None] if positions is None else positions
        effect = torch.zeros(n_layers, len(spots), n_heads)
        for layer in range(n_layers):
            for i, pos in enumerate(spots):
                rows = slice(None) if pos is None else slice(pos, pos + 1)
                for head in range(n_heads):
                    cols = slice(head * dh, (head + 1) * dh)
                    with wrapped.trace(corrupt):
                        wrapped.model.layers[layer].self_attn.o_proj.input[:, rows, cols] = saved[layer][:, rows, cols]
                        logits = wrapped.output.logits.save()
                    effect[layer, i, head] = (float(metric(logits).mean()) - corrupt_m) / (clean_m - corrupt_m)
    return effect if positions is not None else effect[:, 0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8, help="IOI prompts (default 8)")
    parser.add_argument("--per-position", type=int, default=0, metavar="K", help="patch each of the last K positions separately")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-loop", action="store_true", help="do not run the one-pass-per-head reference")
    parser.add_argument("--skip-nnsight", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = fta.zoo.load("smollm2-135m")
    clean, corrupt, io, s = ioi_batch(tok, args.n, args.seed)
    metric = logit_diff(io, s)
    seq = clean.shape[1]
    positions = list(range(seq - args.per_position, seq)) if args.per_position else None
    kwargs = dict(per_position=bool(args.per_position), positions=positions)
    rows = {}
    batched, wall, cpu = timed(lambda: activation_patching(model, clean, corrupt, metric, "z", method="batched", **kwargs))
    rows["ftanalysis batched"] = {"wall_s": wall, "cpu_s": cpu}
    reference = batched.effect
    if not args.skip_loop:
        loop, wall, cpu = timed(lambda: activation_patching(model, clean, corrupt, metric, "z", method="loop", **kwargs))
        rows["ftanalysis loop (one pass per component)"] = {"wall_s": wall, "cpu_s": cpu, "max_abs_diff": float((loop.effect - reference).abs().max())}
    if not args.skip_nnsight:
        try:
            effect, wall, cpu = timed(lambda: nnsight_run(model, clean, corrupt, metric, positions))
            rows["nnsight 0.8 (one trace per component)"] = {"wall_s": wall, "cpu_s": cpu, "max_abs_diff": float((effect - reference).abs().max())}
        except ImportError:
            print("nnsight is not installed: pip install nnsight")
    base = rows["ftanalysis batched"]
    for row in rows.values():
        row["wall_ratio_vs_batched"] = row["wall_s"] / base["wall_s"]
        row["cpu_ratio_vs_batched"] = row["cpu_s"] / base["cpu_s"]
    top = torch.topk(reference.flatten() if not args.per_position else reference.amax(1).flatten(), 5)
    n_heads = reference.shape[-1]
    report = {
        "model": "SmolLM2-135M-Instruct", "prompts": int(clean.shape[0]), "tokens": seq,
        "components": int(reference.numel()), "per_position": bool(args.per_position),
        "clean_logit_diff": batched.clean_metric, "corrupt_logit_diff": batched.corrupt_metric,
        "top_heads": [f"L{int(i) // n_heads}.H{int(i) % n_heads} {float(v):.2f}" for v, i in zip(top.values, top.indices)],
        "threads": torch.get_num_threads(), "cpu": fta.notebook.cpu_name(), "torch": torch.__version__,
        "runs": rows,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
