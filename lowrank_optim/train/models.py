"""LLaMA configurations and model construction (transformers ``LlamaForCausalLM``).

The shipped JSON configs are the ones GaLore's experiments use (60M, 130M, 350M, 1B, 7B), plus
9M and 20M sizes that train in minutes on a CPU. Configs too large to build here are
instantiated on the meta device for byte accounting.

transformers is imported lazily (it takes seconds), so importing this module stays cheap for
command-line tools that never build a model.
"""

from __future__ import annotations

import copy
import json
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

__all__ = [
    "LLAMA_SIZES",
    "build_llama",
    "build_llama_on_meta",
    "count_parameters",
    "load_llama_config",
    "tiny_llama_config",
]

LLAMA_SIZES: tuple[str, ...] = ("9m", "20m", "60m", "130m", "350m", "1b", "7b")

# SDPA runs on CPU and GPU alike and is numerically the eager attention, only faster.
_ATTENTION = "sdpa"


def load_llama_config(
    name_or_path: str | os.PathLike[str], vocab_size: int | None = None, **overrides: Any
) -> LlamaConfig:
    """A ``LlamaConfig`` from a shipped size (``9m`` .. ``7b``, any case) or a JSON file path.

    ``vocab_size`` replaces the configs' 32000 (the corpus tokenizer decides it); ``overrides``
    replace any other field, e.g. ``max_position_embeddings=256``.
    """
    from transformers import LlamaConfig

    key = str(name_or_path).strip().lower()
    if key in LLAMA_SIZES:
        resource = resources.files("lowrank_optim.configs").joinpath(f"llama_{key}.json")
        text, source = resource.read_text(encoding="utf-8"), f"llama_{key}.json"
    elif Path(name_or_path).is_file():
        text, source = Path(name_or_path).read_text(encoding="utf-8"), str(name_or_path)
    else:
        raise ValueError(
            f"Invalid model config: {str(name_or_path)!r}; allowed: {', '.join(LLAMA_SIZES)} "
            "or the path of an existing LlamaConfig JSON file"
        )
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"Model config {source} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"Model config {source} must hold a JSON object")
    if vocab_size is not None:
        if int(vocab_size) < 1:
            raise ValueError(f"Invalid vocab_size: {vocab_size}; must be positive")
        values["vocab_size"] = int(vocab_size)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama_config(
    vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 172
) -> LlamaConfig:
    """A LLaMA small enough for unit tests (milliseconds per step on a CPU)."""
    from transformers import LlamaConfig

    if hidden % heads:
        raise ValueError(f"Invalid hidden={hidden}: must be divisible by heads={heads}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )


def _with_attention(config: LlamaConfig) -> LlamaConfig:
    # A copy, so that building a model never changes the caller's config object.
    config = copy.deepcopy(config)
    config._attn_implementation = _ATTENTION
    return config


def build_llama(
    config: LlamaConfig,
    *,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM``; deterministic for a given ``seed``.

    Weights are drawn on the CPU in float32 and then moved and cast, so one seed gives the same
    model on every device and dtype. The seeded draw runs in a forked RNG: building a model
    leaves the caller's global random state untouched.
    """
    from transformers import LlamaForCausalLM

    if not dtype.is_floating_point:
        raise ValueError(f"Invalid dtype: {dtype}; a model needs a floating-point dtype")
    config = _with_attention(config)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype)


def build_llama_on_meta(config: LlamaConfig) -> LlamaForCausalLM:
    """The model's structure without storage, for parameter and byte accounting of 1B or 7B."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(_with_attention(config))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (tied parameters counted once; works on meta models)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
