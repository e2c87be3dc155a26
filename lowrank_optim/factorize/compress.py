"""WeLore's data-free compression of a pretrained Hugging Face model (the library part).

Jaiswal et al., "From GaLore to WeLore", ICML 2025. No data is needed: for every linear matrix
``W_i`` the singular values are min/max normalized, one global threshold ``t`` is solved so
that the values under it make up the target fraction of the total rank, and the matrices whose
own reduction exceeds ``min_ratio`` (the low-rank components, LRCs) are replaced by the
truncated-SVD factors ``W_i ~ (U_k S_k^1/2)(S_k^1/2 V_k^T)``; the rest stay dense. The rank
selection, the factor layer and saving live in :mod:`lowrank_optim.factorize`; this module
loads the model, refuses what it cannot handle and reports per module type. The command line
(``lowrank-optim compress``) is :mod:`lowrank_optim.cli.compress`, the spectra plot
:func:`lowrank_optim.cli.plots.plot_spectra`.

``measure="rank"`` is the paper's target (fraction of the pooled rank under the threshold; the
LRC rule then leaves some of it dense, so fewer parameters go). ``measure="params"`` solves
the same threshold by bisection so that the linear layers lose ``target`` of their parameters.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_optim.factorize import (
    PLAN_FILE,
    RankPlan,
    default_include,
    factorize_model,
    from_pretrained_factorized,
    plan_ranks,
    save_pretrained_factorized,
)
from lowrank_optim.factorize.rank_selection import dense_weight_of

__all__ = [
    "MEASURES",
    "REPORT_FILE",
    "SPECTRA_PLOT",
    "SUPPORTED_MODEL_TYPES",
    "CompressionError",
    "CompressionResult",
    "check_model_dir",
    "check_output_dir",
    "compress_model",
    "compress_pretrained",
    "load_compressed",
    "model_class_for",
    "module_type_of",
    "plan_for_target",
    "summary_rows",
]

#: model_type -> head family; the architectures the tests build and compress end to end.
SUPPORTED_MODEL_TYPES = {
    "bert": "encoder",
    "gpt2": "causal-lm",
    "llama": "causal-lm",
    "mistral": "causal-lm",
    "opt": "causal-lm",
}
MEASURES = ("rank", "params")
SPECTRA_PLOT = "spectra.png"
REPORT_FILE = "compression_report.json"
_TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|vocab\..*|merges\.txt|special_tokens_map\.json|added_tokens\.json|"
    r"spiece\.model|sentencepiece.*)$"
)
_LAYER_INDEX = re.compile(r"(?:^|\.)\d+\.")
#: Files that make a folder hold a model: its config, the plan, or weights in any format.
_MODEL_FILE = re.compile(r"^(config\.json|lowrank_plan\.json|.*\.(safetensors|bin|pt|pth))$")


class CompressionError(ValueError):
    """The model cannot be compressed; the message names the problem and what would work."""


@dataclass(frozen=True)
class CompressionResult:
    """What :func:`compress_model` did: the model, the plan, one row per LRC, parameter totals."""

    model: nn.Module
    plan: RankPlan
    factorized: list[dict[str, Any]]
    spectra: dict[str, torch.Tensor]
    parameters_before: int
    parameters_after: int


def check_model_dir(model_dir: str | Path, allow_untested: bool = False) -> Any:
    """The model's ``PretrainedConfig``, or :class:`CompressionError` saying why not.

    Checked before any weight is read, so a refusal is immediate even for a large model.
    """
    from transformers import AutoConfig

    path = Path(model_dir)
    if not path.is_dir():
        raise CompressionError(f"Model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise CompressionError(
            f"{str(path)!r} is not a Hugging Face model directory: it has no config.json"
        )
    if (path / PLAN_FILE).is_file():
        raise CompressionError(
            f"{str(path)!r} is already factorized (it has {PLAN_FILE}); compress the dense model"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as error:
        raise CompressionError(f"Cannot read the config in {str(path)!r}: {error}") from None
    if getattr(config, "quantization_config", None):
        # Quantized weights are integer codes plus scales: there is no float matrix to SVD.
        raise CompressionError(
            f"{str(path)!r} holds quantized weights (quantization_config); WeLore needs the "
            "full-precision model"
        )
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES and not allow_untested:
        raise CompressionError(
            f"Unsupported model_type {model_type!r}; supported: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))} (allow_untested / --allow-untested "
            "tries any model whose layers are nn.Linear or Conv1D)"
        )
    return config


def check_output_dir(
    model_dir: str | Path, output_dir: str | Path, overwrite: bool = False
) -> None:
    """Refuse (:class:`CompressionError`) an output folder that is the input or holds a model.

    Saving there would replace its dense weights with factors, and a plain ``from_pretrained``
    of the folder would then random-initialize every factorized projection. ``overwrite``
    (``--overwrite``) allows both.
    """
    output = Path(output_dir)
    if not output.exists():
        return
    if not output.is_dir():
        raise CompressionError(f"Output {str(output)!r} is a file, not a folder; choose a folder")
    if overwrite:
        return
    if output.resolve() == Path(model_dir).resolve():
        raise CompressionError(
            f"Output folder {str(output)!r} is the input model folder: the factors would "
            "replace its dense weights; choose another -o, or pass --overwrite (overwrite=True)"
        )
    held = sorted(p.name for p in output.iterdir() if p.is_file() and _MODEL_FILE.match(p.name))
    if held:
        raise CompressionError(
            f"Output folder {str(output)!r} already holds a model ({', '.join(held)}); choose "
            "a new or empty folder, or pass --overwrite (overwrite=True) to replace it"
        )


def model_class_for(config: Any) -> Any:
    """The class the checkpoint was saved from (``config.architectures``), else an Auto class."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if SUPPORTED_MODEL_TYPES.get(getattr(config, "model_type", None)) == "causal-lm":
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def compressible(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """``default_include`` minus matrices shared with another module (tied heads).

    Factorizing a tied output head would untie it from the embedding and silently change the
    model, so any weight that appears under two modules is left dense.
    """
    owners: dict[int, int] = defaultdict(int)
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] += 1

    def include(name: str, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return default_include(name, module) and weight is not None and owners[id(weight)] == 1

    return include


def _spectra(
    model: nn.Module, include: Callable[[str, nn.Module], bool], progress: bool
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    from tqdm.auto import tqdm

    layers = [
        (name, weight)
        for name, module in model.named_modules()
        if (weight := dense_weight_of(module)) is not None and include(name, module)
    ]
    spectra, shapes = {}, {}
    for name, weight in tqdm(layers, desc="spectra", unit="layer", disable=not progress):
        spectra[name] = torch.linalg.svdvals(weight.detach().float())
        shapes[name] = (int(weight.shape[0]), int(weight.shape[1]))
    return spectra, shapes


def _parameter_reduction(plan: RankPlan) -> float:
    return 1.0 - plan.parameters_after() / plan.parameters_before()


def _check_target(target: float, measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"Invalid measure: {measure!r}; allowed: {', '.join(MEASURES)}")
    if not isinstance(target, float | int) or not 0.0 < target < 1.0:
        raise ValueError(f"Invalid target: {target!r}; must be in (0, 1)")


def plan_for_target(
    spectra: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    target: float,
    measure: str = "rank",
    min_ratio: float = 0.5,
) -> RankPlan:
    """WeLore's plan for ``target`` measured in pooled rank (the paper) or in parameters.

    The parameter reduction only grows with the rank target (the threshold rises, ranks fall,
    matrices only ever become LRCs), so bisection on the rank target finds the smallest one
    that removes at least ``target`` of the linear layers' parameters.
    """
    _check_target(target, measure)
    if measure == "rank":
        return plan_ranks(spectra, shapes, float(target), min_ratio)
    low, high = 1e-6, 1.0 - 1e-6
    best = plan_ranks(spectra, shapes, high, min_ratio)
    if _parameter_reduction(best) < target:
        raise CompressionError(
            f"A parameter target of {target:.0%} is out of reach: at most "
            f"{_parameter_reduction(best):.1%} with min_ratio={min_ratio}"
        )
    for _ in range(40):
        middle = (low + high) / 2
        plan = plan_ranks(spectra, shapes, middle, min_ratio)
        if _parameter_reduction(plan) >= target:
            high, best = middle, plan
        else:
            low = middle
    return best


def compress_model(
    model: nn.Module,
    target: float,
    *,
    measure: str = "rank",
    min_ratio: float = 0.5,
    progress: bool = True,
) -> CompressionResult:
    """Factorize ``model``'s LRCs in place for ``target``; raises if no matrix qualifies."""
    from tqdm.auto import tqdm

    include = compressible(model)
    spectra, shapes = _spectra(model, include, progress)
    if not spectra:
        raise CompressionError(
            f"{type(model).__name__} has no untied nn.Linear or Conv1D layer outside the "
            "embeddings and output head: nothing to factorize"
        )
    plan = plan_for_target(spectra, shapes, target, measure, min_ratio)
    if not plan.lrc_names:
        raise CompressionError(
            f"At target={target} ({measure}) no matrix loses more than min_ratio={min_ratio} of "
            "its rank with factors smaller than it: nothing to factorize; raise the target or "
            "use measure='params'"
        )
    before = sum(p.numel() for p in model.parameters())
    factorized: list[dict[str, Any]] = []
    for name in tqdm(plan.lrc_names, desc="factorize", unit="layer", disable=not progress):
        single = RankPlan({name: plan.layers[name]}, plan.threshold)
        factorized += factorize_model(model, single, return_report=True)[1]
    after = sum(p.numel() for p in model.parameters())
    return CompressionResult(model, plan, factorized, spectra, before, after)


def module_type_of(name: str) -> str:
    """The name after the block index: ``encoder.layer.3.attention.self.query`` ->
    ``attention.self.query``; ``model.layers.0.mlp.up_proj`` -> ``mlp.up_proj``."""
    parts = _LAYER_INDEX.split(name)
    return parts[-1] if len(parts) > 1 else name


def summary_rows(result: CompressionResult) -> list[dict[str, Any]]:
    """Per module type: matrices, LRCs, ranks kept, parameters before/after, mean error."""
    errors = {row["name"]: row["relative_error"] for row in result.factorized}
    groups: dict[str, list[str]] = defaultdict(list)
    for name in result.plan.layers:
        groups[module_type_of(name)].append(name)
    rows = []
    for kind, names in groups.items():
        layers = [result.plan.layers[name] for name in names]
        lrc = [name for name in names if result.plan.layers[name].lrc]
        ranks = [result.plan.layers[name].rank for name in lrc]
        rows.append(
            {
                "module_type": kind,
                "matrices": len(names),
                "lrc": len(lrc),
                "full_rank": max(layer.full_rank for layer in layers),
                "rank_kept": f"{min(ranks)}-{max(ranks)}" if ranks else "dense",
                "params_before": sum(layer.parameters_before for layer in layers),
                "params_after": sum(layer.parameters_after for layer in layers),
                "relative_error": sum(errors[n] for n in lrc) / len(lrc) if lrc else 0.0,
            }
        )
    return rows


def compress_pretrained(
    model_dir: str | Path,
    output_dir: str | Path,
    target: float,
    *,
    measure: str = "rank",
    min_ratio: float = 0.5,
    allow_untested: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> CompressionResult:
    """Load ``model_dir``, compress it, save it (plus tokenizer files and a JSON report).

    ``output_dir`` may not be ``model_dir`` nor hold a model unless ``overwrite`` is true
    (:func:`check_output_dir`).

    The command (``lowrank-optim compress``) also draws the spectra plot, from
    ``result.spectra`` and ``result.plan.threshold`` (:func:`lowrank_optim.cli.plots.plot_spectra`).
    """
    _check_target(target, measure)  # before reading gigabytes of weights
    config = check_model_dir(model_dir, allow_untested)
    check_output_dir(model_dir, output_dir, overwrite)
    model = model_class_for(config).from_pretrained(model_dir).eval()
    result = compress_model(model, target, measure=measure, min_ratio=min_ratio, progress=progress)
    output = save_pretrained_factorized(model, result.plan, output_dir)
    for path in Path(model_dir).iterdir():
        if path.is_file() and _TOKENIZER_FILE.match(path.name):
            shutil.copy2(path, output / path.name)
    report = {
        "source": str(model_dir),
        "target": target,
        "measure": measure,
        "min_ratio": min_ratio,
        "threshold": result.plan.threshold,
        "parameters_before": result.parameters_before,
        "parameters_after": result.parameters_after,
        "module_types": summary_rows(result),
    }
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return result


def load_compressed(directory: str | Path, **kwargs: Any) -> Any:
    """The compressed model saved by :func:`compress_pretrained`, in its factorized shape."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    return from_pretrained_factorized(model_class_for(config), directory, **kwargs)


