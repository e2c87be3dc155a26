"""``LowRankLinear``: a linear layer stored as two factors, ``W ~ U D``.

From the truncated SVD ``W = U_k S_k V_k^T`` the factors are ``up = U_k S_k^1/2`` (``out x k``)
and ``down = S_k^1/2 V_k^T`` (``k x in``): the square root of the spectrum on each side keeps
both factors on the same scale, which is what WeLore does and what makes plain AdamW on them
well-conditioned. ``forward(x) = up (down x) + b`` costs ``k (in + out)`` multiply-adds per
token instead of ``in * out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankLinear", "factor_weight"]


def factor_weight(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with ``up @ down`` the best rank-``rank`` approximation of ``weight``."""
    rows, cols = weight.shape
    if not isinstance(rank, int) or not 1 <= rank <= min(rows, cols):
        raise ValueError(f"Invalid rank: {rank!r}; must be an integer in [1, {min(rows, cols)}]")
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    left, values, right = torch.linalg.svd(weight.detach().to(compute), full_matrices=False)
    root = values[:rank].sqrt()
    up = left[:, :rank] * root
    down = root[:, None] * right[:rank]
    return up.to(weight.dtype), down.to(weight.dtype)


class LowRankLinear(nn.Module):
    """``y = x down^T up^T + bias`` with ``up``: ``out x k`` and ``down``: ``k x in``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"Invalid rank: {rank!r}; must be an integer in [1, "
                f"{min(in_features, out_features)}]"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        options = {"device": device, "dtype": dtype}
        self.up = nn.Parameter(torch.empty(out_features, rank, **options))
        self.down = nn.Parameter(torch.empty(rank, in_features, **options))
        self.bias = nn.Parameter(torch.zeros(out_features, **options)) if bias else None
        nn.init.kaiming_uniform_(self.up, a=5**0.5)
        nn.init.kaiming_uniform_(self.down, a=5**0.5)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, rank: int
    ) -> LowRankLinear:
        """Factors of an ``out x in`` weight by truncated SVD, on its device and dtype."""
        rows, cols = weight.shape
        layer = cls(cols, rows, rank, bias is not None, weight.device, weight.dtype)
        up, down = factor_weight(weight, rank)
        with torch.no_grad():
            layer.up.copy_(up)
            layer.down.copy_(down)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, module: nn.Module, rank: int) -> LowRankLinear:
        """From an ``nn.Linear`` or a transformers ``Conv1D`` (whose weight is ``in x out``)."""
        if type(module) is nn.Linear:
            return cls.from_weight(module.weight, module.bias, rank)
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            return cls.from_weight(module.weight.T, module.bias, rank)
        raise ValueError(
            f"Cannot factorize a {type(module).__name__}; expected nn.Linear or Conv1D"
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(inputs, self.down), self.up, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.up @ self.down

    def to_linear(self) -> nn.Linear:
        """The equivalent dense layer (``W = up @ down``)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=self.up.device,
            dtype=self.up.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def relative_error(self, dense_weight: torch.Tensor) -> float:
        """``||W - up down||_F / ||W||_F``."""
        compute = torch.promote_types(dense_weight.dtype, torch.float32)
        reference = dense_weight.detach().to(compute)
        difference = reference - self.dense_weight().detach().to(compute)
        return float(difference.norm() / reference.norm().clamp_min(1e-30))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
