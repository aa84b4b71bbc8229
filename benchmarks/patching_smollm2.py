"""Benchmark: head activation patching on SmolLM2-135M (IOI), batched vs one pass per head vs nnsight 0.8.

The real-model counterpart of ``patching_batched.py``. ``n`` IOI prompts of one token length (Wang et al.
2022: "When Mary and John went to the store, John gave a drink to" -> " Mary"), the ABC corruption (S2
replaced by a third name, same length), the logit difference IO - S at the last position. Each of the
30 x 9 = 270 heads has its ``hook_z`` (the input of ``o_proj``) patched clean-into-corrupted, either at every
position at once (``per_position=False``, the default) or at each position separately (``--per-position``:
``270 x tokens`` components; ``--per-position K`` sweeps the last ``K`` positions only). The ways compared:

- ``fta.probes.activation_patching(..., method="batched")``: many patched copies per forward pass;
- ``method="loop"``: one forward pass per component (the package's reference);
- nnsight 0.8 (the closest peer: it wraps the Hugging Face model without conversion), overwriting the head's
  slice of ``o_proj``'s input: one ``trace`` per component (``NNsight``), and batched the way nnsight batches,
  many ``invoke`` calls in one trace (``LanguageModel``; as many components per trace as ours packs per pass).

All must give the same effects (max |difference| reported); the ratios are wall-clock and CPU time of this
process, measured in one run. ``--layers`` restricts every way to some layers (the one-pass-per-component runs
of a whole per-position sweep take about an hour on one CPU thread).

Usage::

    python benchmarks/patching_smollm2.py --threads 1          # about 6 minutes on one CPU thread
    python benchmarks/patching_smollm2.py --threads 1 --n 16 --per-position 0 --layers 0 10 20 29
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


def nnsight_run(model, tok, clean, corrupt, metric, layers, positions=None, per_trace: int = 1):
    """The same patches with nnsight 0.8: ``per_trace`` components per trace (1: ``NNsight``, one trace each;
    more: ``LanguageModel``, one ``invoke`` per component); effects normalised like ours."""
    from nnsight import LanguageModel, NNsight

    view = fta.nn.ModelView(model)
    n_heads, dh = view.n_heads, view.d_head
    wrapped = NNsight(model) if per_trace == 1 else LanguageModel(model, tokenizer=tok)
    with torch.no_grad():
        saved = {}
        with wrapped.trace(clean):
            for layer in layers:
                saved[layer] = wrapped.model.layers[layer].self_attn.o_proj.input.save()
            clean_logits = wrapped.output.logits.save()
        with wrapped.trace(corrupt):
            corrupt_logits = wrapped.output.logits.save()
        clean_m, corrupt_m = float(metric(clean_logits).mean()), float(metric(corrupt_logits).mean())
        spots = [None] if positions is None else positions
        comps = [(i, j, layer, pos, head) for i, layer in enumerate(layers) for j, pos in enumerate(spots) for head in range(n_heads)]
        effect = torch.zeros(len(layers), len(spots), n_heads)
        for start in range(0, len(comps), per_trace):
            chunk, outputs = comps[start : start + per_trace], []
            if per_trace == 1:
                i, j, layer, pos, head = chunk[0]
                rows, cols = (slice(None) if pos is None else slice(pos, pos + 1)), slice(head * dh, (head + 1) * dh)
                with wrapped.trace(corrupt):
                    wrapped.model.layers[layer].self_attn.o_proj.input[:, rows, cols] = saved[layer][:, rows, cols]
                    outputs.append(wrapped.output.logits.save())
            else:
                with wrapped.trace() as tracer:
                    for _i, _j, layer, pos, head in chunk:
                        rows, cols = (slice(None) if pos is None else slice(pos, pos + 1)), slice(head * dh, (head + 1) * dh)
                        with tracer.invoke(corrupt):
                            wrapped.model.layers[layer].self_attn.o_proj.input[:, rows, cols] = saved[layer][:, rows, cols]
                            outputs.append(wrapped.output.logits.save())
            for (i, j, _layer, _pos, head), logits in zip(chunk, outputs):
                effect[i, j, head] = (float(metric(logits).mean()) - corrupt_m) / (clean_m - corrupt_m)
    return effect if positions is not None else effect[:, 0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8, help="IOI prompts (default 8)")
    parser.add_argument("--per-position", type=int, default=None, nargs="?", const=0, metavar="K",
                        help="patch each position separately (every position; with K, the last K only)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="patch these layers only (default: all 30)")
    parser.add_argument("--batch-size", type=int, default=512, help="rows per forward pass of the batched ways (default 512)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-loop", action="store_true", help="do not run the one-pass-per-component reference")
    parser.add_argument("--skip-nnsight", action="store_true", help="do not run nnsight at all")
    parser.add_argument("--skip-nnsight-loop", action="store_true", help="run nnsight batched only (not one trace per component)")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = fta.zoo.load("smollm2-135m")
    clean, corrupt, io, s = ioi_batch(tok, args.n, args.seed)
    metric = logit_diff(io, s)
    seq = clean.shape[1]
    layers = args.layers or list(range(fta.nn.ModelView(model).n_layers))
    per_position = args.per_position is not None
    positions = list(range(seq - args.per_position if args.per_position else 0, seq)) if per_position else None
    kwargs = dict(per_position=per_position, positions=positions, layers=layers, batch_size=args.batch_size)
    rows = {}
    batched, wall, cpu = timed(lambda: activation_patching(model, clean, corrupt, metric, "z", method="batched", **kwargs))
    rows["ftanalysis batched"] = {"wall_s": wall, "cpu_s": cpu}
    reference = batched.effect
    if not args.skip_loop:
        loop, wall, cpu = timed(lambda: activation_patching(model, clean, corrupt, metric, "z", method="loop", **kwargs))
        rows["ftanalysis loop (one pass per component)"] = {"wall_s": wall, "cpu_s": cpu, "max_abs_diff": float((loop.effect - reference).abs().max())}
    if not args.skip_nnsight:
        per_trace = max(1, args.batch_size // args.n)
        runs = {f"nnsight 0.8 ({per_trace} invokes per trace)": per_trace}
        if not args.skip_nnsight_loop:
            runs["nnsight 0.8 (one trace per component)"] = 1
        for label, k in runs.items():
            try:
                effect, wall, cpu = timed(lambda k=k: nnsight_run(model, tok, clean, corrupt, metric, layers, positions, per_trace=k))
            except ImportError:
                print("nnsight is not installed: pip install nnsight==0.8.1")
                break
            rows[label] = {"wall_s": wall, "cpu_s": cpu, "max_abs_diff": float((effect - reference).abs().max())}
    base = rows["ftanalysis batched"]
    for row in rows.values():
        row["wall_ratio_vs_batched"] = row["wall_s"] / base["wall_s"]
        row["cpu_ratio_vs_batched"] = row["cpu_s"] / base["cpu_s"]
    per_head = reference.amax(1) if per_position else reference
    top = torch.topk(per_head.flatten(), 5)
    n_heads = reference.shape[-1]
    report = {
        "model": "SmolLM2-135M-Instruct", "prompts": int(clean.shape[0]), "tokens": seq, "layers": layers,
        "components": int(reference.numel()), "per_position": per_position, "positions": positions,
        "clean_logit_diff": batched.clean_metric, "corrupt_logit_diff": batched.corrupt_metric,
        "top_heads": [f"L{layers[int(i) // n_heads]}.H{int(i) % n_heads} {float(v):.2f}" for v, i in zip(top.values, top.indices)],
        "threads": torch.get_num_threads(), "cpu": fta.notebook.cpu_name(), "torch": torch.__version__,
        "runs": rows,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
