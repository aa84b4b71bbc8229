"""Peak memory of MeZO against Adam full fine-tuning, on the same model and the same batches.

One run prints the peak memory of a few training steps of each (and of forward-only inference, MeZO's
floor), measured with :func:`ftanalysis.memory.peak_memory`: ``torch.cuda.max_memory_allocated`` on CUDA;
on CPU the peak resident set of a fresh Python process per measurement (``isolate=True``), the model built
inside the measured call so that its weights count in every row. The model is GPT-2-shaped and large enough
(about 25M parameters by default) that weights, gradients and optimiser state dominate the activations of a
small batch, the regime of MeZO's claim. Target: MeZO / Adam <= 0.5.

    python benchmarks/mezo_memory.py                    # CPU, or CUDA when available
    python benchmarks/mezo_memory.py --device cpu --layers 8 --d-model 512 --batch-size 4 --steps 3
"""

from __future__ import annotations

import argparse

import torch

import ftanalysis as fta
from ftanalysis.memory import peak_memory
from ftanalysis.zoo.architectures import TinyConfig, build_model

TASK = "modular_arithmetic"


def _setup(layers: int, d_model: int, device: str):
    tok = fta.tasks.build_tokenizer()
    config = TinyConfig(arch="gpt2", n_layers=layers, d_model=d_model, n_heads=max(1, d_model // 64), d_mlp=4 * d_model)
    model = build_model(config, tok, seed=0).to(device)
    return tok, fta.tasks.make(TASK, seed=0), model


def train(method: str, layers: int, d_model: int, batch_size: int, steps: int, device: str) -> dict:
    """Build the model and run ``steps`` steps of ``method`` ("adam" or "mezo"); returns sizes and timing."""
    tok, task, model = _setup(layers, d_model, device)
    chosen = fta.methods.Full() if method == "adam" else fta.methods.MeZO(eps=1e-3)
    lr = 1e-4 if method == "adam" else 1e-6
    result = fta.finetune(model, tok, task, chosen, steps=steps, lr=lr, batch_size=batch_size, seed=0, device=device,
                          eval_n=batch_size, copy=False, progress=False)
    return {"parameters": sum(p.numel() for p in model.parameters()), "seconds_per_step": result.seconds_per_step,
            "trainable": result.trainable_parameters}


@torch.no_grad()
def infer(method: str, layers: int, d_model: int, batch_size: int, steps: int, device: str) -> dict:
    """Build the model and run ``steps`` forward passes on the training batches (no autograd)."""
    tok, task, model = _setup(layers, d_model, device)
    model.eval()
    for step in range(steps):
        batch = task.batch(tok, batch_size, step=step, split="train", seed=0, device=device)
        task.loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
    return {"parameters": sum(p.numel() for p in model.parameters()), "seconds_per_step": float("nan"), "trainable": 0}


def measure(layers: int = 8, d_model: int = 512, batch_size: int = 4, steps: int = 3, device: str | None = None) -> dict:
    """Peak memory (bytes) of inference, MeZO and Adam, and the ratio MeZO / Adam."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    isolate = device == "cpu"
    rows = {}
    for label, fn, method in (("inference (forward only)", infer, "none"), ("MeZO", train, "mezo"), ("Adam (full fine-tuning)", train, "adam")):
        result = peak_memory(fn, method, layers, d_model, batch_size, steps, device, device=device, isolate=isolate)
        rows[label] = {"peak_bytes": result.peak_bytes, "backend": result.backend, **result.result}
    rows["ratio"] = rows["MeZO"]["peak_bytes"] / rows["Adam (full fine-tuning)"]["peak_bytes"]
    rows["device"] = device
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    rows = measure(args.layers, args.d_model, args.batch_size, args.steps, args.device)
    n = rows["MeZO"]["parameters"]
    backend = rows["MeZO"]["backend"]
    print(f"GPT-2 {args.layers} layers, d_model {args.d_model}: {n / 1e6:.1f}M parameters ({4 * n / 2**20:.0f} MiB in float32); "
          f"batch {args.batch_size} of {TASK}, {args.steps} steps; device {rows['device']}, measured by {backend}")
    print(f"{'run':<26}{'peak MiB':>10}{'s/step':>9}")
    for label in ("inference (forward only)", "MeZO", "Adam (full fine-tuning)"):
        row = rows[label]
        print(f"{label:<26}{row['peak_bytes'] / 2**20:>10.1f}{row['seconds_per_step']:>9.3f}")
    verdict = "meets" if rows["ratio"] <= 0.5 else "MISSES"
    print(f"MeZO / Adam peak memory: {rows['ratio']:.3f} ({verdict} the target <= 0.5)")


if __name__ == "__main__":
    main()
