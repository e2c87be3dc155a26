"""``QuantizedLinear``: a linear layer whose weight lives as INT8 codes (Q-GaLore).

Design (the "gradient handle"):

* ``weight_codes`` (int8 ``[out, in]``) and ``weight_scales`` (fp32 ``[out, ceil(in/g)]``) are
  BUFFERS: they are the only copy of the weight, saved in ``state_dict`` as plain tensors.
* ``weight`` is an ``nn.Parameter`` of the full shape and compute dtype that holds NO values: it
  is one NaN scalar expanded with zero strides (one element of storage). It exists so autograd
  and optimizers see a normal parameter: a custom autograd function dequantizes the codes,
  computes ``y = x W^T + b`` and, in backward, returns the full ``dL/dW`` as the gradient of
  this handle, so ``weight.grad`` is an ordinary dense tensor.
* The optimizer does NOT write into ``weight``. It computes an update ``U`` (e.g. GaLore's
  projected-back Adam step, already multiplied by ``-lr``) and calls
  ``module.apply_update_(U, generator)``: ``W_hp = deq(codes) + U`` in fp32, new per-group
  scales from ``W_hp``, then stochastic rounding back into the buffers (Zhang et al., 2024), so
  updates smaller than half a quantization step survive in expectation. A standard
  ``torch.optim`` optimizer stepping ``weight`` in place fails loudly ("more than one element of
  the written-to tensor refers to a single memory location") instead of silently doing nothing;
  code that reads ``.weight`` directly gets NaN, not plausible numbers.
  :func:`quantized_linear_owners` maps each handle to its module for the optimizer.

Honest memory picture, per layer with ``g`` = group size: at rest ``out*in`` bytes of codes +
``4*out*ceil(in/g)`` bytes of scales (vs ``2*out*in`` in bf16, ``4*out*in`` in fp32). Forward
and backward each materialize a TRANSIENT dequantized weight (one layer at a time, freed right
after the matmul; backward saves only ``x`` as ``nn.Linear`` does, never a float weight).
``weight.grad`` is full size in the compute dtype until the optimizer consumes it (per-layer
stepping keeps one alive at a time), and ``apply_update_`` briefly holds an fp32 copy plus the
uniform draws. The savings are therefore in persistent weight memory, not in gradient memory.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowrank_optim.quant.int8_weights import (
    compute_int8_scales,
    dequantize_weight_int8,
    int8_weight_nbytes,
    quantize_weight_int8,
    stochastic_round_int8,
)

__all__ = ["QuantizedLinear", "dequantize_model", "quantize_model", "quantized_linear_owners"]

_DEFAULT_EXCLUDE = ("lm_head", "embed")


def _handle(shape: tuple[int, int], dtype: torch.dtype, device: torch.device | None) -> Tensor:
    # NaN so that any code reading the handle's values is visibly wrong, never silently zero.
    return torch.full((), float("nan"), dtype=dtype, device=device).expand(shape)


class _Int8LinearFn(torch.autograd.Function):
    """``y = x deq(codes)^T + b``; the weight gradient is routed to the handle parameter."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        handle: Tensor,
        codes: Tensor,
        scales: Tensor,
        bias: Tensor | None,
        group_size: int,
    ) -> Tensor:
        w = dequantize_weight_int8(codes, scales, codes.shape, handle.dtype, group_size)
        # Save the int8 codes, not the float weight: backward re-dequantizes (cheap) so no
        # float copy of the weight stays alive between forward and backward.
        ctx.save_for_backward(x, codes, scales)
        ctx.group_size = group_size
        ctx.handle_dtype = handle.dtype
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, codes, scales = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        go2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            w = dequantize_weight_int8(codes, scales, codes.shape, grad_out.dtype, ctx.group_size)
            grad_x = grad_out @ w
        if ctx.needs_input_grad[1]:
            grad_w = (go2.t() @ x.reshape(-1, x.shape[-1])).to(ctx.handle_dtype)
        if ctx.needs_input_grad[4]:
            grad_b = go2.sum(dim=0)
        return grad_x, grad_w, None, None, grad_b, None


class QuantizedLinear(nn.Module):
    """Linear layer with INT8 group-wise weights; see the module docstring for the design."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got group_size={group_size!r}")
        dtype = dtype or torch.get_default_dtype()
        dev = torch.device(device) if device is not None else None
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = math.ceil(in_features / group_size)
        self.register_buffer(
            "weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=dev)
        )
        self.register_buffer(
            "weight_scales", torch.zeros(out_features, n_groups, dtype=torch.float32, device=dev)
        )
        self.weight = nn.Parameter(_handle((out_features, in_features), dtype, dev))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=dev)) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 256) -> QuantizedLinear:
        """Quantize ``linear``'s weight with nearest rounding; the bias is copied."""
        w = linear.weight
        q = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            group_size,
            device=w.device,
            dtype=w.dtype,
        )
        q.set_weight_(w.detach())
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def forward(self, x: Tensor) -> Tensor:
        return _Int8LinearFn.apply(
            x, self.weight, self.weight_codes, self.weight_scales, self.bias, self.group_size
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """A fresh dense copy of the weight (``codes * scale``)."""
        return dequantize_weight_int8(
            self.weight_codes,
            self.weight_scales,
            self.weight_codes.shape,
            dtype or self.weight.dtype,
            self.group_size,
        )

    @torch.no_grad()
    def set_weight_(self, w: Tensor, generator: torch.Generator | None = None) -> None:
        """Store ``w``: nearest rounding, or stochastic rounding when a generator is given."""
        if tuple(w.shape) != tuple(self.weight.shape):
            raise ValueError(f"weight shape {tuple(w.shape)} != {tuple(self.weight.shape)}")
        w = w.to(device=self.weight_codes.device, dtype=torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("refusing to quantize a non-finite weight (NaN/Inf)")
        if generator is None:
            codes, scales = quantize_weight_int8(w, self.group_size)
        else:
            # Scales come from the new weight, so every value is in range and the rounding
            # stays unbiased (no clamping).
            scales = compute_int8_scales(w, self.group_size)
            codes = stochastic_round_int8(w, scales, generator, self.group_size)
        self.weight_codes.copy_(codes)
        self.weight_scales.copy_(scales)

    @torch.no_grad()
    def apply_update_(self, update: Tensor, generator: torch.Generator) -> None:
        """``W <- SR(deq(W) + update)``: add ``update`` in fp32, re-quantize stochastically."""
        if tuple(update.shape) != tuple(self.weight.shape):
            raise ValueError(f"update shape {tuple(update.shape)} != {tuple(self.weight.shape)}")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"an explicit torch.Generator is required, got {generator!r}")
        w = self.dequantized_weight(torch.float32) + update.to(torch.float32)
        self.set_weight_(w, generator)

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the dequantized weight."""
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def quantized_nbytes(self) -> int:
        """Bytes of the stored weight (codes + scales); the handle costs one element."""
        return int8_weight_nbytes(self.out_features, self.in_features, self.group_size)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> QuantizedLinear:
        # Shrink the handle first: converting a zero-stride tensor (.to, .cuda) would otherwise
        # materialize a full dense copy. Rebuild it afterwards in the new dtype/device.
        shape = (self.out_features, self.in_features)
        self.weight.data = self.weight.data.reshape(-1)[:0]
        super()._apply(fn, recurse)
        self.weight.data = _handle(shape, self.weight.dtype, self.weight.device)
        # Scales must stay fp32 even under module.half()/.to(bfloat16).
        self.weight_scales = self.weight_scales.to(torch.float32)
        return self

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)  # the handle holds no data

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict = dict(state_dict)
        dense = state_dict.pop(prefix + "weight", None)
        if dense is not None and prefix + "weight_codes" not in state_dict:
            # A dense nn.Linear checkpoint: quantize it on load.
            codes, scales = quantize_weight_int8(dense.float(), self.group_size)
            state_dict[prefix + "weight_codes"] = codes
            state_dict[prefix + "weight_scales"] = scales
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, int8"
        )


def _predicate(include: Callable[[str], bool] | Iterable[str] | None) -> Callable[[str], bool]:
    if include is None:
        return lambda name: not any(s in name for s in _DEFAULT_EXCLUDE)
    if callable(include):
        return include
    subs = tuple(include)
    return lambda name: any(s in name for s in subs)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(
    model: nn.Module,
    include: Callable[[str], bool] | Iterable[str] | None = None,
    group_size: int = 256,
) -> nn.Module:
    """Replace ``nn.Linear`` modules by :class:`QuantizedLinear` in place; return the model.

    ``include``: None (every linear whose name has neither "lm_head" nor "embed"), a predicate on
    the module name, or name substrings of which one must match. Only exact ``nn.Linear``
    instances are converted (subclasses such as MultiheadAttention's ``out_proj`` read
    ``.weight`` directly); linears whose weight is tied to another parameter are skipped with a
    warning, since quantizing one side would silently untie them.
    """
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got group_size={group_size!r}")
    if type(model) is nn.Linear:
        return QuantizedLinear.from_linear(model, group_size) if _predicate(include)("") else model
    keep = _predicate(include)
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear or not keep(name):
            continue
        if counts.get(id(mod.weight), 0) > 1:
            warnings.warn(
                f"{name}: weight is tied to another module; left unquantized", stacklevel=2
            )
            continue
        _replace(model, name, QuantizedLinear.from_linear(mod, group_size))
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`QuantizedLinear` by a dense ``nn.Linear`` in place."""
    if isinstance(model, QuantizedLinear):
        return model.to_linear()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantizedLinear):
            _replace(model, name, mod.to_linear())
    return model


def quantized_linear_owners(model: nn.Module) -> dict[nn.Parameter, QuantizedLinear]:
    """Map each ``QuantizedLinear.weight`` handle to its module (for optimizer integration)."""
    return {m.weight: m for m in model.modules() if isinstance(m, QuantizedLinear)}
