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

_BT, _BC, _WARPS = 64, 64, 4     # tokens x channels per program; time tiles on grid axis 0 (the others cap at 65535)


@triton.jit
def _combine_cf_kernel(rows_ptr, pos_ptr, out_ptr, L, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    bi = tl.program_id(1).to(tl.int64)
    ll = tl.program_id(0) * BT + tl.arange(0, BT)
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
    bi = tl.program_id(1).to(tl.int64)
    ll = tl.program_id(0) * BT + tl.arange(0, BT)
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
    rows, sorted_pos = rows.contiguous(), sorted_pos.contiguous()
    C = rows.shape[1]
    out = torch.empty(batch, C, L, device=rows.device, dtype=rows.dtype)
    if out.numel():
        _launch(_combine_cf_kernel, (cdiv(L, _BT), batch, cdiv(C, _BC)), (rows, sorted_pos, out, L, C),
                dict(K=k, BT=_BT, BC=_BC, num_warps=_WARPS))
    return out


def gather_slots_cf_triton(x: torch.Tensor, sorted_pos: torch.Tensor, k: int) -> torch.Tensor:
    if x.stride(2) != 1:
        x = x.contiguous()
    sorted_pos = sorted_pos.contiguous()
    b, C, L = x.shape
    out = torch.empty(b * L * k, C, device=x.device, dtype=x.dtype)
    if out.numel():
        _launch(_gather_cf_kernel, (cdiv(L, _BT), b, cdiv(C, _BC)), (x, sorted_pos, out, L, C, x.stride(0),
                x.stride(1)), dict(K=k, BT=_BT, BC=_BC, num_warps=_WARPS))
    return out


@triton.jit
def _combine_w_kernel(rows_ptr, gate_ptr, pos_ptr, out_ptr, N, C, K: tl.constexpr, BT: tl.constexpr,
                      BC: tl.constexpr):
    tt = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    cc = tl.program_id(1) * BC + tl.arange(0, BC)
    tm = tt < N
    m = tm[:, None] & (cc < C)[None, :]
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(K):
        s = tl.load(pos_ptr + tt * K + j, mask=tm, other=0)
        g = tl.load(gate_ptr + s, mask=tm, other=0.0).to(tl.float32)
        acc += g[:, None] * tl.load(rows_ptr + s[:, None] * C + cc[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + tt[:, None] * C + cc[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _combine_w_bwd_kernel(rows_ptr, gate_ptr, pos_ptr, grad_ptr, drows_ptr, dgate_ptr, N, C, K: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr):
    # one program: BT tokens, every channel in chunks of BC (each slot's gate gradient is a dot over its whole row)
    tt = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    tm = tt < N
    for j in tl.static_range(K):
        s = tl.load(pos_ptr + tt * K + j, mask=tm, other=0)
        g = tl.load(gate_ptr + s, mask=tm, other=0.0).to(tl.float32)
        dot = tl.zeros((BT,), dtype=tl.float32)
        for c0 in range(0, C, BC):
            cc = c0 + tl.arange(0, BC)
            m = tm[:, None] & (cc < C)[None, :]
            gr = tl.load(grad_ptr + tt[:, None] * C + cc[None, :], mask=m, other=0.0).to(tl.float32)
            rv = tl.load(rows_ptr + s[:, None] * C + cc[None, :], mask=m, other=0.0).to(tl.float32)
            dot += tl.sum(gr * rv, axis=1)
            tl.store(drows_ptr + s[:, None] * C + cc[None, :], (g[:, None] * gr).to(drows_ptr.dtype.element_ty),
                     mask=m)
        tl.store(dgate_ptr + s, dot.to(dgate_ptr.dtype.element_ty), mask=tm)


def combine_slots_weighted_triton(rows: torch.Tensor, gate: torch.Tensor, sorted_pos: torch.Tensor, k: int
                                  ) -> torch.Tensor:
    rows, gate, sorted_pos = rows.contiguous(), gate.contiguous(), sorted_pos.contiguous()
    S, C = rows.shape
    out = torch.empty(S // k, C, device=rows.device, dtype=rows.dtype)
    if out.numel():
        _launch(_combine_w_kernel, (cdiv(S // k, _BT), cdiv(C, _BC)), (rows, gate, sorted_pos, out, S // k, C),
                dict(K=k, BT=_BT, BC=_BC, num_warps=_WARPS))
    return out


def combine_slots_weighted_backward_triton(rows: torch.Tensor, gate: torch.Tensor, sorted_pos: torch.Tensor, k: int,
                                           grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, gate, grad, sorted_pos = rows.contiguous(), gate.contiguous(), grad.contiguous(), sorted_pos.contiguous()
    S, C = rows.shape
    d_rows = torch.empty_like(rows)
    d_gate = torch.empty_like(gate)
    if rows.numel():
        _launch(_combine_w_bwd_kernel, (cdiv(S // k, _BT),), (rows, gate, sorted_pos, grad, d_rows, d_gate, S // k, C),
                dict(K=k, BT=_BT, BC=_BC, num_warps=_WARPS))
    return d_rows, d_gate
