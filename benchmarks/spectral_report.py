"""Benchmark: the streamed, cached spectral report against a naive "full SVD of both, per matrix".

A GPT-2-shaped pair (12 layers, d = 768 by default; random weights) is written to a temporary folder as
safetensors: a base and two fine-tunes of it (dense noise on every block matrix, plus a rank-1 spike in every
third matrix so that intruder dimensions exist). Measured:

1. time of the naive report (load both state dicts; per matrix ``torch.linalg.svd`` of W0 and of W1 and
   ``torch.linalg.svdvals`` of dW, the same table) against ``fta.probes.spectral_report`` for the first
   fine-tune (cold cache) and for the second fine-tune of the same base (warm cache): wall clock and process
   CPU time; target: >= 5x for the second fine-tune;
2. the intruder counts of both, matrix by matrix (they must be identical);
3. the peak memory of the streamed report in a fresh subprocess (``VmHWM`` minus the resident size after
   imports), against one checkpoint's file size; target: < 1.5x. With the in-memory SVD cache the cold run
   also builds the cache (the base's singular vectors, about one base matrix per matrix), so it is the worst
   case; a disk cache (``cache=<dir>``) or none keeps only a few matrices in memory.

Run: ``python benchmarks/spectral_report.py [--layers 12] [--d-model 768] [--threads 1] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident size since the last :func:`reset_peak_rss` (``VmHWM``), else since the process started."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0), so that import-time peaks do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_checkpoints(root: Path, layers: int, d_model: int, seed: int = 0) -> dict[str, Path]:
    """Base and two fine-tunes as Hugging Face folders (config.json + model.safetensors)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=d_model, n_head=max(1, d_model // 64), n_positions=1024)
    GPT2LMHeadModel(config).save_pretrained(root / "base")
    state = load_file(str(root / "base" / "model.safetensors"))
    paths = {"base": root / "base"}
    for i, name in enumerate(["ft1", "ft2"]):
        g = torch.Generator().manual_seed(seed + 1 + i)
        new = {}
        for j, (key, value) in enumerate(sorted(state.items())):
            if value.ndim == 2 and ".h." in key:
                w = value + 0.002 * torch.randn(value.shape, generator=g)
                if j % 3 == i:  # a rank-1 spike at 1.5 sigma_1 in a random direction: an intruder dimension
                    u = torch.randn(value.shape[0], generator=g)
                    v = torch.randn(value.shape[1], generator=g)
                    w = w + 1.5 * torch.linalg.matrix_norm(value, ord=2) * torch.outer(u / u.norm(), v / v.norm())
                new[key] = w.contiguous()
            else:
                new[key] = value
        (root / name).mkdir()
        save_file(new, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text((root / "base" / "config.json").read_text())
        paths[name] = root / name
    return paths


def naive_report(base: Path, ft: Path, k: int = 10, eps: float = 0.5):
    """The straightforward computation of the same table: both state dicts in memory, full SVDs everywhere."""
    import numpy as np
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    from ftanalysis.probes.spectral import _FileSource, update_statistics

    refs = _FileSource(base, "base").refs  # only for the canonical names and orientation
    s0, s1 = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    rows = []
    for name, ref in refs.items():
        W0, W1 = ref.to_canonical(s0[ref.param_name]), ref.to_canonical(s1[ref.param_name])
        U0, S0, _ = torch.linalg.svd(W0, full_matrices=False)
        U1, S1, _ = torch.linalg.svd(W1, full_matrices=False)
        max_cos = (U1[:, :k].T @ U0).abs().max(dim=1).values
        stats = update_statistics(torch.linalg.svdvals(W1 - W0))
        rows.append({"name": name, "intruders": int((max_cos < eps).sum()), "max_cos": tuple(max_cos.tolist()), **stats})
    del s0, s1
    table = pd.DataFrame(rows)
    table["max_cos"] = table["max_cos"].map(np.asarray)
    return table


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def measure_memory(base: str, ft: str, cache: str) -> dict:
    """Run in a fresh interpreter: resident size after imports, then the peak during one streamed report."""
    import ftanalysis as fta

    after_imports = rss_bytes()
    reset_peak_rss()  # importing torch and transformers peaks above what stays resident
    cache_arg = {"memory": fta.probes.SVDCache(), "none": False}.get(cache, cache)  # else: a directory
    report = fta.probes.spectral_report(base, ft, cache=cache_arg)
    held = cache_arg.nbytes if isinstance(cache_arg, fta.probes.SVDCache) else 0
    return {"after_imports": after_imports, "peak": peak_rss_bytes(), "cache_bytes": held, "intruders": int(report["intruders"].sum())}


def memory_in_subprocess(base: Path, ft: Path, cache: str, threads: int) -> dict:
    code = (
        "import json, sys, torch; sys.path.insert(0, %r); torch.set_num_threads(%d); "
        "from spectral_report import measure_memory; print(json.dumps(measure_memory(%r, %r, %r)))"
        % (str(Path(__file__).parent), threads, str(base), str(ft), cache)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    import ftanalysis as fta

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    results: dict = {"layers": args.layers, "d_model": args.d_model, "threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"writing a {args.layers}-layer d={args.d_model} GPT-2 base and two fine-tunes to {root} ...", flush=True)
        paths = make_checkpoints(root, args.layers, args.d_model)
        size = (paths["ft1"] / "model.safetensors").stat().st_size
        results["checkpoint_bytes"] = size

        naive1, t_naive1, c_naive1 = timed(lambda: naive_report(paths["base"], paths["ft1"]))
        naive2, t_naive2, c_naive2 = timed(lambda: naive_report(paths["base"], paths["ft2"]))
        cache = fta.probes.SVDCache()
        ours1, t_ours1, c_ours1 = timed(lambda: fta.probes.spectral_report(paths["base"], paths["ft1"], cache=cache))
        ours2, t_ours2, c_ours2 = timed(lambda: fta.probes.spectral_report(paths["base"], paths["ft2"], cache=cache))
        svd2, t_svd2, c_svd2 = timed(lambda: fta.probes.spectral_report(paths["base"], paths["ft2"], cache=cache, topk="svd"))
        same = [ours["intruders"].tolist() == naive["intruders"].tolist() for ours, naive in ((ours1, naive1), (ours2, naive2))]
        eff = np.max(np.abs(ours2["effective_rank"].to_numpy() / naive2["effective_rank"].to_numpy() - 1))
        results.update(
            {
                "matrices": len(ours2),
                "naive_s": [round(t_naive1, 2), round(t_naive2, 2)],
                "naive_cpu_s": [round(c_naive1, 2), round(c_naive2, 2)],
                "ours_first_s": round(t_ours1, 2),
                "ours_first_cpu_s": round(c_ours1, 2),
                "ours_second_s": round(t_ours2, 2),
                "ours_second_cpu_s": round(c_ours2, 2),
                "ours_second_topk_svd_s": round(t_svd2, 2),
                "speedup_first": round(t_naive1 / t_ours1, 2),
                "speedup_second": round(t_naive2 / t_ours2, 2),
                "speedup_second_cpu": round(c_naive2 / c_ours2, 2),
                "speedup_second_without_gram": round(t_naive2 / t_svd2, 2),
                "gram_path_share": round(float((ours2["topk_path"] == "gram").mean()), 3),
                "identical_intruder_counts": all(same),
                "intruders": [int(ours1["intruders"].sum()), int(ours2["intruders"].sum())],
                "effective_rank_max_rel_diff": float(eff),
            }
        )
        print(json.dumps(results, indent=1), flush=True)
        mem = {}
        for mode in ("memory", "disk", "none"):
            cache_arg = str(root / "svd_cache") if mode == "disk" else mode
            if mode == "disk":  # fill the disk cache first (as a first fine-tune would)
                memory_in_subprocess(paths["base"], paths["ft1"], cache_arg, threads)
            m = memory_in_subprocess(paths["base"], paths["ft2"], cache_arg, threads)
            extra = m["peak"] - m["after_imports"]
            mem[mode] = {
                "peak_over_imports_MiB": round(extra / 2**20, 1),
                "ratio_to_checkpoint": round(extra / size, 3),
                "cache_MiB": round(m["cache_bytes"] / 2**20, 1),
                "after_imports_MiB": round(m["after_imports"] / 2**20, 1),
            }
        results["memory"] = mem
        results["checkpoint_MiB"] = round(size / 2**20, 1)
    print(json.dumps({"memory": results["memory"], "checkpoint_MiB": results["checkpoint_MiB"]}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    assert results["identical_intruder_counts"], "the streamed report and the naive one disagree on intruder counts"
    return results


if __name__ == "__main__":
    main()
