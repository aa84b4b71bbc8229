"""Shared fixtures: tiny random models of every supported family (no downloads), the task tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaModel,
)

import ftanalysis as fta


@pytest.fixture(scope="session")
def tok():
    return fta.tasks.build_tokenizer()


def make_tiny(family: str, vocab_size: int = 300, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised model of the family, small enough for unit tests."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, n_inner=64, **common))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common))
    elif family == "bert":
        model = BertModel(BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, **common))
    elif family == "roberta":
        model = RobertaModel(RobertaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=130, **common))
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "bert", "roberta"]
DECODERS = ["gpt2", "llama", "qwen2", "mistral"]


@pytest.fixture(scope="session")
def zoo_gpt2():
    return fta.zoo.load("gpt2-tiny")
