"""Tiny GPT-2- and Llama-style causal language models built from ``transformers`` configs.

The zoo's bases are ordinary Hugging Face models (``GPT2LMHeadModel``, ``LlamaForCausalLM``): everything that
works on a hub checkpoint works on them, and nothing in the package special-cases them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from .._validation import check_int, check_option

ARCHITECTURES = ("gpt2", "llama")


@dataclass(frozen=True)
class TinyConfig:
    """Size of a tiny base model.

    Parameters
    ----------
    arch : {"gpt2", "llama"}, default="gpt2"
    n_layers : int, default=2
    d_model : int, default=64
    n_heads : int, default=4
    d_mlp : int, default=256
        MLP width (GPT-2's ``n_inner``, Llama's ``intermediate_size``).
    n_positions : int, default=128
        Longest sequence the model accepts.
    """

    arch: str = "gpt2"
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    n_positions: int = 128

    def __post_init__(self):
        check_option(self.arch, "arch", "TinyConfig", ARCHITECTURES)
        check_int(self.n_layers, "n_layers", "TinyConfig", 1, 48)
        check_int(self.d_model, "d_model", "TinyConfig", 8, 4096)
        check_int(self.n_heads, "n_heads", "TinyConfig", 1, 64)
        check_int(self.d_mlp, "d_mlp", "TinyConfig", 1, 16384)
        check_int(self.n_positions, "n_positions", "TinyConfig", 8, 8192)
        if self.d_model % self.n_heads:
            raise ValueError(f"TinyConfig: d_model={self.d_model} must be divisible by n_heads={self.n_heads}.")

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(config: TinyConfig, tok, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised causal LM of the given size, with the tokenizer's special-token ids."""
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if config.arch == "gpt2":
        hf_config = GPT2Config(
            vocab_size=len(tok),
            n_positions=config.n_positions,
            n_embd=config.d_model,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            n_inner=config.d_mlp,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        model = GPT2LMHeadModel(hf_config)
    else:
        hf_config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=config.d_model,
            intermediate_size=config.d_mlp,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_heads,
            max_position_embeddings=config.n_positions,
            tie_word_embeddings=True,
            attention_dropout=0.0,
            **ids,
        )
        model = LlamaForCausalLM(hf_config)
    return model
