"""Focused tests of the quantized optimizers' own pieces (the per-storage behaviour of every
optimizer is in the matrix: ``test_matrix_storage.py``): the torchao 8-bit backend against
bitsandbytes, chunked dense updates, and QGaLoreAdamW's INT8 weights."""

from __future__ import annotations

import pytest
import torch
from helpers import gradient_stream, roundtrip, run_stream

from lowrank_optim import GaLoreAdamW8bit, ProjectionConfig, QGaLoreAdamW
from lowrank_optim.factory import lowrank_param_groups
from lowrank_optim.quant import QuantizedLinear, quantize_model

ROWS, COLS, RANK = 96, 256, 32  # low-rank moments 32 x 256 = 8192 elements: quantized


def test_torchao_backend_tracks_bitsandbytes_and_shares_its_checkpoints() -> None:
    grads = gradient_stream(30)
    weight_bnb, optimizer_bnb = run_stream(GaLoreAdamW8bit, grads)
    weight_ao, optimizer_ao = run_stream(GaLoreAdamW8bit, grads, quant_backend="torchao")
    assert optimizer_ao.state[weight_ao]["exp_avg_codes"].dtype == torch.uint8
    # Same map and format; the two kernels differ only in ties, so the runs stay close.
    assert float((weight_ao - weight_bnb).detach().norm() / weight_bnb.detach().norm()) < 0.01
    # A torchao-written state resumes under bitsandbytes (and reads back identically).
    first, first_optimizer = run_stream(GaLoreAdamW8bit, grads[:13], quant_backend="torchao")
    resumed = torch.nn.Parameter(first.detach().clone())
    optimizer = GaLoreAdamW8bit(
        [{"params": [resumed], "rank": RANK, "update_proj_gap": 10, "scale": 1.0}],
        lr=1e-2,
        weight_decay=0.0,
    )
    optimizer.load_state_dict(roundtrip(first_optimizer.state_dict()))
    read_ao = first_optimizer.moment_storage.read(first_optimizer.state[first])
    read_bnb = optimizer.moment_storage.read(optimizer.state[resumed])
    for ours, theirs in zip(read_ao, read_bnb, strict=True):
        assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="Invalid backend: 'fp8'; allowed: bitsandbytes, torchao"):
        GaLoreAdamW8bit([resumed], quant_backend="fp8")


@pytest.mark.parametrize("moment_bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_dense_update_equals_the_whole_tensor_update(
    monkeypatch: pytest.MonkeyPatch, moment_bits: int, dtype: torch.dtype
) -> None:
    """Chunks start on block bounds, so quantizing a chunk at a time changes no bit."""
    import lowrank_optim.optim.galore_adamw as galore_module

    results = []
    for chunk in (1 << 20, 1000):  # 1000 -> 768 (8-bit) or 896 (4-bit): many uneven chunks
        monkeypatch.setattr(galore_module, "WORKING_CHUNK", chunk)
        weight = torch.nn.Parameter(torch.zeros(ROWS, COLS, dtype=dtype))
        optimizer = GaLoreAdamW8bit([weight], lr=1e-2, moment_bits=moment_bits)
        for grad in gradient_stream(6):
            weight.grad = grad.to(dtype)
            optimizer.step()
        state = optimizer.state[weight]
        results.append((weight.detach().clone(), state["exp_avg_codes"], state["exp_avg_absmax"]))
    for whole, chunked in zip(*results, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    assert float(results[0][0].float().abs().max()) > 0


# ---------------------------------------------------------- QGaLoreAdamW: INT8 weights
def quantized_tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer LLaMA (hidden 64, vocab 64) whose decoder linears hold INT8 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return quantize_model(model, include=lambda name: "layers" in name)


def qgalore_optimizer(model: torch.nn.Module) -> QGaLoreAdamW:
    groups = lowrank_param_groups(
        model, "attn-mlp", ProjectionConfig(rank=8, update_proj_gap=4, proj_bits=4)
    )
    return QGaLoreAdamW(groups, lr=3e-3, weight_decay=0.0, model=model, seed=7)


def qgalore_train(model, optimizer, batches) -> list[float]:
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_qgalore_trains_int8_weights_with_int4_bases() -> None:
    model = quantized_tiny_llama()
    optimizer = qgalore_optimizer(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLinear)
    codes_before = layer.weight_codes.clone()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = qgalore_train(model, optimizer, [ids] * 25)
    assert losses[-1] < losses[0] - 0.3
    assert layer.weight_codes.dtype == torch.int8 and not torch.equal(
        layer.weight_codes, codes_before
    )
    state = optimizer.state[layer.weight]
    assert state["basis_right_codes"].dtype == torch.uint8  # 64 x 64 std: right side, packed
    assert state["basis_right_codes"].numel() == 64 * 8 // 2


def test_qgalore_resume_is_bit_for_bit_including_stochastic_rounding() -> None:
    generator = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 64, (4, 16), generator=generator) for _ in range(12)]
    model = quantized_tiny_llama()
    optimizer = qgalore_optimizer(model)
    qgalore_train(model, optimizer, data)

    first = quantized_tiny_llama()
    first_optimizer = qgalore_optimizer(first)
    qgalore_train(first, first_optimizer, data[:5])
    saved_model, saved_optimizer = (
        roundtrip(first.state_dict()),
        roundtrip(first_optimizer.state_dict()),
    )
    resumed = quantized_tiny_llama(seed=3)
    resumed.load_state_dict(saved_model)
    resumed_optimizer = qgalore_optimizer(resumed)
    resumed_optimizer.load_state_dict(saved_optimizer)
    qgalore_train(resumed, resumed_optimizer, data[5:])
    expected = model.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
