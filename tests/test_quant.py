"""Tests for lowrank_optim.quant: error bounds, packing, stochastic rounding, QuantizedLinear."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from lowrank_optim.quant import (
    BLOCKSIZE,
    QuantizedLinear,
    blockwise8_error_bound,
    blockwise8_nbytes,
    compute_int8_scales,
    dequantize_blockwise8,
    dequantize_groupwise,
    dequantize_model,
    dequantize_weight_int8,
    groupwise_nbytes,
    int8_weight_nbytes,
    pack_int4,
    quantize_blockwise8,
    quantize_groupwise,
    quantize_model,
    quantize_weight_int8,
    quantized_linear_owners,
    stochastic_round_int8,
    unpack_int4,
)

FP_SLACK = 1e-6  # fp32 rounding in the dequantization arithmetic (relative)


def _roundtrip_load(obj: object) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------- 8-bit blockwise (bitsandbytes)


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise8_error_within_half_gap_of_dynamic_map(signed: bool) -> None:
    g = torch.Generator().manual_seed(0)
    # Blocks of very different magnitudes, as Adam moments have; 5000 is not a multiple of 256.
    x = torch.randn(5000, generator=g) * torch.logspace(-6, 2, 5000)
    if not signed:
        x = x.square()
    codes, absmax = quantize_blockwise8(x, signed=signed)
    assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32
    y = dequantize_blockwise8(codes, absmax, x.shape, signed=signed)
    bound = blockwise8_error_bound(signed)
    # Relative-to-block-absmax bound we verify: 0.71% (signed map), 0.36% (unsigned map).
    assert bound < (0.0071 if signed else 0.0036)
    # x at +-absmax and near code midpoints hit the bound: it is tight, not decorative.
    assert ((y - x).abs() / absmax.repeat_interleave(BLOCKSIZE)[: x.numel()]).max() > 0.9 * bound
    per_elem = absmax.repeat_interleave(BLOCKSIZE)[: x.numel()]
    assert ((y - x).abs() <= per_elem * bound * (1 + FP_SLACK)).all()
    if not signed:
        assert (y >= 0).all()


def test_blockwise8_shapes_bytes_and_weights_only() -> None:
    x = torch.randn(64, 80)
    codes, absmax = quantize_blockwise8(x, signed=True)
    n = x.numel()
    assert absmax.numel() == math.ceil(n / 256)
    stored = codes.numel() * codes.element_size() + absmax.numel() * absmax.element_size()
    assert stored == blockwise8_nbytes(n) == n + 4 * math.ceil(n / 256)
    loaded = _roundtrip_load({"codes": codes, "absmax": absmax})
    y = dequantize_blockwise8(loaded["codes"], loaded["absmax"], x.shape, signed=True)
    assert y.shape == x.shape and y.dtype == torch.float32


def test_blockwise8_bad_inputs() -> None:
    with pytest.raises(ValueError, match="int64"):
        quantize_blockwise8(torch.arange(10), signed=True)
    with pytest.raises(ValueError, match="negative"):
        quantize_blockwise8(-torch.ones(10), signed=False)


# ---------------------------------------------------------------- group-wise 4/8-bit


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
def test_pack_unpack_int4_roundtrip_including_odd_lengths(n: int) -> None:
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.numel() == math.ceil(n / 2)
    assert torch.equal(unpack_int4(packed, n), codes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(33, 17), (512,), (3, 256)])
def test_groupwise_error_at_most_half_scale(bits: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3 + 1
    d = quantize_groupwise(x, bits=bits, group_size=256)
    y = dequantize_groupwise(d, x.shape, bits=bits, group_size=256)
    n = x.numel()
    scale = d["scale"].repeat_interleave(256)[:n].reshape(shape)
    tol = scale / 2 * (1 + FP_SLACK) + FP_SLACK * x.abs().max()
    assert ((y - x).abs() <= tol).all()
    # The bound is tight enough to mean something: a 4-bit step is 1/15 of the group range.
    assert (d["scale"] > 0).all()


@pytest.mark.parametrize("vals", [[5.0, 6.0], [-6.0, -5.0]])
def test_groupwise_same_signed_group_not_clipped(vals: list[float]) -> None:
    x = torch.linspace(vals[0], vals[1], 256)
    for bits in (4, 8):
        d = quantize_groupwise(x, bits=bits)
        y = dequantize_groupwise(d, x.shape, bits=bits, group_size=256)
        assert (y - x).abs().max() <= float(d["scale"][0]) / 2 + 1e-5
        assert y.min() >= vals[0] - 1e-5 and y.max() <= vals[1] + 1e-5


def test_groupwise_constant_group_and_bytes() -> None:
    x = torch.full((300,), 2.5)
    d = quantize_groupwise(x, bits=4, group_size=256)
    assert torch.equal(dequantize_groupwise(d, x.shape, 4, 256), x)
    for bits, numel, gs in [(4, 1001, 256), (8, 1001, 256), (4, 7, 3)]:
        d = quantize_groupwise(torch.randn(numel), bits=bits, group_size=gs)
        actual = sum(t.numel() * t.element_size() for t in d.values())
        expected_codes = math.ceil(numel / 2) if bits == 4 else numel
        assert (
            actual
            == groupwise_nbytes(numel, bits, gs)
            == expected_codes + 8 * math.ceil(numel / gs)
        )


def test_groupwise_bad_inputs_name_the_value() -> None:
    with pytest.raises(ValueError, match="group_size=0"):
        quantize_groupwise(torch.randn(10), bits=4, group_size=0)
    with pytest.raises(ValueError, match="group_size=-4"):
        groupwise_nbytes(10, 4, -4)
    with pytest.raises(ValueError, match="bits=3"):
        quantize_groupwise(torch.randn(10), bits=3)
    with pytest.raises(ValueError, match="int64"):
        quantize_groupwise(torch.arange(10), bits=4)
    with pytest.raises(ValueError, match="max=16"):
        pack_int4(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_groupwise(torch.tensor([1.0, float("nan")]))


# ---------------------------------------------------------------- INT8 weights


@pytest.mark.parametrize("in_features", [256, 300, 17])
def test_int8_nearest_error_at_most_half_scale(in_features: int) -> None:
    w = torch.randn(8, in_features)
    codes, scales = quantize_weight_int8(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert scales.shape == (8, math.ceil(in_features / 256))
    y = dequantize_weight_int8(codes, scales, w.shape)
    s = scales.repeat_interleave(256, dim=1)[:, :in_features]
    assert ((y - w).abs() <= s / 2 * (1 + FP_SLACK)).all()
    actual = codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
    assert actual == int8_weight_nbytes(8, in_features) == 8 * in_features + 4 * scales.numel()


def test_int8_short_last_group_uses_its_own_scale() -> None:
    w = torch.cat([torch.full((1, 256), 100.0), torch.full((1, 44), 0.01)], dim=1)
    _, scales = quantize_weight_int8(w)
    assert scales[0, 1] == pytest.approx(0.01 / 127)


def test_stochastic_rounding_is_unbiased() -> None:
    n, s, frac = 4000, 0.5, 0.3
    scales = torch.full((n, 1), s)
    x = torch.full((n, 1), (10 + frac) * s)  # 4000 independent roundings of one value
    g = torch.Generator().manual_seed(123)
    deq = dequantize_weight_int8(stochastic_round_int8(x, scales, g), scales, x.shape)
    sigma = s * math.sqrt(frac * (1 - frac) / n)
    assert abs(float(deq.mean()) - float(x[0, 0])) < 5 * sigma
    # and the rounding is genuinely random (both neighbours occur)
    assert set(torch.unique(deq).tolist()) == {5.0, 5.5}


def test_small_update_survives_in_expectation_but_not_with_nearest() -> None:
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(-100, 101, (8, 256), generator=g).float()
    codes[:, 0] = 127  # pins every row's absmax, so the scale does not move
    s = 0.01
    w0 = codes * s
    q = QuantizedLinear(256, 8, bias=False)
    q.set_weight_(w0)
    assert torch.allclose(q.dequantized_weight(), w0)
    update = torch.full_like(w0, 0.1 * s)
    update[:, 0] = 0
    q.apply_update_(update, g)
    moved = (q.dequantized_weight() - w0)[:, 1:]
    sigma = s * math.sqrt(0.1 * 0.9 / moved.numel())
    assert abs(float(moved.mean()) - 0.1 * s) < 5 * sigma
    # Nearest rounding would erase the same update entirely.
    c, sc = quantize_weight_int8(w0 + update)
    assert torch.allclose(dequantize_weight_int8(c, sc, w0.shape), w0)


def test_generator_state_checkpoint_reproduces_rounding() -> None:
    x = torch.randn(16, 300)
    scales = compute_int8_scales(x)
    g = torch.Generator().manual_seed(5)
    stochastic_round_int8(x, scales, g)  # advance the stream
    state = _roundtrip_load({"rng": g.get_state()})["rng"]
    expected = stochastic_round_int8(x, scales, g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(stochastic_round_int8(x, scales, g2), expected)
    # The draws come only from the explicit generator, not the global RNG.
    torch.manual_seed(0)
    g2.set_state(state)
    a = stochastic_round_int8(x, scales, g2)
    torch.manual_seed(1)
    g2.set_state(state)
    assert torch.equal(stochastic_round_int8(x, scales, g2), a)


def test_int8_bad_inputs() -> None:
    with pytest.raises(ValueError, match="group_size=0"):
        quantize_weight_int8(torch.randn(2, 4), group_size=0)
    with pytest.raises(ValueError, match="int32"):
        quantize_weight_int8(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="Generator"):
        stochastic_round_int8(torch.randn(2, 4), torch.ones(2, 1), None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- QuantizedLinear


def test_quantized_linear_forward_backward() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(300, 40)
    q = QuantizedLinear.from_linear(dense)
    x = torch.randn(2, 5, 300, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = q(x)
    # Forward matches the dense layer computed with the dequantized weight exactly, and the
    # original dense layer within the quantization error (|dW| <= s/2 per element).
    w_deq = q.dequantized_weight()
    assert torch.allclose(y, x @ w_deq.T + dense.bias, atol=1e-5)
    s_full = q.weight_scales.repeat_interleave(256, dim=1)[:, :300]
    err_bound = (x.detach().abs() @ (s_full / 2).T).max()
    assert (y - dense(x)).abs().max() <= err_bound + 1e-5
    # Backward: input grad, a full-size weight grad on the handle, bias grad.
    y.square().sum().backward()
    y_ref = x2 @ w_deq.T + dense.bias.detach()
    y_ref.square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)
    assert q.weight.grad.shape == (40, 300)
    expected_gw = (2 * y_ref.detach()).reshape(-1, 40).T @ x.detach().reshape(-1, 300)
    assert torch.allclose(q.weight.grad, expected_gw, atol=1e-3)
    assert torch.allclose(q.bias.grad, (2 * y_ref.detach()).reshape(-1, 40).sum(0), atol=1e-3)
    # The weight grad is usable: one descent step through apply_update_ lowers the loss.
    loss0 = float(q(x.detach()).detach().square().sum())
    q.apply_update_(-1e-4 * q.weight.grad, torch.Generator().manual_seed(0))
    assert float(q(x.detach()).detach().square().sum()) < loss0


def test_standard_optimizer_fails_loudly_on_handle() -> None:
    q = QuantizedLinear.from_linear(nn.Linear(16, 4))
    q(torch.randn(3, 16)).sum().backward()
    opt = torch.optim.SGD([q.weight], lr=0.1)
    with pytest.raises(RuntimeError, match="single memory location"):
        opt.step()
    assert torch.isnan(q.weight).all()  # reading the handle is visibly wrong, never zeros


def test_quantize_dequantize_model_roundtrip() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("embed_proj", nn.Linear(8, 64))
    model.add_module("mlp", nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)))
    model.add_module("lm_head", nn.Linear(32, 10))
    x = torch.randn(4, 8)
    ref = model(x)
    quantize_model(model)
    assert isinstance(model.mlp[0], QuantizedLinear) and isinstance(model.mlp[2], QuantizedLinear)
    assert type(model.embed_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert set(quantized_linear_owners(model).values()) == {model.mlp[0], model.mlp[2]}
    yq = model(x)
    assert (yq - ref).abs().max() < 0.05 * ref.abs().max()
    dequantize_model(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert torch.allclose(model(x), yq, atol=1e-5)
    only = quantize_model(model, include=["mlp.2"])
    assert isinstance(only.mlp[2], QuantizedLinear) and type(only.mlp[0]) is nn.Linear


def test_state_dict_weights_only_roundtrip() -> None:
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(nn.Linear(300, 12))
    sd = q.state_dict()
    assert set(sd) == {"weight_codes", "weight_scales", "bias"}
    loaded = _roundtrip_load(sd)
    q2 = QuantizedLinear(300, 12)
    q2.load_state_dict(loaded)  # strict: the handle is not a missing key
    assert torch.equal(q2.weight_codes, q.weight_codes)
    assert torch.equal(q2.weight_scales, q.weight_scales)
    x = torch.randn(3, 300)
    assert torch.equal(q2(x), q(x))
    # A dense nn.Linear checkpoint loads by quantizing on the fly.
    dense = nn.Linear(300, 12)
    q3 = QuantizedLinear(300, 12)
    q3.load_state_dict(dense.state_dict())
    assert torch.allclose(q3.dequantized_weight(), dense.weight, atol=float(q3.weight_scales.max()))


def test_dtype_conversion_keeps_handle_small_and_scales_fp32() -> None:
    q = QuantizedLinear.from_linear(nn.Linear(64, 32)).to(torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and q.weight.shape == (32, 64)
    assert q.weight.untyped_storage().nbytes() == 2  # one bf16 element
    assert q.weight_scales.dtype == torch.float32 and q.weight_codes.dtype == torch.int8
    y = q(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert q.quantized_nbytes() == 32 * 64 + 4 * 32


def test_quantized_linear_bad_inputs() -> None:
    with pytest.raises(ValueError, match="group_size=0"):
        QuantizedLinear(4, 4, group_size=0)
    with pytest.raises(ValueError, match="group_size=-1"):
        quantize_model(nn.Linear(4, 4), group_size=-1)
    q = QuantizedLinear(4, 4)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        q.apply_update_(torch.zeros(3, 4), torch.Generator())
