"""A RoM layer's token-slots moved between the grouped matmul's rows and the scan's channel-first layout.

A routed projection works on token-slots sorted by expert (row p = the p-th slot in expert order, K slots per
token); the selective scan works channel-first, (batch, channels, L) with time contiguous. Two adjoint gathers
cross between the two in one pass each, where index_select on token-major rows plus a transposing copy take two:

    combine_slots_cf(rows (N*K, C), sorted_pos (N*K,), k, batch, L) -> (batch, C, L), contiguous
        out[b, c, l] = sum over j < k of rows[sorted_pos[(b*L + l)*k + j], c]
    gather_slots_cf(x (batch, C, L), token_of_slot (N*K,), sorted_pos (N*K,), k) -> (N*K, C), contiguous
        out[p, c] = x[t // L, c, t % L] with t = token_of_slot[p]  (the kernel: out[sorted_pos[t*k + j]] = x[t])

and, token-major on both sides, the routed out-projection's gated sum over a token's K slots with its gradient:

    combine_slots_weighted(rows (N*K, C), gate (N*K,), sorted_pos, k) -> (N, C)
        out[t, c] = sum over j < k of gate[s] * rows[s, c] with s = sorted_pos[t*k + j]
    combine_slots_weighted_backward(rows, gate, token_of_slot, sorted_pos, k, grad (N, C))
        -> (d rows (N*K, C) = gate[s] * grad[t], d gate (N*K,) = <rows[s], grad[t]>) with t = token_of_slot[s]

(N = batch * L tokens; sorted_pos is the inverse of the slot order, token_of_slot the token of each sorted slot.)
CUDA tensors run the Triton kernels of kernels.triton_slots (CPU tensors too with backend="triton" under
TRITON_INTERPRET=1, which is how the tests run them); anything else runs torch ops. The moves give the same values
on both paths for K = 1; sums (K > 1) and the gate products are computed in fp32 by the kernels and in the rows'
dtype by torch (bf16 rows: differences of bf16 rounding).
"""

from __future__ import annotations

import torch

from kernels._host import OP_BACKENDS, use_triton

SLOT_BACKENDS = OP_BACKENDS


def _check_index(name: str, idx: torch.Tensor, n: int, device: torch.device) -> None:
    if idx.dim() != 1 or idx.numel() != n or idx.dtype != torch.int64 or idx.device != device:
        raise ValueError(f"{name}: expected an int64 vector of {n} slots on {device}, got {idx.dtype} "
                         f"{tuple(idx.shape)} on {idx.device}")


def combine_slots_cf(rows: torch.Tensor, sorted_pos: torch.Tensor, k: int, batch: int, L: int,
                     backend: str | None = None) -> torch.Tensor:
    """Sorted slot rows (batch*L*k, C) -> per-token sums over the k slots, channel-first (batch, C, L)."""
    if rows.dim() != 2 or rows.shape[0] != batch * L * k:
        raise ValueError(f"rows: expected shape ({batch * L * k}, C) for batch {batch} x L {L} x k {k}, "
                         f"got {tuple(rows.shape)}")
    _check_index("sorted_pos", sorted_pos, rows.shape[0], rows.device)
    if use_triton(rows, backend) and L > 1:    # L = 1 (a streaming step): both layouts are one; index_select it is
        from kernels.triton_slots import combine_slots_cf_triton
        return combine_slots_cf_triton(rows, sorted_pos, k, batch, L)
    out = rows.index_select(0, sorted_pos)
    if k > 1:
        out = out.view(batch * L, k, -1).sum(1)
    return out.view(batch, L, -1).transpose(1, 2).contiguous()


def gather_slots_cf(x: torch.Tensor, token_of_slot: torch.Tensor, sorted_pos: torch.Tensor, k: int,
                    backend: str | None = None) -> torch.Tensor:
    """Channel-first x (batch, C, L) -> the row of each slot's token, in slot order (batch*L*k, C)."""
    if x.dim() != 3:
        raise ValueError(f"x: expected shape (batch, C, L), got {tuple(x.shape)}")
    b, c, L = x.shape
    _check_index("token_of_slot", token_of_slot, b * L * k, x.device)
    _check_index("sorted_pos", sorted_pos, b * L * k, x.device)
    if use_triton(x, backend) and L > 1:
        from kernels.triton_slots import gather_slots_cf_triton
        return gather_slots_cf_triton(x, sorted_pos, k)
    return x.transpose(1, 2).reshape(b * L, c).index_select(0, token_of_slot)


def _check_weighted(rows: torch.Tensor, gate: torch.Tensor, sorted_pos: torch.Tensor, k: int) -> None:
    if rows.dim() != 2 or rows.shape[0] % k:
        raise ValueError(f"rows: expected shape (N*{k}, C), got {tuple(rows.shape)}")
    if gate.shape != (rows.shape[0],) or gate.device != rows.device:
        raise ValueError(f"gate: expected shape ({rows.shape[0]},) on {rows.device}, got {tuple(gate.shape)} on "
                         f"{gate.device}")
    _check_index("sorted_pos", sorted_pos, rows.shape[0], rows.device)


def combine_slots_weighted(rows: torch.Tensor, gate: torch.Tensor, sorted_pos: torch.Tensor, k: int,
                           backend: str | None = None) -> torch.Tensor:
    """Sorted slot rows (N*k, C) and their gates (N*k,) -> per-token gated sums (N, C), token-major, rows' dtype."""
    _check_weighted(rows, gate, sorted_pos, k)
    if use_triton(rows, backend):
        from kernels.triton_slots import combine_slots_weighted_triton
        return combine_slots_weighted_triton(rows, gate, sorted_pos, k)
    out = (rows * gate[:, None].to(rows.dtype)).index_select(0, sorted_pos)
    return out if k == 1 else out.view(-1, k, rows.shape[1]).sum(1)


def combine_slots_weighted_backward(rows: torch.Tensor, gate: torch.Tensor, token_of_slot: torch.Tensor,
                                    sorted_pos: torch.Tensor, k: int, grad: torch.Tensor,
                                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``combine_slots_weighted`` w.r.t. rows (rows' dtype) and gate (gate's dtype)."""
    _check_weighted(rows, gate, sorted_pos, k)
    _check_index("token_of_slot", token_of_slot, rows.shape[0], rows.device)
    if grad.shape != (rows.shape[0] // k, rows.shape[1]):
        raise ValueError(f"grad: expected shape {(rows.shape[0] // k, rows.shape[1])}, got {tuple(grad.shape)}")
    if use_triton(rows, backend):
        from kernels.triton_slots import combine_slots_weighted_backward_triton
        return combine_slots_weighted_backward_triton(rows, gate, sorted_pos, k, grad)
    g = grad.index_select(0, token_of_slot)                                  # each slot's token's gradient
    d_gate = (g.float() * rows.float()).sum(-1).to(gate.dtype)
    return (g * gate[:, None].to(g.dtype)).to(rows.dtype), d_gate


__all__ = ["combine_slots_cf", "gather_slots_cf", "combine_slots_weighted", "combine_slots_weighted_backward",
           "SLOT_BACKENDS"]
