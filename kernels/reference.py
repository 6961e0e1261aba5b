"""The oracle: a plain sequential selective scan, computed in fp32 (or fp64 for fp64 inputs).

Shapes (ROM_SPEC section 1): u, delta, z: (batch, d_inner, L); A: (d_inner, d_state);
B, C: (batch, d_state, L); D, delta_bias: (d_inner,); state: (batch, d_inner, d_state).
Differentiable through autograd. Slow by design: it is the thing every fast backend is checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the state is never kept in 16-bit."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def prepare_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """delta (+ bias) (-> softplus), in the compute dtype. Shape (batch, d_inner, L)."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def finish_output(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """y + D*u, gated by SiLU(z), cast back to the activation dtype."""
    dtype = y.dtype
    if D is not None:
        y = y + u.to(dtype) * D.to(dtype)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out_dtype)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             initial_state=None, return_final_state=False):
    """Sequential loop over time: state_t = exp(delta_t A) state_{t-1} + delta_t B_t u_t; y_t = <state_t, C_t>."""
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    b, d, L = u.shape
    n = A.shape[1]
    dl = prepare_delta(delta, delta_bias, delta_softplus, dtype)
    uf, Af, Bf, Cf = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    state = (initial_state.to(dtype) if initial_state is not None
             else torch.zeros(b, d, n, dtype=dtype, device=u.device))
    ys = []
    for t in range(L):
        dA = torch.exp(dl[:, :, t, None] * Af[None])                       # (b, d, n)
        dBu = dl[:, :, t, None] * Bf[:, None, :, t] * uf[:, :, t, None]   # (b, d, n)
        state = dA * state + dBu
        ys.append(torch.einsum("bdn,bn->bd", state, Cf[:, :, t]))
    y = finish_output(torch.stack(ys, dim=-1), u, D, z, u.dtype)
    return (y, state) if return_final_state else y
