"""The mixer's depthwise causal conv1d fused with its SiLU: y = silu(bias + sum_k weight[:, k] * xpad[t + k]).

    causal_conv1d_silu(x (batch, C, L), weight (C, W), bias (C,) or None, initial (batch, C, W-1) or None)
        -> y (batch, C, L), contiguous, x's dtype (the torch path under autocast: autocast's dtype)

xpad is x with the carried window ``initial`` (the last W-1 inputs of the previous chunk; zeros when None) in front,
so a sequence scored in chunks gets the same outputs as in one piece. x may have any strides (the Triton path reads
it in place when time is contiguous: the dense mixer hands it a view of its in-projection). CUDA tensors run the
Triton kernels of kernels.triton_conv (CPU tensors too with backend="triton" under TRITON_INTERPRET=1, the tests);
anything else runs torch's conv1d and silu (the Triton kernels accumulate in fp32 with the weights in fp32, torch's
conv under bf16 autocast in bf16). Differentiable in x, weight, bias and initial.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._host import OP_BACKENDS, use_triton

CONV_BACKENDS = OP_BACKENDS


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, initial: torch.Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"x: expected shape (batch, C, L), got {tuple(x.shape)}")
    b, c, _ = x.shape
    if weight.dim() != 2 or weight.shape[0] != c or weight.shape[1] < 1:
        raise ValueError(f"weight: expected shape ({c}, W), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"bias: expected shape ({c},), got {tuple(bias.shape)}")
    w = weight.shape[1]
    if initial is not None and tuple(initial.shape) != (b, c, w - 1):
        raise ValueError(f"initial: expected shape {(b, c, w - 1)}, got {tuple(initial.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("initial", initial)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device}, got {t.device}")


def causal_conv1d_silu_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             initial: torch.Tensor | None) -> torch.Tensor:
    """The torch path (also the reference of the tests): pad or prepend, depthwise conv1d, silu."""
    w = weight.shape[1]
    xpad = F.pad(x, (w - 1, 0)) if initial is None else torch.cat([initial.to(x.dtype), x], dim=-1)
    wt = weight[:, None, :].to(xpad.dtype)          # as autocast would (conv1d wants one dtype)
    return F.silu(F.conv1d(xpad, wt, None if bias is None else bias.to(xpad.dtype), groups=x.shape[1]))


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       initial: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """See the module docstring."""
    _check(x, weight, bias, initial)
    if use_triton(x, backend):
        from kernels.triton_conv import CausalConvSiLU
        return CausalConvSiLU.apply(x, weight, bias, initial)
    return causal_conv1d_silu_torch(x, weight, bias, initial)


def conv_window(x: torch.Tensor, initial: torch.Tensor | None, width: int) -> torch.Tensor:
    """The last ``width`` conv inputs after x (batch, C, L): the window to carry into the next chunk, contiguous
    (a copy, so the carried state does not keep the whole chunk's storage alive)."""
    L = x.shape[-1]
    if L >= width:
        return x[:, :, L - width:].contiguous()
    head = initial.to(x.dtype) if initial is not None else x.new_zeros(x.shape[0], x.shape[1], width)
    return torch.cat([head, x], dim=-1)[:, :, -width:].contiguous()


__all__ = ["causal_conv1d_silu", "causal_conv1d_silu_torch", "conv_window", "CONV_BACKENDS"]
