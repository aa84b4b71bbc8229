"""Benchmark: activation patching of every head at every position, batched vs one forward pass per component.

A random GPT-2-shaped model (12 layers, 12 heads; d_model 192 by default, so it runs on a laptop CPU), one
clean/corrupt pair of 32 tokens, ``hook_z`` patched at each of the 12 x 32 x 12 = 4,608 (layer, position, head)
components. ``fta.probes.activation_patching`` packs many patched copies of the corrupted input into each
forward pass (``method="batched"``); the reference runs one forward pass per component (``method="loop"``).
Both must give the same numbers. Wall-clock and CPU seconds are both reported: with ``--threads 1`` on a
machine shared with other jobs, the CPU time of this process is the fair measure. With ``--transformer-lens`` (and TransformerLens >= 4 importable), the same
patching is also run with ``transformer_lens.patching.get_act_patch_attn_head_out_by_pos`` on a bridge
around a copy of the model, and compared numerically.

Usage::

    python benchmarks/patching_batched.py                    # ~2 minutes on 2 CPU cores
    python benchmarks/patching_batched.py --d-model 768      # GPT-2 small width (compute-bound: smaller ratio)
    python benchmarks/patching_batched.py --transformer-lens
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ftanalysis.probes.circuits import activation_patching, logit_diff


def build(args) -> GPT2LMHeadModel:
    torch.manual_seed(args.seed)
    config = GPT2Config(n_layer=args.layers, n_head=args.heads, n_embd=args.d_model, n_inner=4 * args.d_model,
                        n_positions=max(64, args.seq), vocab_size=args.vocab)
    return GPT2LMHeadModel(config).eval()


def timed(fn):
    """``(result, wall seconds, CPU seconds of this process)``; on a shared machine the CPU time is the fair one."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def transformer_lens_run(model, clean, corrupt, metric):
    """The same patching through TransformerLens' bridge (None if TransformerLens >= 4 is not importable)."""
    try:
        import transformer_lens.patching as tl_patching
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoTokenizer
    except ImportError:
        return None
    import ftanalysis as fta

    tok = fta.tasks.build_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(folder, hf_model=copy.deepcopy(model),
                                                     tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu")
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean)
        clean_m, corrupt_m = metric(bridge(clean)).mean(), metric(bridge(corrupt)).mean()
    normalised = lambda logits: (metric(logits).mean() - corrupt_m) / (clean_m - corrupt_m)  # noqa: E731
    return timed(lambda: tl_patching.get_act_patch_attn_head_out_by_pos(bridge, corrupt, clean_cache, normalised))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=512, help="rows per forward pass of the batched run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transformer-lens", action="store_true", help="also time and compare TransformerLens")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args)
    g = torch.Generator().manual_seed(args.seed)
    clean = torch.randint(3, args.vocab, (1, args.seq), generator=g)
    corrupt = clean.clone()
    corrupt[:, [3, args.seq // 2, args.seq - 3]] = torch.randint(3, args.vocab, (1, 3), generator=g)
    metric = logit_diff(torch.tensor([5]), torch.tensor([6]))
    activation_patching(model, clean, corrupt, metric, layers=[0], positions=[0])  # warm-up

    batched, t_batched, cpu_batched = timed(lambda: activation_patching(model, clean, corrupt, metric, batch_size=args.batch_size))
    loop, t_loop, cpu_loop = timed(lambda: activation_patching(model, clean, corrupt, metric, method="loop"))
    components = batched.effect.numel()
    report = {
        "model": f"GPT-2 {args.layers} layers x {args.heads} heads, d_model {args.d_model}, vocab {args.vocab}, random",
        "sequence": args.seq,
        "components": components,
        "batched_seconds": round(t_batched, 2),
        "loop_seconds": round(t_loop, 2),
        "speedup": round(t_loop / t_batched, 1),
        "batched_cpu_seconds": round(cpu_batched, 2),
        "loop_cpu_seconds": round(cpu_loop, 2),
        "speedup_cpu_time": round(cpu_loop / cpu_batched, 1),
        "max_abs_difference": float((batched.effect - loop.effect).abs().max()),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2), flush=True)
    if args.transformer_lens:
        tl = transformer_lens_run(model, clean, corrupt, metric)
        if tl is None:
            report["transformer_lens"] = "not installed"
        else:
            result, seconds, cpu = tl
            report["transformer_lens_seconds"] = round(seconds, 2)
            report["transformer_lens_cpu_seconds"] = round(cpu, 2)
            report["transformer_lens_max_abs_difference"] = float((result.float() - batched.effect).abs().max())
        print(json.dumps({k: v for k, v in report.items() if k.startswith("transformer_lens")}, indent=2))
    return report


if __name__ == "__main__":
    main()
