"""Benchmarks on a real pretrained LM, SmolLM2-135M-Instruct (``fta.zoo.load("smollm2-135m")``).

Three parts, each timed side by side in one run (``--parts``, default all three):

``lora``
    Our LoRA's training-step time divided by PEFT's: ``benchmarks/lora_vs_peft.py --model smollm2-135m``
    (r=8, alpha 16 on q, k, v, o, gate, up and down of all 30 layers, AdamW, the same A and B in both, batch
    ``--batch`` x ``--seq`` random token ids, interleaved steps after a warm-up, ratio of the medians; exits
    with an error unless both compute the same logits and losses). Target: <= 1.0.
``spectral``
    ``fta.probes.spectral_report`` against the naive report of ``benchmarks/spectral_report.py`` (full SVDs of
    W0 and W1 and all singular values of dW, per matrix; imported from there) on SmolLM2 and two fine-tunes of
    it, all written as safetensors folders (``save_pretrained``) to a temporary folder. The fine-tunes are the
    shipped LoRA adapters ``data/finetuned/smollm2-facts-lora-*`` merged into the base (``fta.load_peft``);
    ``--finetunes synthetic`` (or fewer than two adapters on disk) uses a random rank-8 update per matrix
    instead. Our report runs first on fine-tune 1 (empty SVD cache) and then on fine-tune 2 (the base's SVDs
    cached in memory); the intruder counts must be identical to the naive report's. Target: >= 5x, second.
``load``
    ``fta.zoo.load("smollm2-135m")`` in a fresh ``$FTA_CACHE_DIR`` (a temporary folder: the GGUF file is
    dequantized and written as a safetensors folder) against a second load from that cache; each in a fresh
    Python process, with the import of ``ftanalysis`` timed separately. The temporary folder is removed.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/smollm2.py --threads 1 --clock cpu --json out.json
    python benchmarks/smollm2.py --parts lora --steps 5 --warmup 2 --threads 1      # a quick look
    python benchmarks/smollm2.py --parts spectral --finetunes synthetic --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FINETUNED = HERE.parent / "data" / "finetuned"
MODEL = "smollm2-135m"
# the two adapters used by default for the spectral part: first two of these that exist (larger updates first)
DEFAULT_ADAPTERS = [
    "smollm2-facts-lora-r8-lr0.003", "smollm2-facts-lora-r4-lr0.003", "smollm2-facts-lora-r8-lr0.001",
    "smollm2-facts-lora-r4-lr0.001", "smollm2-facts-lora-r1-lr0.003", "smollm2-facts-lora-r1-lr0.001",
]


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> dict[str, float]:
    wall, cpu = clocks()
    return {"wall": wall - start[0], "cpu": cpu - start[1]}


# ----------------------------------------------------------------------------------------------------------- lora

def run_lora(args) -> dict:
    sys.path.insert(0, str(HERE))
    import lora_vs_peft

    argv = [
        "--model", MODEL, "--r", str(args.r), "--alpha", str(args.alpha), "--batch", str(args.batch), "--seq", str(args.seq),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--clock", args.clock, "--seed", str(args.seed),
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return lora_vs_peft.main(argv)


# ------------------------------------------------------------------------------------------------------- spectral

def available_adapters() -> list[str]:
    return [name for name in DEFAULT_ADAPTERS if (FINETUNED / name / "adapter_model.safetensors").is_file()]


def first_layers(model, n: int | None):
    """``model`` cut to its first ``n`` decoder layers (in place; quick checks only), or unchanged."""
    if n is not None and n < model.config.num_hidden_layers:
        model.model.layers = model.model.layers[:n]
        model.config.num_hidden_layers = n
    return model


def write_pair(root: Path, finetunes: str, adapters: list[str] | None, seed: int, layers: int | None = None) -> dict:
    """Base and two fine-tunes of SmolLM2 as Hugging Face folders; returns their paths and how they were made."""
    import torch
    from transformers.utils import logging as hf_logging

    import ftanalysis as fta

    hf_logging.disable_progress_bar()  # "Writing model shards" bars
    base, _ = fta.zoo.load(MODEL)
    first_layers(copy.deepcopy(base), layers).save_pretrained(root / "base")
    paths, made = {"base": root / "base"}, {}
    if finetunes == "auto":
        finetunes = "adapters" if len(adapters or available_adapters()) >= 2 else "synthetic"
    if finetunes == "adapters":
        names = adapters or available_adapters()[:2]
        if len(names) < 2:
            raise SystemExit(f"--finetunes adapters needs two adapters in {FINETUNED}; found {available_adapters()}")
        for key, name in zip(("ft1", "ft2"), names):
            first_layers(fta.load_peft(base, FINETUNED / name), layers).save_pretrained(root / key)
            paths[key], made[key] = root / key, f"adapter {name} merged (fta.load_peft)"
    else:  # W1 = W0 + B A, rank 8, scaled to ||BA||_2 = 0.3 ||W0||_2, in every attention / MLP matrix
        for i, key in enumerate(("ft1", "ft2")):
            g = torch.Generator().manual_seed(seed + 1 + i)
            ft = fta.zoo.load(MODEL)[0]
            with torch.no_grad():
                for name, module in ft.named_modules():
                    if isinstance(module, torch.nn.Linear) and ".layers." in name:
                        W = module.weight
                        B = torch.randn(W.shape[0], 8, generator=g) / W.shape[0] ** 0.5
                        A = torch.randn(8, W.shape[1], generator=g) / W.shape[1] ** 0.5
                        dW = B @ A
                        W += 0.3 * torch.linalg.matrix_norm(W, ord=2) / torch.linalg.matrix_norm(dW, ord=2) * dW
            first_layers(ft, layers).save_pretrained(root / key)
            paths[key], made[key] = root / key, "synthetic rank-8 update per matrix, ||dW||_2 = 0.3 ||W0||_2"
            del ft
    del base
    return {"paths": paths, "made": made}


def run_spectral(args) -> dict:
    import numpy as np

    import ftanalysis as fta

    sys.path.insert(0, str(HERE))
    from spectral_report import naive_report

    with tempfile.TemporaryDirectory(prefix="fta_smollm2_spectral_") as tmp:
        root = Path(tmp)
        print(f"writing SmolLM2 and two fine-tunes to {root} ...", flush=True)
        pair = write_pair(root, args.finetunes, args.adapters, args.seed, args.layers)
        paths = pair["paths"]
        size = (paths["ft1"] / "model.safetensors").stat().st_size
        out: dict = {"finetunes": pair["made"], "layers": args.layers or "all", "checkpoint_MiB": round(size / 2**20, 1)}
        runs = {}
        cache = fta.probes.SVDCache()
        # naive, then ours, per fine-tune: the first report of ours fills the cache, the second reuses it
        for key in ("ft1", "ft2"):
            start = clocks()
            naive = naive_report(paths["base"], paths[key])
            runs[f"naive_{key}"] = (naive, since(start))
            print(f"naive {key}: {runs[f'naive_{key}'][1]}", flush=True)
            start = clocks()
            ours = fta.probes.spectral_report(paths["base"], paths[key], cache=cache)
            runs[f"ours_{key}"] = (ours, since(start))
            print(f"ours  {key}: {runs[f'ours_{key}'][1]}", flush=True)
    clock = args.clock
    for i, key in enumerate(("ft1", "ft2"), start=1):
        naive, t_naive = runs[f"naive_{key}"]
        ours, t_ours = runs[f"ours_{key}"]
        eff = np.max(np.abs(ours["effective_rank"].to_numpy() / naive["effective_rank"].to_numpy() - 1))
        out[key] = {
            "naive_s": {c: round(t, 2) for c, t in t_naive.items()},
            "ours_s": {c: round(t, 2) for c, t in t_ours.items()},
            "speedup": round(t_naive[clock] / t_ours[clock], 2),
            "speedup_other_clock": round(t_naive[other(clock)] / t_ours[other(clock)], 2),
            "identical_intruder_counts": ours["intruders"].tolist() == naive["intruders"].tolist(),
            "intruders": int(ours["intruders"].sum()),
            "intruders_naive": int(naive["intruders"].sum()),
            "matrices_with_intruders": int((ours["intruders"] > 0).sum()),
            "effective_rank_max_rel_diff": float(eff),
            "gram_path_share": round(float((ours["topk_path"] == "gram").mean()), 3),
            "cached": i == 2,
        }
    out["matrices"] = len(runs["ours_ft2"][0])
    out["speedup_first"], out["speedup_second"] = out["ft1"]["speedup"], out["ft2"]["speedup"]
    out["identical_intruder_counts"] = out["ft1"]["identical_intruder_counts"] and out["ft2"]["identical_intruder_counts"]
    print(json.dumps(out, indent=1), flush=True)
    return out


def other(clock: str) -> str:
    return "wall" if clock == "cpu" else "cpu"


# ----------------------------------------------------------------------------------------------------------- load

LOAD_CODE = """
import json, time
w, c = time.perf_counter(), time.process_time()
import torch
torch.set_num_threads({threads})
import ftanalysis as fta
imp = {{"wall": time.perf_counter() - w, "cpu": time.process_time() - c}}
w, c = time.perf_counter(), time.process_time()
model, tok = fta.zoo.load({model!r})
load = {{"wall": time.perf_counter() - w, "cpu": time.process_time() - c}}
print(json.dumps({{"import": imp, "load": load, "params": sum(p.numel() for p in model.parameters()),
                  "folder": str(fta.zoo.smollm2.cached_dir())}}))
"""


def run_load(args) -> dict:
    import torch

    threads = args.threads or torch.get_num_threads()
    code = LOAD_CODE.format(threads=threads, model=MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="fta_smollm2_cache_"))
    out: dict = {}
    try:
        env = {**os.environ, "FTA_CACHE_DIR": str(tmp)}
        for key in ("first", "cached"):
            start = clocks()
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"the {key} load failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["process_wall"] = time.perf_counter() - start[0]
            out[key] = result
            print(f"{key} load: {result}", flush=True)
        assert Path(out["first"]["folder"]).is_relative_to(tmp), "the load did not honour $FTA_CACHE_DIR"
        out["cache_MiB"] = round(sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**20, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    clock = args.clock
    out["ratio_first_over_cached"] = round(out["first"]["load"][clock] / out["cached"]["load"][clock], 1)
    out["ratio_other_clock"] = round(out["first"]["load"][other(clock)] / out["cached"]["load"][other(clock)], 1)
    out["temp_cache_removed"] = not tmp.exists()
    print(json.dumps({k: v for k, v in out.items() if k not in ("first", "cached")}), flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["lora", "spectral", "load"], default=["lora", "spectral", "load"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="the clock of the ratios (both are recorded): wall (time.perf_counter) or this process's CPU time",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--seed", type=int, default=0)
    lora = parser.add_argument_group("lora")
    lora.add_argument("--r", type=int, default=8)
    lora.add_argument("--alpha", type=float, default=16.0)
    lora.add_argument("--batch", type=int, default=8)
    lora.add_argument("--seq", type=int, default=32)
    lora.add_argument("--steps", type=int, default=30, help="timed iterations (one step of each per iteration)")
    lora.add_argument("--warmup", type=int, default=3)
    spectral = parser.add_argument_group("spectral")
    spectral.add_argument("--finetunes", choices=["auto", "adapters", "synthetic"], default="auto",
                          help="auto: two shipped adapters if they exist, else synthetic low-rank updates")
    spectral.add_argument("--adapters", nargs=2, metavar="NAME", default=None,
                          help=f"the two adapters of {FINETUNED} (default: the first two present of {DEFAULT_ADAPTERS})")
    spectral.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (quick checks)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {
        "model": MODEL, "threads": torch.get_num_threads(), "clock": args.clock, "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
    }
    try:
        import peft

        results["peft"] = peft.__version__
    except ImportError:
        pass

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    for part in args.parts:  # each part saved as it ends, so a failing later part keeps the earlier figures
        results[part] = {"lora": run_lora, "spectral": run_spectral, "load": run_load}[part](args)
        save()
    if "spectral" in results:
        assert results["spectral"]["identical_intruder_counts"], "the streamed report and the naive one disagree on intruder counts"
    return results


if __name__ == "__main__":
    main()
