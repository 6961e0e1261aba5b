"""Triton kernels of kernels.conv: the depthwise causal conv1d + SiLU of a mixer, forward and backward.

A program owns BC channels x BT time steps of one batch row; x is read along time (contiguous), each of the W taps
a shifted load of the same rows (cache hits after the first). The backward is two passes over such tiles, each
computing its own times only: the first recomputes the pre-activation, writes dpre = dy * silu'(pre) to an fp32
scratch (batch, C, L) and each tile's weight / bias gradient partial sums to a small (tiles, C * W [+ C]) buffer,
which one torch sum reduces (deterministic: the same bits run to run, no atomics); the second reads dpre at the W
shifts dx[t] = sum_j w[W-1-j] * dpre[t + j] and writes dx. Time tiles sit on grid axis 0 (axes 1 and 2 are capped
at 65535).
The carried window's gradient (chunks trained through, rare) is left to the torch path's autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._host import cdiv
from kernels.triton_scan import _launch  # Triton's launcher costs tens of us of host time per call; see there

_BC, _BT, _WARPS = 8, 256, 4
_BC_B, _BT_B = 4, 512     # the backward's tiles: wide along time, so few weight / bias gradient partials


@triton.jit
def _x_at(x_row, i_row, tau, L, cm, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """xpad at times tau (BC, BT) or (1, BT): x where 0 <= tau < L, the carried window where -(W-1) <= tau < 0."""
    v = tl.load(x_row + tau, mask=cm & (tau >= 0) & (tau < L), other=0.0).to(tl.float32)
    if HAS_INIT:
        v += tl.load(i_row + (tau + (W - 1)), mask=cm & (tau < 0) & (tau >= 1 - W), other=0.0).to(tl.float32)
    return v


@triton.jit
def _pre(x_row, i_row, w_ptr, cc, cm, bias, u, L, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """The pre-activation bias + sum_k w[k] * xpad[u + k] at times u (BC, BT)."""
    acc = bias
    for k in tl.static_range(W):
        wk = tl.load(w_ptr + cc * W + k, mask=cm, other=0.0).to(tl.float32)
        acc += wk[:, None] * _x_at(x_row, i_row, u + (k - (W - 1)), L, cm[:, None], W, HAS_INIT)
    return acc


@triton.jit
def _tile_index(C, BC: tl.constexpr, BT: tl.constexpr):
    """This program's channels cc (mask cm), times tt, batch row pb (int64) and channels as an int64 column c64."""
    pb = tl.program_id(1).to(tl.int64)
    cc = tl.program_id(2) * BC + tl.arange(0, BC)
    tt = tl.program_id(0) * BT + tl.arange(0, BT)
    return cc, cc < C, tt, pb, cc.to(tl.int64)[:, None]


@triton.jit
def _tile(x_ptr, b_ptr, i_ptr, C, s_xb, s_xc, W: tl.constexpr, HAS_BIAS: tl.constexpr, BC: tl.constexpr,
          BT: tl.constexpr):
    """This program's tile: channels cc (mask cm), times tt, its rows of x and of the carried window, the rows'
    offset in the contiguous (batch, C, L) tensors, and the bias as a (BC, BT) fp32 tile."""
    cc, cm, tt, pb, c64 = _tile_index(C, BC, BT)
    bias = tl.zeros((BC, BT), dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(b_ptr + cc, mask=cm, other=0.0).to(tl.float32)[:, None]
    return cc, cm, tt, x_ptr + pb * s_xb + c64 * s_xc, i_ptr + (pb * C + c64) * (W - 1), pb * C + c64, bias


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, i_ptr, y_ptr, C, L, s_xb, s_xc, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_INIT: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr):
    cc, cm, tt, x_row, i_row, row, bias = _tile(x_ptr, b_ptr, i_ptr, C, s_xb, s_xc, W, HAS_BIAS, BC, BT)
    pre = _pre(x_row, i_row, w_ptr, cc, cm, bias, tt[None, :], L, W, HAS_INIT)
    y = pre / (1.0 + tl.exp(-pre))
    tl.store(y_ptr + row * L + tt[None, :], y.to(y_ptr.dtype.element_ty), mask=cm[:, None] & (tt < L)[None, :])


@triton.jit
def _conv_dpre_kernel(x_ptr, w_ptr, b_ptr, i_ptr, dy_ptr, dp_ptr, part_ptr, C, L, s_xb, s_xc, P,
                      W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, BC: tl.constexpr,
                      BT: tl.constexpr):
    """Backward pass 1 over this tile's own times: dpre = dy * silu'(pre) into dp (contiguous (batch, C, L)), and the
    tile's weight / bias gradient partials, sum over its times of dpre * xpad[t + k - (W-1)] (k < W) and of dpre,
    into row (batch row * time tiles + time tile) of part (tiles, P): weight at c * W + k, bias at C * W + c."""
    cc, cm, tt, x_row, i_row, row, bias = _tile(x_ptr, b_ptr, i_ptr, C, s_xb, s_xc, W, HAS_BIAS, BC, BT)
    t = tt[None, :]
    m = cm[:, None] & (t < L)
    pre = _pre(x_row, i_row, w_ptr, cc, cm, bias, t, L, W, HAS_INIT)
    s = 1.0 / (1.0 + tl.exp(-pre))
    dy = tl.load(dy_ptr + row * L + t, mask=m, other=0.0).to(tl.float32)
    dpre = dy * s * (1.0 + pre * (1.0 - s))                            # 0 outside the tile's valid times (dy = 0)
    tl.store(dp_ptr + row * L + t, dpre.to(dp_ptr.dtype.element_ty), mask=m)
    part = part_ptr + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * P
    for k in tl.static_range(W):            # the taps' x again: the loads of _pre, now cache hits
        xk = _x_at(x_row, i_row, t + (k - (W - 1)), L, cm[:, None], W, HAS_INIT)
        tl.store(part + cc * W + k, tl.sum(dpre * xk, axis=1), mask=cm)
    if HAS_BIAS:
        tl.store(part + C * W + cc, tl.sum(dpre, axis=1), mask=cm)


@triton.jit
def _conv_dx_kernel(dp_ptr, w_ptr, dx_ptr, C, L, W: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr):
    """Backward pass 2: dx[t] = sum_j w[W-1-j] * dpre[t + j] (dpre = 0 from L on); dp, dx contiguous (batch, C, L)."""
    cc, cm, tt, pb, c64 = _tile_index(C, BC, BT)
    row = pb * C + c64
    t = tt[None, :]
    dx = tl.zeros((BC, BT), dtype=tl.float32)
    for j in tl.static_range(W):            # x[t] feeds the output at t + j through tap W-1-j
        wk = tl.load(w_ptr + cc * W + (W - 1 - j), mask=cm, other=0.0).to(tl.float32)
        dx += wk[:, None] * tl.load(dp_ptr + row * L + (t + j), mask=cm[:, None] & (t + j < L), other=0.0)
    tl.store(dx_ptr + row * L + t, dx.to(dx_ptr.dtype.element_ty), mask=cm[:, None] & (t < L))


class CausalConvSiLU(torch.autograd.Function):
    """kernels.conv.causal_conv1d_silu on the Triton kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial):
        xs = x if x.stride(-1) == 1 else x.contiguous()
        w = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        init = initial.contiguous() if initial is not None else None
        b, C, L = xs.shape
        y = torch.empty(b, C, L, device=x.device, dtype=x.dtype)
        if y.numel():
            _launch(_conv_fwd_kernel, (cdiv(L, _BT), b, cdiv(C, _BC)),
                    (xs, w, bias if bias is not None else w, init if init is not None else xs, y, C, L,
                     xs.stride(0), xs.stride(1)),
                    dict(W=w.shape[1], HAS_BIAS=bias is not None, HAS_INIT=init is not None, BC=_BC, BT=_BT,
                         num_warps=_WARPS))
        ctx.save_for_backward(xs, w, bias, init)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        xs, w, bias, init = ctx.saved_tensors
        if ctx.needs_input_grad[3]:         # the carried window's gradient: the torch path's autograd
            from kernels.conv import causal_conv1d_silu_torch
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(need) if t is not None else None
                          for t, need in zip((xs, w, bias, init), ctx.needs_input_grad)]
                y = causal_conv1d_silu_torch(*leaves)
                wanted = [t for t in leaves if t is not None and t.requires_grad]
                got = iter(torch.autograd.grad(y, wanted, dy))
            return tuple(next(got) if t is not None and t.requires_grad else None for t in leaves)
        dy = dy.contiguous()
        b, C, L = xs.shape
        W = w.shape[1]
        nt = cdiv(L, _BT_B)
        dx = torch.empty(b, C, L, device=xs.device, dtype=xs.dtype)
        dpre = torch.empty(b, C, L, device=xs.device, dtype=torch.float32)  # in bf16 it would double dx's error
        part = torch.empty(b * nt, C * (W + (bias is not None)), device=xs.device, dtype=torch.float32)
        if dx.numel():
            grid = (nt, b, cdiv(C, _BC_B))
            _launch(_conv_dpre_kernel, grid,
                    (xs, w, bias if bias is not None else w, init if init is not None else xs, dy, dpre, part, C, L,
                     xs.stride(0), xs.stride(1), part.shape[1]),
                    dict(W=W, HAS_BIAS=bias is not None, HAS_INIT=init is not None, BC=_BC_B, BT=_BT_B,
                         num_warps=_WARPS))
            _launch(_conv_dx_kernel, grid, (dpre, w, dx, C, L), dict(W=W, BC=_BC_B, BT=_BT_B, num_warps=_WARPS))
        sums = part.sum(0)                  # one deterministic reduction over the tiles (zeros when there are none)
        db = sums[C * W:].to(bias.dtype) if bias is not None else None
        return dx, sums[:C * W].view(C, W).to(w.dtype), db, None
