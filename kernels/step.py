"""One recurrent step of the selective scan, for streaming: torch ops on any device (the exact path); CUDA tensors
go to the Triton step kernel (kernels.triton_step) when it takes them."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels._validate import check_tensor


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                           z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                           dt_softplus: bool = False, check_finite: bool = True) -> torch.Tensor:
    """Advance ``state`` (batch, d_inner, d_state) by one step IN PLACE and return y (batch, d_inner).

    x, dt, z: (batch, d_inner); A: (d_inner, d_state); B, C: (batch, d_state); D, dt_bias: (d_inner,).
    Math is that of one time step of ``selective_scan`` (state kept in its own dtype, fp32 normally).
    check_finite: the NaN / Inf checks of ``selective_scan`` (one device sync per tensor on a GPU).
    """
    check = functools.partial(check_tensor, allow_nan=not check_finite)
    check("state", state, None)
    if state.dim() != 3:
        raise ValueError(f"state: expected shape (batch, d_inner, d_state), got {tuple(state.shape)}")
    b, d, n = state.shape
    check("x", x, (b, d))
    check("dt", dt, (b, d))
    check("A", A, (d, n))
    check("B", B, (b, n))
    check("C", C, (b, n))
    check("D", D, (d,), optional=True)
    check("z", z, (b, d), optional=True)
    check("dt_bias", dt_bias, (d,), optional=True)
    if state.is_cuda:
        try:
            from kernels.triton_step import selective_state_update_triton, step_supported
        except Exception:  # triton missing: the torch path below is exact
            step_supported = None
        if step_supported is not None and step_supported(state, x):
            return selective_state_update_triton(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                                 dt_softplus=dt_softplus)
    cd = state.dtype if state.dtype in (torch.float32, torch.float64) else torch.float32
    delta = dt.to(cd)
    if dt_bias is not None:
        delta = delta + dt_bias.to(cd)
    if dt_softplus:
        delta = F.softplus(delta)
    xf = x.to(cd)
    dA = torch.exp(delta[:, :, None] * A.to(cd)[None])
    dBx = delta[:, :, None] * B.to(cd)[:, None, :] * xf[:, :, None]
    new_state = state.to(cd) * dA + dBx
    state.copy_(new_state.to(state.dtype))
    y = torch.einsum("bdn,bn->bd", new_state, C.to(cd))
    if D is not None:
        y = y + xf * D.to(cd)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype)
