"""Distributed training support: GaLore-family optimizers on FSDP2-sharded parameters.

* :mod:`.placement`: the FSDP2 ``Shard(0)`` placement the optimizer picks for ``DTensor``
  parameters (local views, refusals, cross-rank checks);
* :mod:`.sharding`: row-sharded ``DTensor`` layout and the sharded optimizer state;
* :mod:`.refresh`: basis refresh from a row-sharded gradient (Gram all-reduce or all-gather);
* :mod:`.factorize`: WeLore's factorization of row-sharded weights (Gram all-reduce, randomized
  sketch with a tall-skinny QR), never gathering the weight;
* :mod:`.spectrum_routes`: WeLore's spectrum of one row-sharded weight, computed on every rank
  (Gram all-reduce, or column panels), never gathering the weight;
* :mod:`.spectra`: WeLore's spectra of all candidates at a check step, each computed by one
  owner rank (rows gathered to it alone, one all-gather of the singular values), and the
  hand-off factors from the same decomposition;
* :mod:`.layerwise_ddp`: layer-wise updates under DDP (a communication hook steps each bucket's
  parameters once its all-reduce completes);
* :mod:`.comm`: counting the bytes of collectives (benchmarks and tests);
* :mod:`.handoff`: the WeLore hand-off of a sharded layer in place (its factors join the
  weight's FSDP2 group), and its re-application when a checkpoint is loaded;
* :mod:`.checkpoint`: DCP checkpoints after hand-offs (:func:`sharded_checkpoint_state` to save,
  :func:`load_sharded_checkpoint` re-applies the saved plan to a fresh sharded model, then
  loads), and ``dcp.load`` that refuses quantized state saved on another number of ranks with
  :class:`~lowrank_optim.errors.CheckpointMismatchError` (:func:`load_sharded_state`).

Nothing here imports an optimizer class: the optimizer asks the placement, never the reverse.
"""

from lowrank_optim.distributed.checkpoint import (
    load_sharded_checkpoint,
    load_sharded_state,
    sharded_checkpoint_state,
)
from lowrank_optim.distributed.comm import CollectiveCounter
from lowrank_optim.distributed.factorize import (
    ShardedFactors,
    choose_factorization,
    factorize_sharded,
    gram_factorize_bytes,
    sketch_factorize_bytes,
    weight_gather_bytes,
)
from lowrank_optim.distributed.placement import ROW_SHARDED, RowShardedPlacement
from lowrank_optim.distributed.refresh import (
    FSDP_REFRESH,
    choose_strategy,
    gather_refresh_bytes,
    gram_refresh_bytes,
)
from lowrank_optim.distributed.spectra import (
    OwnedSpectra,
    owner_spectra,
    owner_spectra_bytes,
    shared_factors,
)
from lowrank_optim.distributed.spectrum_routes import (
    ShardedSpectrum,
    choose_spectrum,
    panel_spectrum_bytes,
    sharded_spectra,
    sharded_spectrum,
)

__all__ = [
    "FSDP_REFRESH",
    "ROW_SHARDED",
    "CollectiveCounter",
    "OwnedSpectra",
    "RowShardedPlacement",
    "ShardedFactors",
    "ShardedSpectrum",
    "choose_factorization",
    "choose_spectrum",
    "choose_strategy",
    "factorize_sharded",
    "gather_refresh_bytes",
    "gram_factorize_bytes",
    "gram_refresh_bytes",
    "load_sharded_checkpoint",
    "load_sharded_state",
    "owner_spectra",
    "owner_spectra_bytes",
    "panel_spectrum_bytes",
    "sharded_checkpoint_state",
    "sharded_spectra",
    "sharded_spectrum",
    "shared_factors",
    "sketch_factorize_bytes",
    "weight_gather_bytes",
]
