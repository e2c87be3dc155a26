"""WeLore factorization: data-free rank selection, ``LowRankLinear``, model surgery, saving,
and fine-tuning only the low-rank components (Jaiswal et al., "From GaLore to WeLore", 2024)."""

from lowrank_optim.factorize.finetune import (
    ADAMW_STATES,
    LrcTrainable,
    is_norm,
    trainable_lrc,
)
from lowrank_optim.factorize.lowrank_linear import LowRankLinear, factor_weight
from lowrank_optim.factorize.rank_selection import (
    LayerRank,
    RankPlan,
    default_include,
    dense_weight_of,
    normalized_spectrum,
    plan_from_model,
    plan_ranks,
    solve_threshold,
    spectra_of,
    worth_factorizing,
)
from lowrank_optim.factorize.serialization import (
    PLAN_FILE,
    from_pretrained_factorized,
    load_factorized,
    save_factorized,
    save_pretrained_factorized,
)
from lowrank_optim.factorize.surgery import (
    factorize_model,
    init_lowrank_structure,
    merge_model,
    replace_module,
)

__all__ = [
    "ADAMW_STATES",
    "PLAN_FILE",
    "LayerRank",
    "LowRankLinear",
    "LrcTrainable",
    "RankPlan",
    "default_include",
    "dense_weight_of",
    "factor_weight",
    "factorize_model",
    "from_pretrained_factorized",
    "init_lowrank_structure",
    "is_norm",
    "load_factorized",
    "merge_model",
    "normalized_spectrum",
    "plan_from_model",
    "plan_ranks",
    "replace_module",
    "save_factorized",
    "save_pretrained_factorized",
    "solve_threshold",
    "spectra_of",
    "trainable_lrc",
    "worth_factorizing",
]
