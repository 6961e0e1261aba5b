"""Triton kernels of kernels.conv: the depthwise causal conv1d + SiLU of a mixer, forward and backward.

A program owns BC channels x BT time steps of one batch row; x is read along time (contiguous), each of the W taps
a shifted load of the same rows (cache hits after the first). The backward recomputes the pre-activation at the W
shifts each output's gradient needs (dx[t] = sum_k w[k] * dpre[t + W-1-k]), so it reads x and dy once from memory
and writes dx once; the weight and bias gradients are per-program partial sums added with atomics (fp32: their
rounding depends on the order the programs run in, so they vary in the last bits from run to run, unlike the
torch path's). Time tiles sit on grid axis 0 (axes 1 and 2 are capped at 65535).
The carried window's gradient (chunks trained through, rare) is left to the torch path's autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._host import cdiv
from kernels.triton_scan import _launch  # Triton's launcher costs tens of us of host time per call; see there

_BC, _BT, _WARPS = 8, 256, 4


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
def _tile(x_ptr, b_ptr, i_ptr, C, s_xb, s_xc, W: tl.constexpr, HAS_BIAS: tl.constexpr, BC: tl.constexpr,
          BT: tl.constexpr):
    """This program's tile: channels cc (mask cm), times tt, its rows of x and of the carried window, the rows'
    offset in the contiguous (batch, C, L) tensors, and the bias as a (BC, BT) fp32 tile."""
    pb = tl.program_id(1).to(tl.int64)
    cc = tl.program_id(2) * BC + tl.arange(0, BC)
    tt = tl.program_id(0) * BT + tl.arange(0, BT)
    cm = cc < C
    c64 = cc.to(tl.int64)[:, None]
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
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, i_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, C, L, s_xb, s_xc,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, BC: tl.constexpr,
                     BT: tl.constexpr):
    cc, cm, tt, x_row, i_row, row, bias = _tile(x_ptr, b_ptr, i_ptr, C, s_xb, s_xc, W, HAS_BIAS, BC, BT)
    g_row = row * L                                                    # dy, dx: contiguous (batch, C, L)
    dx = tl.zeros((BC, BT), dtype=tl.float32)
    for j in tl.static_range(W):            # the output times u = t + j that x[t] feeds, through tap k = W-1-j
        u = tt[None, :] + j
        pre = _pre(x_row, i_row, w_ptr, cc, cm, bias, u, L, W, HAS_INIT)
        s = 1.0 / (1.0 + tl.exp(-pre))
        dy = tl.load(dy_ptr + g_row + u, mask=cm[:, None] & (u < L), other=0.0).to(tl.float32)
        dpre = dy * s * (1.0 + pre * (1.0 - s))
        wk = tl.load(w_ptr + cc * W + (W - 1 - j), mask=cm, other=0.0).to(tl.float32)
        dx += wk[:, None] * dpre
        if j == 0:                          # this program's own output times: the weight and bias gradients
            for k in tl.static_range(W):
                xk = _x_at(x_row, i_row, u + (k - (W - 1)), L, cm[:, None], W, HAS_INIT)
                tl.atomic_add(dw_ptr + cc * W + k, tl.sum(dpre * xk, axis=1), mask=cm)
            if HAS_BIAS:
                tl.atomic_add(db_ptr + cc, tl.sum(dpre, axis=1), mask=cm)
    tl.store(dx_ptr + g_row + tt[None, :], dx.to(dx_ptr.dtype.element_ty), mask=cm[:, None] & (tt < L)[None, :])


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
        dx = torch.empty(b, C, L, device=xs.device, dtype=xs.dtype)
        dw = torch.zeros(C, W, device=xs.device, dtype=torch.float32)
        db = torch.zeros(C, device=xs.device, dtype=torch.float32) if bias is not None else dw
        if dx.numel():
            _launch(_conv_bwd_kernel, (cdiv(L, _BT), b, cdiv(C, _BC)),
                    (xs, w, bias if bias is not None else w, init if init is not None else xs, dy, dx, dw, db, C, L,
                     xs.stride(0), xs.stride(1)),
                    dict(W=W, HAS_BIAS=bias is not None, HAS_INIT=init is not None, BC=_BC, BT=_BT,
                         num_warps=_WARPS))
        return dx, dw.to(w.dtype), (db.to(bias.dtype) if bias is not None else None), None
