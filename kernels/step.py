"""One recurrent step of the selective scan, for streaming: torch ops on any device (the exact path); CUDA tensors
go to the Triton step kernel (kernels.triton_step) when it takes them."""

from __future__ import annotations

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
    ok = not check_finite
    check_tensor("state", state, None, allow_nan=ok)
    if state.dim() != 3:
        raise ValueError(f"state: expected shape (batch, d_inner, d_state), got {tuple(state.shape)}")
    b, d, n = state.shape
    check_tensor("x", x, (b, d), allow_nan=ok)
    check_tensor("dt", dt, (b, d), allow_nan=ok)
    check_tensor("A", A, (d, n), allow_nan=ok)
    check_tensor("B", B, (b, n), allow_nan=ok)
    check_tensor("C", C, (b, n), allow_nan=ok)
    check_tensor("D", D, (d,), optional=True, allow_nan=ok)
    check_tensor("z", z, (b, d), optional=True, allow_nan=ok)
    check_tensor("dt_bias", dt_bias, (d,), optional=True, allow_nan=ok)
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
