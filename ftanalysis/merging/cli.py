"""``ftanalysis merge``: merge fine-tunes of one base into a model folder that ``load_model`` loads.

::

    ftanalysis merge --method ties BASE FT [FT ...] --out DIR [--weights 1 1] [--set k=0.2 --set lam=1.0]
    ftanalysis merge --config merge.yaml --out DIR

``BASE`` and every ``FT`` are zoo names (``fta.zoo.available()``), checkpoint folders written by
``save_pretrained``, or hub ids. ``--set NAME=VALUE`` passes an option of the rule under the package's name for
it (``ftanalysis merge --method ties --help`` lists them); values are read as Python literals (``0.2``,
``True``, ``"mass"``), else kept as text.

The YAML config follows mergekit's layout, so an existing mergekit recipe needs no rewriting for the rules
both implement::

    merge_method: ties            # or task_arithmetic, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, model_stock
    base_model: gpt2-tiny
    models:
      - model: runs/ft-a
        parameters: {weight: 1.0}
      - model: runs/ft-b
        parameters: {weight: 0.5}
    parameters: {density: 0.2, lambda: 1.0}

mergekit's ``density`` (the fraction of each update kept) becomes ``k`` for TIES and ``p = 1 - density`` (the
fraction dropped) for DARE; ``lambda`` becomes ``lam``; any other key must be an option of the rule. mergekit
lets ``density`` differ per model; the rules here take one value, so per-model values must agree.

``DIR`` gets the merged model (safetensors and config), the base's tokenizer, and ``merge.json`` with the rule,
its options, the weights and the inputs. It is written to a temporary folder beside ``DIR`` and renamed into
place; an existing non-empty ``DIR`` is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path

from .._atomic import check_writable_folder, write_model_folder

USAGE = "ftanalysis merge (--method NAME BASE FT [FT ...] | --config FILE.yaml) --out DIR [--weights W ...] [--set NAME=VALUE ...]"

# mergekit's merge_method -> (our rule, options it implies)
MERGEKIT_METHODS = {
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "dare_linear": ("dare", {"combine": "task_arithmetic"}),
    "dare_ties": ("dare", {"combine": "ties"}),
    "breadcrumbs": ("breadcrumbs", {"combine": "task_arithmetic"}),
    "breadcrumbs_ties": ("breadcrumbs", {"combine": "ties"}),
    "model_stock": ("model_stock", {}),
}


class MergeCommandError(ValueError):
    """A mistake in the command line or the config: the message says what was wrong and what is accepted."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftanalysis merge",
        description="Merge fine-tunes of one base (task arithmetic, TIES, DARE, Breadcrumbs, Model Stock, ...) into a model folder.",
        epilog="Rules: " + ", ".join(_rules()) + ". mergekit YAML configs are accepted with --config.",
    )
    parser.add_argument("models", nargs="*", metavar="BASE FT", help="the base, then the fine-tunes: zoo names, checkpoint folders or hub ids")
    parser.add_argument("--method", help="the merging rule (see the list below)")
    parser.add_argument("--config", metavar="FILE", help="a mergekit-style YAML file (instead of --method and the models)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the merged model")
    parser.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per fine-tune (default: 1 each)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="options", help="an option of the rule, e.g. k=0.2 (repeatable)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    return parser


def _rules() -> list[str]:
    from . import rule_names

    return rule_names()


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_options(pairs: list[str]) -> dict:
    """``["k=0.2", "sign_method=mass"]`` -> ``{"k": 0.2, "sign_method": "mass"}``."""
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise MergeCommandError(f"--set takes NAME=VALUE (e.g. --set k=0.2). Got {pair!r}.")
        options[name.strip()] = _literal(value.strip())
    return options


def check_options(method: str, options: dict) -> None:
    """Refuse options the rule does not have, naming the ones it has."""
    from . import get

    try:
        cls = get(method)
    except ValueError as err:
        raise MergeCommandError(f"Unknown merging rule {method!r}. Available: {_rules()} (or mergekit's {sorted(MERGEKIT_METHODS)} in a config).") from err
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise MergeCommandError(f"The merging rule {method!r} has no option(s) {unknown}. Its options: {accepted}.")


def read_config(path: str | Path) -> tuple[str, str, list[str], list[float] | None, dict]:
    """``(rule, base, fine-tunes, weights, options)`` from a mergekit-style YAML file (see the module docstring)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MergeCommandError(f"No config file at {str(path)!r}.")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise MergeCommandError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise MergeCommandError(f"{path} must hold a mapping with merge_method, base_model and models.")
    missing = [key for key in ("merge_method", "base_model", "models") if key not in config]
    if missing:
        raise MergeCommandError(f"{path} lacks {missing}: a config needs merge_method, base_model and models.")
    method_name = str(config["merge_method"])
    if method_name in MERGEKIT_METHODS:
        method, options = MERGEKIT_METHODS[method_name][0], dict(MERGEKIT_METHODS[method_name][1])
    elif method_name in _rules():
        method, options = method_name, {}
    else:
        raise MergeCommandError(
            f"{path}: merge_method {method_name!r} is not supported. Accepted: mergekit's {sorted(MERGEKIT_METHODS)} "
            f"or this package's {_rules()}."
        )
    entries = config["models"]
    if not isinstance(entries, list) or not entries:
        raise MergeCommandError(f"{path}: models must be a non-empty list of entries like {{model: PATH}}.")
    models, weights, densities = [], [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeCommandError(f"{path}: models[{i}] must be a mapping with a 'model' key. Got {entry!r}.")
        params = entry.get("parameters") or {}
        unknown = sorted(set(params) - {"weight", "density"})
        if unknown:
            raise MergeCommandError(f"{path}: models[{i}] has parameters {unknown}; per model only weight and density are accepted.")
        models.append(str(entry["model"]))
        weights.append(float(params.get("weight", 1.0)))
        if "density" in params:
            densities.append(float(params["density"]))
    shared = dict(config.get("parameters") or {})
    if densities:
        if len(set(densities)) > 1 or ("density" in shared and float(shared["density"]) != densities[0]):
            raise MergeCommandError(f"{path}: density differs between models ({densities}); the rules here take one density for all.")
        shared.setdefault("density", densities[0])
    if "lambda" in shared:
        shared["lam"] = shared.pop("lambda")
    if "density" in shared:
        density = float(shared.pop("density"))
        if method == "ties":
            shared["k"] = density
        elif method == "dare":
            shared["p"] = 1.0 - density
        else:
            raise MergeCommandError(f"{path}: density applies to ties and dare, not to {method_name!r}.")
    options.update(shared)
    return method, str(config["base_model"]), models, (weights if any(w != 1.0 for w in weights) else None), options


_OUT_HINT = "choose another --out or pass --force to replace it."


def check_out(out: Path, force: bool) -> None:
    """Refuse an existing non-empty ``out`` unless ``force``."""
    try:
        check_writable_folder(out, force, _OUT_HINT)
    except FileExistsError as err:
        raise MergeCommandError(str(err)) from err


def write_merged(model, tok, out: Path, record: dict, force: bool = False) -> Path:
    """Save ``model``, ``tok`` and ``merge.json`` into ``out`` atomically (temporary folder, then rename)."""
    check_out(Path(out), force)
    return write_model_folder(out, model, tok, {"merge.json": json.dumps(record, indent=2) + "\n"}, True, _OUT_HINT)


def run(args: argparse.Namespace) -> Path:
    """Merge as the parsed command line says; returns the output folder."""
    from ..zoo.loading import load_checkpoint
    from . import get

    if args.config:
        if args.method or args.models:
            raise MergeCommandError("Give either --config FILE or --method NAME with BASE FT ..., not both.")
        method, base_name, ft_names, weights, options = read_config(args.config)
        options.update(parse_options(args.options))
        if args.weights is not None:
            weights = args.weights
    else:
        if not args.method:
            raise MergeCommandError(f"--method is required without --config.\nusage: {USAGE}")
        if len(args.models) < 2:
            raise MergeCommandError(f"Give the base and at least one fine-tune (got {len(args.models)} checkpoint(s)).\nusage: {USAGE}")
        method, base_name, ft_names = args.method, args.models[0], args.models[1:]
        method, preset = MERGEKIT_METHODS.get(method, (method, {}))
        options = {**preset, **parse_options(args.options)}
        weights = args.weights
    check_options(method, options)
    check_out(Path(args.out), args.force)
    if weights is not None and len(weights) != len(ft_names):
        raise MergeCommandError(f"--weights needs one weight per fine-tune ({len(ft_names)}). Got {len(weights)}.")
    rule = get(method)(**options)
    base, tok = load_checkpoint(base_name)
    fine_tunes = [load_checkpoint(name)[0] for name in ft_names]
    merged = rule.merge(base, fine_tunes, weights)
    record = {"rule": repr(rule), "method": method, "options": options, "weights": weights, "base": base_name, "models": ft_names}
    return write_merged(merged, tok, Path(args.out), record, force=args.force)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except (MergeCommandError, ValueError, TypeError, OSError, ImportError) as err:
        raise SystemExit(f"ftanalysis merge: {err}") from err
    print(f"merged model written to {out}", file=sys.stdout)
