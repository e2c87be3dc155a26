"""Memory accounting: exact bytes, formula estimates, peak measurement, and `bench memory`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.peers import run_method
from lowrank_optim.memory import (
    COMPONENTS,
    ESTIMATE_METHODS,
    MODULE_TYPES,
    account,
    estimate,
    estimate_matrix,
    layer_of,
    measure_peak,
    module_type_of,
    optimizer_state_bytes,
    param_specs,
    welore_plan,
)
from lowrank_optim.train.models import build_llama, build_llama_on_meta, tiny_llama_config

# hidden 128 and rank 32 make the low-rank moments exactly 4096 elements (the smallest that the
# 8-bit paths quantize); intermediate 344 leaves INT8 weight rows a short last group.
CONFIG = tiny_llama_config(vocab_size=300, hidden=128, layers=2, heads=4, intermediate=344)
RANK, TOKENS = 32, 16
OURS = [
    "adamw",
    "galore_adamw",
    "galore_adamw8bit",
    "galore_adamw4bit",
    "q_galore_adamw",
    "q_galore_adamw4bit",
    "welore_adamw",
]
PEER_MODULES = {
    "bnb_adamw8bit": "bitsandbytes",
    "torchao_adamw8bit": "torchao.optim",
    "torchao_adamw4bit": "torchao.optim",
    "galore_torch": "galore_torch",
    "apollo": "apollo_torch",
}


@pytest.fixture(scope="module")
def specs():
    return param_specs(build_llama_on_meta(CONFIG).to(torch.bfloat16))


_STEPPED: dict[str, tuple] = {}


def _stepped(method: str, specs, **kwargs):
    """Model, optimizer and plan after ``run_method``; cached, since accounting only reads."""
    if method in PEER_MODULES:
        pytest.importorskip(PEER_MODULES[method])
    if method in _STEPPED and not kwargs:
        return _STEPPED[method]
    model = build_llama(CONFIG, seed=0, dtype=torch.bfloat16)
    # Hand off the MLP matrices only, so the attention ones keep their GaLore state.
    plan = None
    if method == "welore_adamw":
        plan = {name: k for name, k in welore_plan(specs).items() if ".mlp." in name}
    result = model, run_method(method, model, RANK, TOKENS, plan=plan, **kwargs), plan
    if not kwargs:
        _STEPPED[method] = result
    return result


def _reference_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Sum of numel * element_size over every distinct tensor, found independently of
    ``account``: tensor subclasses by their inner tensors, objects by their attributes, and
    zero-stride handles by the storage they really own."""
    found: dict[int, torch.Tensor] = {}

    def visit(value: object, depth: int = 3) -> None:
        if isinstance(value, torch.Tensor):
            if type(value) not in (torch.Tensor, torch.nn.Parameter):
                for name in value.__tensor_flatten__()[0]:
                    visit(getattr(value, name))
            else:
                found[id(value)] = value
        elif depth and isinstance(value, dict | list | tuple):
            for item in value.values() if isinstance(value, dict) else value:
                visit(item, depth - 1)
        elif depth and hasattr(value, "__dict__"):
            visit(vars(value), depth - 1)

    for param in model.parameters():
        visit(param)
        visit(param.grad)
    visit(list(model.buffers()))
    visit(list(optimizer.state.values()))

    def nbytes(tensor: torch.Tensor) -> int:
        if tensor.numel() and 0 in tensor.stride():
            return tensor.untyped_storage().nbytes()
        return tensor.numel() * tensor.element_size()

    return sum(nbytes(tensor) for tensor in found.values())


@pytest.mark.parametrize("method", OURS)
def test_account_equals_sum_over_every_tensor(method, specs):
    model, optimizer, _ = _stepped(method, specs)
    breakdown = account(model, optimizer)
    assert breakdown.total() == _reference_bytes(model, optimizer)
    states = breakdown.summary()["optimizer_states"]
    if not method.startswith("q_galore"):  # optimizer_state_bytes sees no QuantizedLinear handles
        assert states == optimizer_state_bytes(optimizer)
    by_type = breakdown.by_module_type()
    assert set(by_type) <= set(MODULE_TYPES)
    assert sum(sum(row.values()) for row in by_type.values()) == breakdown.total()
    assert sum(sum(row.values()) for row in breakdown.by_layer().values()) == breakdown.total()
    assert set(breakdown.by_layer()) == {"-", "0", "1"}
    components = breakdown.by_component()
    assert components["gradients"] > 0 and components["moments"] > 0
    if method != "adamw":
        assert components["projection"] > 0
    if method.startswith("q_galore"):
        assert components["weight_codes"] > 0 and components["projection_meta"] > 0
        assert components["moment_meta"] > 0 and components["weight_scales"] > 0


@pytest.mark.parametrize("method", list(ESTIMATE_METHODS))
def test_meta_estimate_equals_exact_accounting(method, specs):
    model, optimizer, plan = _stepped(method, specs)
    exact = account(model, optimizer)
    estimated = estimate(specs, method, RANK, plan=plan)
    assert exact.entries == estimated.entries


def test_layerwise_estimate_counts_one_gradient(specs):
    layerwise = pytest.importorskip("lowrank_optim.layerwise")
    model, optimizer, _ = _stepped("galore_adamw", specs, wrap=layerwise.LayerwiseOptimizer)
    exact = account(model, optimizer)
    estimated = estimate(specs, "galore_adamw", RANK, layerwise=True)
    assert exact.by_component()["gradients"] == 0  # freed inside backward
    assert {k: v for k, v in estimated.entries.items() if k[1] != "gradients"} == exact.entries
    largest = max(s.numel * s.esize for s in specs if not s.buffer)
    assert estimated.by_component()["gradients"] == largest


def test_galore_state_formula_per_matrix():
    m, n, r = 5461, 2048, 512  # LLaMA 1B MLP; `std` projects the 2048 side
    adamw = estimate_matrix((m, n), "adamw", r)
    galore = estimate_matrix((m, n), "galore_adamw", r)
    assert adamw == {"weights": 2 * m * n, "optimizer_states": 2 * 2 * m * n + 4}
    # moments + basis only: the int step and the stability metrics are numbers, not tensors
    assert galore["optimizer_states"] == 2 * (2 * m * r) + 2 * n * r
    assert galore == estimate_matrix((m, n), "galore_torch", r)
    qgalore = estimate_matrix((m, n), "q_galore_adamw", r)
    assert qgalore["weights"] == m * n + 4 * m * (n // 256) + 2


def test_names_and_errors(specs):
    assert module_type_of("model.layers.3.self_attn.q_proj.weight") == "q"
    assert module_type_of("model.layers.3.mlp.down_proj.weight_codes") == "down"
    assert module_type_of("model.embed_tokens.weight") == "embed"
    assert module_type_of("lm_head.weight") == "head"
    assert module_type_of("model.layers.0.input_layernorm.weight") == "norm"
    assert layer_of("model.layers.11.mlp.up_proj.weight") == 11
    assert layer_of("lm_head.weight") is None
    assert len(COMPONENTS) == len(set(COMPONENTS))
    with pytest.raises(ValueError, match="'sgd'.*allowed: adamw"):
        estimate(specs, "sgd")
    with pytest.raises(ValueError, match="Invalid rank: 0"):
        estimate(specs, "galore_adamw", 0)
    with pytest.raises(ValueError, match="Invalid keep: 1.5"):
        welore_plan(specs, keep=1.5)
    with pytest.raises(ValueError, match="Invalid interval: 0"):
        measure_peak(lambda: None, interval=0)


def test_measure_peak_sees_a_transient_allocation():
    size = 64 * 2**20

    def allocate() -> int:
        block = torch.ones(size // 4)  # written, so every page is resident
        return int(block[-1])

    peak = measure_peak(allocate)
    assert peak.result == 1
    assert size * 0.9 <= peak.peak_bytes <= size * 4


def test_bench_memory_end_to_end(tmp_path: Path):
    from lowrank_optim.cli import main

    code = main(
        [
            "bench",
            "memory",
            "--quick",
            "--out",
            str(tmp_path),
            "--methods",
            "adamw",
            "q_galore_adamw",
        ]
    )
    assert code == 0
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"memory.{suffix}").stat().st_size > 0
    result = json.loads((tmp_path / "memory.json").read_text())
    rows = result["configs"]["tiny"]["methods"]
    assert rows and all(row["exact_matches_estimate"] for row in rows.values())
    assert all(row["peak_bytes"] > 0 for row in rows.values())
    assert 0 < result["facts"]["qgalore_fraction_of_adamw"]["tiny"] < 1
    assert "| torch AdamW |" in (tmp_path / "memory.md").read_text()
