"""The application side of lowrank_optim: pretraining LLaMA with its optimizers.

Data (the built-in corpus, local and Hugging Face datasets, tokenizers, resumable batches),
models (shipped LLaMA configs), the one training loop (:func:`train_steps`, used by
``lowrank-optim pretrain`` and by the torchrun/FSDP2 examples) and the end-to-end pretraining
run (:func:`run_pretraining`). ``import lowrank_optim`` does not import this package.
"""

from __future__ import annotations

from lowrank_optim.train.batches import TokenBatches, validation_batches
from lowrank_optim.train.cache import default_cache_dir
from lowrank_optim.train.config import PretrainConfig, check_pretrain_config
from lowrank_optim.train.data import (
    VALIDATION_EVERY,
    Corpus,
    build_corpus,
    load_hf_dataset,
    load_local_dataset,
    looks_local,
    split_documents,
    stdlib_corpus_files,
)
from lowrank_optim.train.loop import (
    LoopHooks,
    StepResult,
    cosine_with_warmup,
    evaluate,
    train_steps,
    training_bytes,
)
from lowrank_optim.train.models import (
    LLAMA_SIZES,
    build_llama,
    build_llama_on_meta,
    count_parameters,
    load_llama_config,
    tiny_llama_config,
)
from lowrank_optim.train.parallel import DataParallel, FullyShardedParallel, Parallel
from lowrank_optim.train.pretrain import run_pretraining
from lowrank_optim.train.summary import format_summary
from lowrank_optim.train.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    encode_documents,
    train_bpe_tokenizer,
)

__all__ = [
    "LLAMA_SIZES",
    "VALIDATION_EVERY",
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "DataParallel",
    "FullyShardedParallel",
    "LoopHooks",
    "Parallel",
    "PretrainConfig",
    "StepResult",
    "TokenBatches",
    "Tokenizer",
    "build_corpus",
    "build_llama",
    "build_llama_on_meta",
    "check_pretrain_config",
    "cosine_with_warmup",
    "count_parameters",
    "default_cache_dir",
    "encode_documents",
    "evaluate",
    "format_summary",
    "load_hf_dataset",
    "load_local_dataset",
    "load_llama_config",
    "looks_local",
    "run_pretraining",
    "split_documents",
    "stdlib_corpus_files",
    "tiny_llama_config",
    "train_bpe_tokenizer",
    "train_steps",
    "training_bytes",
    "validation_batches",
]
