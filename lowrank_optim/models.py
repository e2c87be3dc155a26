"""LLaMA configurations and model construction (transformers ``LlamaForCausalLM``).

The shipped JSON configs are the ones GaLore's experiments use (60M, 130M, 350M, 1B, 7B), plus
9M and 20M sizes that train in minutes on a CPU. Configs too large to build here are
instantiated on the meta device for byte accounting.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LLAMA_SIZES",
    "build_llama",
    "build_llama_on_meta",
    "count_parameters",
    "load_llama_config",
    "tiny_llama_config",
]

LLAMA_SIZES = ("9m", "20m", "60m", "130m", "350m", "1b", "7b")


def load_llama_config(name_or_path: str, vocab_size: int | None = None, **overrides: Any) -> Any:
    """A ``LlamaConfig`` from a shipped size (``9m`` .. ``7b``) or a JSON file path."""
    from transformers import LlamaConfig

    key = str(name_or_path).lower()
    if key in LLAMA_SIZES:
        text = resources.files("lowrank_optim.configs").joinpath(f"llama_{key}.json").read_text()
    elif Path(name_or_path).is_file():
        text = Path(name_or_path).read_text()
    else:
        raise ValueError(
            f"Invalid model config: {name_or_path!r}; use one of {', '.join(LLAMA_SIZES)} or a "
            "path to a LlamaConfig JSON file"
        )
    values = json.loads(text)
    if vocab_size is not None:
        values["vocab_size"] = int(vocab_size)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama_config(
    vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 172
) -> Any:
    """A LLaMA small enough for unit tests."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def build_llama(
    config: Any,
    *,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM``; deterministic for a given ``seed``."""
    from transformers import LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype)


def build_llama_on_meta(config: Any) -> nn.Module:
    """The model's structure without storage, for byte accounting of configs like 7B."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def count_parameters(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())
