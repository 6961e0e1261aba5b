"""Triton kernels of kernels.slots. Both walk the tokens in order, a tile of (consecutive time steps x channels) per
program: the channel-first side is read or written along time (contiguous there), the slot side one row per token-slot
along the channels (contiguous there), so both sides are coalesced; Triton moves the tile between the two orders
through shared memory. The gather is written as a scatter to each token's slots (sorted_pos is a permutation: every
slot row is written once): walked in slot order instead, a tile's tokens would be scattered over time, and each
channel-first read would touch a different 32-byte sector (E times the bytes for E experts)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._host import cdiv
from kernels.triton_scan import _launch  # Triton's launcher costs tens of us of host time per call; see there

_BT, _BC, _WARPS = 64, 64, 4     # tokens x channels per program


@triton.jit
def _combine_cf_kernel(rows_ptr, pos_ptr, out_ptr, L, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    bi = tl.program_id(0).to(tl.int64)
    ll = tl.program_id(1) * BT + tl.arange(0, BT)
    cc = (tl.program_id(2) * BC + tl.arange(0, BC)).to(tl.int64)
    lm, cm = ll < L, cc < C
    tok = bi * L + ll
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(K):
        p = tl.load(pos_ptr + tok * K + j, mask=lm, other=0)
        acc += tl.load(rows_ptr + p[:, None] * C + cc[None, :], mask=lm[:, None] & cm[None, :], other=0.0)
    out = tl.trans(acc).to(out_ptr.dtype.element_ty)                  # (BC, BT)
    tl.store(out_ptr + (bi * C + cc[:, None]) * L + ll[None, :], out, mask=cm[:, None] & lm[None, :])


@triton.jit
def _gather_cf_kernel(x_ptr, pos_ptr, out_ptr, L, C, s_xb, s_xc, K: tl.constexpr, BT: tl.constexpr,
                      BC: tl.constexpr):
    bi = tl.program_id(0).to(tl.int64)
    ll = tl.program_id(1) * BT + tl.arange(0, BT)
    cc = (tl.program_id(2) * BC + tl.arange(0, BC)).to(tl.int64)
    lm, cm = ll < L, cc < C
    v = tl.load(x_ptr + bi * s_xb + cc[:, None] * s_xc + ll[None, :], mask=cm[:, None] & lm[None, :], other=0.0)
    v = tl.trans(v)                                                    # (BT, BC)
    tok = bi * L + ll
    for j in tl.static_range(K):
        p = tl.load(pos_ptr + tok * K + j, mask=lm, other=0)
        tl.store(out_ptr + p[:, None] * C + cc[None, :], v, mask=lm[:, None] & cm[None, :])


def combine_slots_cf_triton(rows: torch.Tensor, sorted_pos: torch.Tensor, k: int, batch: int, L: int
                            ) -> torch.Tensor:
    rows = rows.contiguous()
    C = rows.shape[1]
    out = torch.empty(batch, C, L, device=rows.device, dtype=rows.dtype)
    if out.numel():
        _launch(_combine_cf_kernel, (batch, cdiv(L, _BT), cdiv(C, _BC)), (rows, sorted_pos, out, L, C),
                dict(K=k, BT=_BT, BC=_BC, num_warps=_WARPS))
    return out


def gather_slots_cf_triton(x: torch.Tensor, sorted_pos: torch.Tensor, k: int) -> torch.Tensor:
    if x.stride(2) != 1:
        x = x.contiguous()
    b, C, L = x.shape
    out = torch.empty(b * L * k, C, device=x.device, dtype=x.dtype)
    if out.numel():
        _launch(_gather_cf_kernel, (b, cdiv(L, _BT), cdiv(C, _BC)), (x, sorted_pos, out, L, C, x.stride(0),
                x.stride(1)), dict(K=k, BT=_BT, BC=_BC, num_warps=_WARPS))
    return out
