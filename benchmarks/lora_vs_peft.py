"""Our LoRA's training-step time divided by Hugging Face PEFT's, on the same model, adapter and batch.

Both adapters start from the same A and B (ours are copied into PEFT's layers; on GPT-2 our q/k/v adapters
become PEFT's rank-3r block adapter on ``c_attn``), so both start as the same function; the script checks the
logits before training and the first loss, and on Llama (same parametrisation) the losses at every step and the
logits after. On GPT-2 PEFT's block adapter also trains the off-diagonal blocks of its B (3x our B entries on
``c_attn``), so the runs drift apart and PEFT does slightly more work per step. The two are timed side by side in one
process: each iteration runs one step of each, in alternating order, after a warm-up; the reported ratio is
median(ours) / median(PEFT) over the timed iterations (target: <= 1.0).

    python benchmarks/lora_vs_peft.py                          # Llama-shaped, d=384, 4 layers, CPU
    python benchmarks/lora_vs_peft.py --arch gpt2 --d-model 512 --steps 100
    python benchmarks/lora_vs_peft.py --device cuda --batch 16 --seq 256
    python benchmarks/lora_vs_peft.py --threads 1 --clock cpu     # on a busy shared CPU machine
    python benchmarks/lora_vs_peft.py --model smollm2-135m --seq 32 --threads 1 --clock cpu --json out.json

``--model`` takes a pretrained model by zoo name (``fta.zoo.load``; e.g. SmolLM2-135M, a Llama) instead of a
randomly initialised one; ``--arch``, ``--d-model``, ``--layers`` and ``--vocab`` are then read from the model.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import ftanalysis as fta
from ftanalysis.methods.peft_io import _block_adapter


def build_base(arch: str, d_model: int, n_layers: int, vocab: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    heads = max(1, d_model // 64)
    if arch == "gpt2":
        config = GPT2Config(  # no dropout: both runs must compute the same numbers (Llama has none by default)
            n_embd=d_model, n_layer=n_layers, n_head=heads, n_inner=4 * d_model, n_positions=1024, vocab_size=vocab,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        hidden_size=d_model, intermediate_size=int(8 / 3 * d_model) // 8 * 8, num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config)


def peft_twin(base: torch.nn.Module, ours: torch.nn.Module, lora: fta.methods.LoRA, arch: str):
    """PEFT's LoRA on a copy of ``base`` holding exactly our A and B (block-structured on GPT-2's c_attn)."""
    import peft

    layers = lora.lora_layers(ours)
    ranks = {path: layer.r * len(layer.parts) for path, layer in layers.items()}
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.scaling * lora.r, target_modules=sorted(layers), fan_in_fan_out=arch == "gpt2",
        rank_pattern={p: R for p, R in ranks.items() if R != lora.r},
        alpha_pattern={p: lora.scaling * R for p, R in ranks.items() if R != lora.r},
    )
    twin = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for path, layer in layers.items():
            target = twin.base_model.model.get_submodule(path)
            A, B = _block_adapter(layer)
            target.lora_A["default"].weight.copy_(A)
            target.lora_B["default"].weight.copy_(B)
    return twin


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a pretrained zoo model (fta.zoo.load), e.g. smollm2-135m; "
                        "default: a randomly initialised one of --arch / --d-model / --layers / --vocab")
    parser.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="timed iterations (one step of each per iteration)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: fta.choose_device())")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest loss / logit gap accepted between the two runs")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: time.perf_counter; cpu: this process's CPU time (steadier on a shared CPU machine, with --threads 1)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = fta.choose_device(args.device)

    if args.model:
        base, _ = fta.zoo.load(args.model)
        config = base.config
        if config.model_type not in ("llama", "gpt2"):
            raise SystemExit(f"--model {args.model}: a {config.model_type} model; this script knows llama and gpt2")
        args.arch = config.model_type
        args.d_model = config.hidden_size
        args.layers = config.num_hidden_layers
        args.vocab = config.vocab_size
    else:
        base = build_base(args.arch, args.d_model, args.layers, args.vocab, args.seed)
    lora = fta.methods.LoRA(r=args.r, alpha=args.alpha, target="all-linear")
    torch.manual_seed(args.seed)
    ours = lora.apply(base, copy=True)
    with torch.no_grad():  # non-zero B, so that both adapters do real work from step 0
        g = torch.Generator().manual_seed(args.seed)
        for layer in lora.lora_layers(ours).values():
            for B in layer.lora_B.values():
                B.copy_(torch.randn(B.shape, generator=g) * 0.01)
    theirs = peft_twin(base, ours, lora, args.arch)
    ours.to(device).train()
    theirs.to(device).train()
    opt_ours = lora.make_optimizer(ours, lr=1e-4)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed + 1)).to(device)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def step(model, optimizer) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start, loss.item()

    with torch.no_grad():  # same A and B: the two adapted models are the same function before training
        ours.eval()
        theirs.eval()
        start_gap = float((ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max())
        ours.train()
        theirs.train()
    times = {"ours": [], "peft": []}
    worst_loss_gap = 0.0
    for i in range(args.warmup + args.steps):
        order = [("ours", ours, opt_ours), ("peft", theirs, opt_theirs)]
        if i % 2:
            order.reverse()
        losses = {}
        for name, model, optimizer in order:
            seconds, losses[name] = step(model, optimizer)
            if i >= args.warmup:
                times[name].append(seconds)
        if i == 0:
            first_loss_gap = abs(losses["ours"] - losses["peft"])
            first_losses = dict(losses)
        worst_loss_gap = max(worst_loss_gap, abs(losses["ours"] - losses["peft"]))
    with torch.no_grad():
        ours.eval()
        theirs.eval()
        logits_gap = float((ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max())
    med_ours, med_peft = statistics.median(times["ours"]), statistics.median(times["peft"])
    trainable = sum(p.numel() for _, p in lora.trainable_parameters(ours))
    targeted = sorted({path.rsplit(".", 1)[-1] for path in lora.lora_layers(ours)})
    report = {
        "model": args.model or f"random {args.arch}",
        "arch": args.arch,
        "d_model": args.d_model,
        "layers": args.layers,
        "vocab": args.vocab,
        "params": sum(p.numel() for p in base.parameters()),
        "r": args.r,
        "alpha": args.alpha,
        "adapted_layers": len(lora.lora_layers(ours)),
        "adapted_modules": targeted,
        "trainable": trainable,
        "batch": [args.batch, args.seq],
        "device": str(device),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "steps": args.steps,
        "warmup": args.warmup,
        "ratio": med_ours / med_peft,
        "ours_ms": 1e3 * med_ours,
        "peft_ms": 1e3 * med_peft,
        "start_logit_gap": start_gap,
        "first_loss_gap": first_loss_gap,
        "first_loss": first_losses,
        "max_loss_gap": worst_loss_gap,
        "max_logit_gap": logits_gap,
        # the same iteration's two steps ran back to back: their ratio cancels slow drifts of the machine
        "paired_ratio_median": statistics.median(a / b for a, b in zip(times["ours"], times["peft"])),
        "ours_ms_quartiles": [1e3 * q for q in statistics.quantiles(times["ours"], n=4)] if args.steps > 1 else None,
        "peft_ms_quartiles": [1e3 * q for q in statistics.quantiles(times["peft"], n=4)] if args.steps > 1 else None,
    }
    print(
        (f"{args.model} ({report['params'] / 1e6:.1f}M params), " if args.model else "")
        + f"{args.arch}: d_model={args.d_model}, layers={args.layers}, LoRA r={args.r} on all linear layers "
        f"({trainable:,} trainable), batch {args.batch} x {args.seq} tokens, {device}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock"
    )
    print(f"median step over {args.steps} steps (after {args.warmup} warm-up): ours {report['ours_ms']:.2f} ms, PEFT {report['peft_ms']:.2f} ms")
    print(f"same function at the start: max |logit gap| = {start_gap:.2e}, |loss gap| at step 0 = {first_loss_gap:.2e}")
    print(f"after training: max |loss gap| over all steps = {worst_loss_gap:.2e}, max |logit gap| = {logits_gap:.2e}"
          + ("  (GPT-2: PEFT's block adapter also trains the off-diagonal blocks of B, so the runs drift apart)" if args.arch == "gpt2" else ""))
    print(f"ratio ours / PEFT = {report['ratio']:.3f}  (target <= 1.0)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    # Llama: the same parametrisation, so the same numbers at every step. GPT-2: PEFT adapts the fused c_attn
    # with one rank-3r adapter whose B has off-diagonal blocks (zero at the start, trained after), so only the
    # starting function is shared.
    gaps = [start_gap, first_loss_gap] + ([worst_loss_gap, logits_gap] if args.arch == "llama" else [])
    if max(gaps) > args.tolerance:
        raise SystemExit(
            f"The two adapters did not compute the same numbers (gaps {[f'{g:.2e}' for g in gaps]} > --tolerance "
            f"{args.tolerance:g}): the timing would compare different work."
        )
    return report


if __name__ == "__main__":
    main()
