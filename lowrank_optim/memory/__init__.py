"""Memory accounting: exact bytes by component, measured peaks, and formula-level estimates.

* :mod:`.basic`: the simple totals other code uses (``optimizer_state_bytes``, ``weight_bytes``,
  ``current_memory_bytes``).
* :mod:`.accounting`: :func:`account` walks a live model and optimizer and files every byte
  under a component (weights, INT8 weight codes, quantization scales, gradients, moments,
  projection bases, ...), per parameter, so it can be summed per layer and per module type.
* :mod:`.peak`: :func:`measure_peak`, a real peak measurement (CUDA allocator statistics, or the
  kernel's resident-set high-water mark on CPU).
* :mod:`.estimate`: the same breakdown from shapes alone (a meta-device model), for configs too
  large to build, such as LLaMA 1B and 7B. It agrees byte for byte with :func:`account`.
"""

from lowrank_optim.memory.accounting import (
    COMPONENTS,
    MODULE_TYPES,
    MemoryBreakdown,
    account,
    footprint_bytes,
    layer_of,
    module_type_of,
)
from lowrank_optim.memory.basic import (
    current_memory_bytes,
    optimizer_state_bytes,
    tensor_bytes,
    weight_bytes,
)
from lowrank_optim.memory.estimate import (
    ESTIMATE_METHODS,
    ParamSpec,
    estimate,
    estimate_matrix,
    param_specs,
    welore_plan,
)
from lowrank_optim.memory.peak import PeakMemory, measure_peak

__all__ = [
    "COMPONENTS",
    "ESTIMATE_METHODS",
    "MODULE_TYPES",
    "MemoryBreakdown",
    "ParamSpec",
    "PeakMemory",
    "account",
    "current_memory_bytes",
    "estimate",
    "estimate_matrix",
    "footprint_bytes",
    "layer_of",
    "measure_peak",
    "module_type_of",
    "optimizer_state_bytes",
    "param_specs",
    "tensor_bytes",
    "weight_bytes",
    "welore_plan",
]
