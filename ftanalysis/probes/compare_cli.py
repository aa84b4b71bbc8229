"""``ftanalysis compare BASE FT [--peft ADAPTER] [--task NAME] --out DIR``: one HTML page of what a fine-tune changed.

The page (``DIR/report.html``, figures embedded, nothing else needed to view it) has:

- the size of the update per layer and matrix kind (``||dW||_F / ||W0||_F``), its effective rank and its rank at
  90% energy (Biderman et al. 2024, arXiv 2405.09673);
- intruder dimensions per matrix, against eps and k, and the singular-vector fingerprint and spectra of the
  matrix with the most (Shuttleworth et al. 2024, arXiv 2410.21228), from :func:`spectral_report`, which streams
  checkpoint folders one matrix at a time;
- with ``--task NAME``: the task's accuracy and loss, base against fine-tune, and retention: the held-out
  pretraining mix per task for the zoo's decoders (:func:`~ftanalysis.probes.retention`), or text loss and
  KL(base || fine-tune) on English prose for other causal LMs (:func:`~ftanalysis.probes.lm_retention`).

``DIR/report.csv`` holds the per-matrix table. BASE and FT are zoo names, checkpoint folders or hub ids; with
``--peft ADAPTER`` the fine-tune is BASE with a PEFT LoRA adapter merged in.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

USAGE = "ftanalysis compare BASE [FT] [--peft ADAPTER] [--task NAME] --out DIR [--k 10] [--eps 0.5] [--n 256]"


def build_parser() -> argparse.ArgumentParser:
    from .spectral_cli import add_comparison_arguments

    parser = argparse.ArgumentParser(
        prog="ftanalysis compare",
        description="One self-contained HTML report of what changed between a base and a fine-tune (or a PEFT adapter).",
    )
    add_comparison_arguments(parser, out_help="folder for report.html and report.csv")
    parser.add_argument("--task", metavar="NAME", help="a task of fta.tasks.available(): accuracy and retention, base vs fine-tune")
    parser.add_argument("--n", type=int, default=256, help="test examples per task (default 256)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _table(frame, digits: int = 3) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.{digits}g}", border=0, classes="t")


def _figure(fig, caption: str) -> str:
    return f'<figure><img src="data:image/png;base64,{_png(fig)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def task_section(args) -> str:
    """HTML of the task's metrics and the retention table, base against fine-tune."""
    import pandas as pd

    from .. import tasks
    from ..tasks.base import check_task_model
    from ..zoo.loading import load_checkpoint
    from .spectral import _load_adapter

    if args.task not in tasks.available():
        raise ValueError(f"Unknown task {args.task!r}. Available: {tasks.available()}.")
    task = tasks.make(args.task)
    base, tok = load_checkpoint(args.base)
    ft = _load_adapter(base, args.peft) if args.peft else load_checkpoint(args.ft)[0]
    scores = {"base": task.evaluate(base, tok, n=args.n), "fine-tune": task.evaluate(ft, tok, n=args.n)}
    keys = [k for k in scores["base"] if isinstance(scores["base"][k], (int, float)) and "/" not in k]
    metrics = pd.DataFrame([{"metric": k, "base": float(scores["base"][k]), "fine-tune": float(scores["fine-tune"][k])} for k in keys])
    parts = [f"<h2>Task: {html.escape(args.task)}</h2>", f"<p>{args.n} test examples.</p>", _table(metrics)]
    mix = tasks.make("pretraining_mix")
    try:  # the zoo's word-level vocabulary and a language-model head
        mix.check_tokenizer(tok)
        check_task_model(base, tok, mix, "ftanalysis compare")
        zoo_vocabulary = True
    except (ValueError, TypeError):
        zoo_vocabulary = False
    if zoo_vocabulary:
        from .forgetting import retention

        frame = retention(ft, tok, base=base, n=args.n).frame
        parts += ["<h2>Retention: the held-out pretraining mix</h2>",
                  "<p>Accuracy and loss per task of the zoo's pretraining mix; <code>loss_increase</code> is in nats per answer token.</p>",
                  _table(frame)]
    elif getattr(base.config, "is_decoder", False) or "CausalLM" in type(base).__name__:
        from .language_retention import lm_retention

        frame = lm_retention(ft, tok, base, tasks=(), n=args.n)
        parts += ["<h2>Retention: English prose</h2>",
                  "<p>Text loss of both models and KL(base || fine-tune) per token on Python's own documentation text, "
                  "with 95% intervals over windows.</p>", _table(frame)]
    else:
        parts.append("<p>Retention is not measured for this model: the pretraining mix needs the zoo's vocabulary, "
                     "and the text measures need a causal LM.</p>")
    return "\n".join(parts)


def build_report(args) -> tuple[str, object]:
    """``(html, per-matrix DataFrame)`` for the parsed command line."""
    from . import spectral as sp
    from . import spectral_plots as plots
    from .spectral_cli import _matrix_pair

    report = sp.spectral_report(args.base, args.ft, k=args.k, eps=args.eps, peft=args.peft, progress=not args.quiet)
    worst = report.sort_values(["intruders", "min_max_cos"], ascending=[False, True]).iloc[0]["name"]
    W0, W1 = _matrix_pair(argparse.Namespace(base=args.base, ft=args.ft, peft=args.peft), worst)
    heatmap = sp.intruder_dimensions(W0, W1, k=args.k, eps=args.eps).plot()
    heatmap.axes[0].set_title(f"{worst}: " + heatmap.axes[0].get_title(), fontsize=9)
    spectra = sp.spectra(W0, W1).plot()
    spectra.axes[0].set_title(worst, fontsize=9)
    by_layer, by_kind = sp.summarize_report(report, "layer"), sp.summarize_report(report, "kind")
    ft_label = f"{args.base} + PEFT adapter {args.peft}" if args.peft else args.ft
    total = int(report["intruders"].sum())
    from .. import __version__

    summary = (
        f"<p><b>{len(report)}</b> weight matrices compared; <b>{total}</b> intruder dimension(s) in "
        f"<b>{int((report['intruders'] > 0).sum())}</b> of them (k = {args.k}, eps = {args.eps}); median relative update "
        f"{report['dW_rel'].median():.3g}; median effective rank of the update {report['effective_rank'].median():.3g}.</p>"
    )
    sections = [
        "<h2>How large is the update, and how many directions does it use?</h2>",
        _figure(plots.plot_layer_bars(report, "dW_rel", title="||dW|| / ||W0|| per layer"), "relative size of the update per layer and matrix kind"),
        _figure(plots.plot_layer_bars(report, "rank_energy", title=f"rank of dW at {report.attrs['energy']:.0%} energy"), "rank of the update at 90% energy"),
        "<h3>Per layer</h3>", _table(by_layer), "<h3>Per matrix kind</h3>", _table(by_kind),
        "<h2>Intruder dimensions</h2>",
        "<p>A top-k singular vector of the fine-tuned matrix whose largest |cosine| with every singular vector of the "
        "pretrained one is below eps (Shuttleworth et al. 2024).</p>",
        _figure(plots.plot_layer_bars(report, "intruders", title="intruder dimensions per layer"), "intruders per layer"),
        _figure(plots.plot_intruders_vs_eps(report, k=args.k), "intruders against eps"),
        _figure(plots.plot_intruders_vs_k(report, eps=args.eps), "intruders against k"),
        _figure(heatmap, f"singular-vector similarity of {worst}, the matrix with the most intruders"),
        _figure(spectra, f"singular values of {worst}, before and after"),
    ]
    if args.task:
        sections.append(task_section(args))
    columns = ["name", "layer", "kind", "dW_rel", "effective_rank", "rank_energy", "intruders", "min_max_cos"]
    sections += ["<h2>Every matrix</h2>", _table(report[columns])]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ftanalysis compare: {html.escape(str(ft_label))}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222; }}
table.t {{ border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1.5em; }}
table.t td, table.t th {{ padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }} figcaption {{ font-size: 12px; color: #555; }}
</style></head><body>
<h1>What changed: {html.escape(str(ft_label))}</h1>
<p>base <code>{html.escape(str(args.base))}</code> &middot; fine-tune <code>{html.escape(str(ft_label))}</code> &middot;
ftanalysis {__version__} &middot; {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}</p>
{summary}
{"".join(sections)}
</body></html>
"""
    return page, report


def _write_atomic(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if (args.ft is None) == (args.peft is None):
        raise SystemExit(f"ftanalysis compare: give either FT or --peft ADAPTER (exactly one).\nusage: {USAGE}")
    if args.n < 1:
        raise SystemExit(f"ftanalysis compare: --n must be a positive number of examples. Got {args.n}.")
    out = Path(args.out)
    try:
        from .. import tasks

        if args.task is not None and args.task not in tasks.available():
            raise ValueError(f"Unknown task {args.task!r}. Available: {tasks.available()}.")
        page, report = build_report(args)
    except (ValueError, TypeError, OSError, ImportError) as err:
        raise SystemExit(f"ftanalysis compare: {err}") from err
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "report.html", page)
    _write_atomic(out / "report.csv", report.to_csv(index=False))
    print(f"wrote {out / 'report.html'} ({len(page) / 1e6:.1f} MB) and report.csv")
