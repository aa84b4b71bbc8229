"""``ftanalysis spectral BASE FT [--peft ADAPTER] --out DIR``: the spectral report of a fine-tune, as files.

Writes into ``DIR``: ``report.csv`` (one row per weight matrix, :func:`~ftanalysis.probes.spectral_report`),
``summary_by_kind.csv`` and ``summary_by_layer.csv`` (:func:`~ftanalysis.probes.summarize_report`), and the
figures ``intruders_by_layer.png``, ``rank_energy_by_layer.png``, ``intruders_vs_eps.png``,
``intruders_vs_k.png``, and for the matrix with the most intruders (or, without any, the one whose top vectors
moved most) ``cos_heatmap.png`` and ``spectra.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

USAGE = "ftanalysis spectral BASE [FT] [--peft ADAPTER] --out DIR [--k 10] [--eps 0.5] [--side left] [--modules ...]"


def add_comparison_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """The arguments every base-vs-fine-tune command shares: BASE, FT or --peft, --out, --k and --eps."""
    parser.add_argument("base", help="pretrained checkpoint: a zoo name (gpt2-tiny, llama-tiny, minilm, ...), a Hugging Face folder, one of ours, or a .safetensors file")
    parser.add_argument("ft", nargs="?", help="fine-tuned checkpoint of the same architecture (omit with --peft)")
    parser.add_argument("--peft", metavar="ADAPTER", help="a PEFT LoRA adapter folder, merged into BASE")
    parser.add_argument("--out", required=True, metavar="DIR", help=out_help)
    parser.add_argument("--k", type=int, default=10, help="top singular vectors tested per matrix (default 10)")
    parser.add_argument("--eps", type=float, default=0.5, help="cosine threshold in (0, 1] (default 0.5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftanalysis spectral",
        description="Intruder dimensions and update spectra of a fine-tune, matrix by matrix (streams safetensors).",
    )
    add_comparison_arguments(parser, out_help="folder for the CSV tables and the figures")
    parser.add_argument("--side", choices=["left", "right"], default="left", help="singular vectors compared (default left)")
    parser.add_argument("--modules", nargs="+", help="kinds (attn.q, mlp), names or regular expressions (default: all)")
    parser.add_argument("--cache", metavar="DIR", help="keep the base's SVDs on disk here, for later runs against the same base")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary printout")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if (args.ft is None) == (args.peft is None):
        raise SystemExit(f"ftanalysis spectral: give either FT or --peft ADAPTER (exactly one).\nusage: {USAGE}")
    import matplotlib.pyplot as plt

    from . import spectral as sp
    from . import spectral_plots as plots

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = sp.spectral_report(
            args.base, args.ft, k=args.k, eps=args.eps, modules=args.modules, side=args.side, peft=args.peft,
            cache=args.cache if args.cache else None, progress=not args.quiet,
        )
    except (ValueError, TypeError, OSError, ImportError) as err:  # OSError: FileNotFoundError, a bad FTA_ZOO_DIR
        raise SystemExit(f"ftanalysis spectral: {err}") from err
    report.to_csv(out / "report.csv", index=False)
    by_kind = sp.summarize_report(report, "kind")
    by_kind.to_csv(out / "summary_by_kind.csv", index=False)
    sp.summarize_report(report, "layer").to_csv(out / "summary_by_layer.csv", index=False)

    figures = {
        "intruders_by_layer.png": plots.plot_layer_bars(report, "intruders", title="intruder dimensions per layer"),
        "rank_energy_by_layer.png": plots.plot_layer_bars(report, "rank_energy", title=f"rank of dW at {report.attrs['energy']:.0%} energy"),
        "intruders_vs_eps.png": plots.plot_intruders_vs_eps(report, k=args.k),
        "intruders_vs_k.png": plots.plot_intruders_vs_k(report, eps=args.eps),
    }
    worst = report.sort_values(["intruders", "min_max_cos"], ascending=[False, True]).iloc[0]["name"]
    W0, W1 = _matrix_pair(args, worst)
    figures["cos_heatmap.png"] = sp.intruder_dimensions(W0, W1, k=args.k, eps=args.eps, side=args.side).plot()
    figures["cos_heatmap.png"].axes[0].set_title(f"{worst}: " + figures["cos_heatmap.png"].axes[0].get_title(), fontsize=9)
    figures["spectra.png"] = sp.spectra(W0, W1).plot()
    figures["spectra.png"].axes[0].set_title(worst, fontsize=9)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    if not args.quiet:
        total = int(report["intruders"].sum())
        print(f"{len(report)} matrices, {total} intruder dimension(s) at k={args.k}, eps={args.eps} ({args.side} vectors)")
        print(by_kind.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        print(f"wrote {len(figures) + 3} files to {out}")


def _matrix_pair(args, name: str):
    """The (base, fine-tuned) canonical matrices ``name``, read again from the checkpoints."""
    from .spectral import _load_adapter, _open_source

    ft = _load_adapter(args.base, args.peft) if args.peft else args.ft
    src0, src1 = _open_source(args.base, "base", "ftanalysis spectral"), _open_source(ft, "ft", "ftanalysis spectral")
    try:
        return src0.matrix(name), src1.matrix(name)
    finally:
        src0.close()
        src1.close()


if __name__ == "__main__":
    main()
