"""Pretrain LLaMA on FSDP2 (``fully_shard``) with a GaLore-family optimizer: the pattern to copy.

    torchrun --nproc_per_node 2 examples/fsdp_pretrain.py --model 9m --optimizer galore_adamw
    torchrun --nproc_per_node 8 examples/fsdp_pretrain.py --model 1b --dtype bfloat16 \\
        --batch-size 512 --micro-batch-size 16 --seq-len 256 --rank 512 --lr 0.01 \\
        --checkpoint-dir ckpt/1b

The same run as ``examples/torchrun_pretrain.py --fsdp`` (one script, one training loop: see
its docstring for what FSDP2 changes). Rank 0 writes ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

from torchrun_pretrain import main  # same folder (the script's folder is on sys.path)

__all__ = ["main"]

if __name__ == "__main__":
    main(fsdp=True)
