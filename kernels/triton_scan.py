"""Selective scan (Mamba-1) in Triton: forward and backward, chunked over L, exact streaming.

Shapes (ROM_SPEC section 1): u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
D, delta_bias: (d_inner,); initial_state / final_state: (batch, d_inner, d_state), fp32.
Activations may be fp32, bf16 or fp16; the state and all arithmetic are fp32. fp64 inputs are computed in fp32.

Design (why it is shaped like this; measurements, and what did not pan out: docs/notes/triton_scan_notes.md):
- Forward, two kernels; _pick_config chooses by shape (measured on an H200, both in one call):
  - _fwd_kernel, one lane per channel: a program owns BLOCK_D channels x all d_state states of one batch row and
    walks time in tiles of T steps. A tile of u / delta / z (channels x T, contiguous in time) is loaded once,
    split in registers into T per-step vectors, and the recurrence is unrolled over the T steps: per state and
    step one exp2 and ~4 fp32 ops, no shuffles (<h, C> is an in-thread sum). The loads stay inside the loop
    (STAGES >= 2) and Triton's software pipeliner turns them into asynchronous copies to shared memory issued
    STAGES - 1 tiles ahead; each thread then reads B, C of the tile from shared memory as a broadcast. (STAGES = 0:
    the older register prefetch one tile ahead, which needs ~45 more registers and spills at T = 8.)
  - _fwd_split_kernel, d_state split over G = 4 lanes (lane g holds states g*NS..): 4x the threads at the same
    exp2 count, for shapes where one lane per channel leaves the GPU short of warps but a split fills it in one
    pass (8 x d_inner 1536: the first kernel needs segments there, i.e. a second pass of exponentials); since the
    first kernel's loads are pipelined it is used only for short sequences there (L <= 4096).
    Per-element work (loads, softplus, gating, stores) is not repeated on the G lanes: in each T-step tile lane g
    owns steps g*TL..g*TL+TL-1; the lanes exchange delta and delta*u (every step to every lane) and the partial
    <h, C> sums (back to each step's owner, a butterfly reduce-scatter) by warp shuffles. Plain Triton has no
    shuffle, so these are inline PTX; Triton picks the layouts, so each compiled kernel's TTGIR is checked once
    (_shfl_layout_ok) and a kernel whose layout differs from the one assumed is rerun without shuffles (tensor
    reductions: right for any layout, slower). Under TRITON_INTERPRET (no inline assembly) the reduction path
    runs; the tests cover it, the GPU benchmark checks the shuffle path against an fp64 oracle. B, C are copied to
    fp32 (batch, L, d_state) rows, so a lane's states of one step are one 16-byte load. The reciprocals of
    softplus and sigmoid run on the FMA units (FMA_RCP: minimax start + two Newton steps, 1e-7) to spare the
    special-function unit, which the exponentials keep busy.
- exp(delta * A) = exp2(delta * (A * log2 e)): log2 e is folded into A once. The first N_POLY states of every
  lane compute exp2 with an FMA polynomial instead of the special-function unit, so both units work (at
  d_state = 16 the exponentials bind; ROM_SPEC 5).
- Long sequences and small batch x d_inner are split into segments that run in parallel: pass 1 scans every
  segment from a zero state (and sums delta), a tiny kernel chains the segment end states
  (h_start[s+1] = exp(A * sum delta_s) h_start[s] + h_local[s]), pass 2 rescans each segment from its true
  start state and writes y. With one segment pass 1 is skipped.
- Backward keeps only states at chunk boundaries (every CK steps, written by the forward pass) and recomputes
  inside each chunk: phase A walks the chunk forward and parks the state at every tile start in a small
  per-program scratch buffer (L2-resident), phase B walks the tiles backwards, recomputes the T steps of the
  tile, and runs the reverse recurrence for g = dL/dh (carried as p = a * g between steps). One channel per lane.
  Segments run in parallel here too: a reverse pass 1 computes each segment's carry from a zero incoming carry
  and the same chaining kernel combines them. The per-element inputs (u, delta, z, dout) are read 16 bytes per
  lane at a time (a group of 8 bf16 / 4 fp32 steps; 16-bit data kept as 32-bit words of two steps) and du /
  ddelta / dz collected and written likewise: one channel row per lane makes every access touch its own memory
  sector, and per-tile 4-byte accesses wasted most of each sector (1.27-1.41x the backward on an H200).
- dB / dC (sums over channels) are reduced over each warp's 32 channels by a shuffle reduce-scatter (each lane
  ends with 1-2 of the 2 T d_state sums; Triton's tl.sum all-reduce left every lane all of them, at 5x the
  shuffles), then added across warps with fp32 atomics (summation order, hence the last bits, can vary run to
  run). dA, dD, d(delta_bias) are accumulated in registers and written per (batch, segment).
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

from kernels._host import cdiv, next_pow2

LOG2E = tl.constexpr(1.4426950408889634)

# 2^f on f in [-0.5, 0.5] as 1 + f*(P1 + f*(P2 + ...)): near-minimax relative error 9e-8 (1.8e-7 after fp32
# Horner rounding), and exactly 1 at f = 0 so padded steps (delta = 0) keep the state unchanged.
# Coefficients from _fit_exp2_poly() below.
_P5 = tl.constexpr(1.3264698770e-03)
_P4 = tl.constexpr(9.6715088174e-03)
_P3 = tl.constexpr(5.5507337765e-02)
_P2 = tl.constexpr(2.4022242145e-01)
_P1 = tl.constexpr(6.9314697761e-01)


# ----------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _split_last(x, K: tl.constexpr):
    """(..., K) -> tuple of K tensors (...), in order. Free when the last axis lies in registers."""
    if K == 1:
        return (tl.reshape(x, x.shape[:-1]),)
    elif K == 2:
        a, b = tl.split(x)
        return (a, b)
    else:
        ev, od = tl.split(tl.reshape(x, x.shape[:-1] + (K // 2, 2)))
        es = _split_last(ev, K // 2)
        os_ = _split_last(od, K // 2)
        res = ()
        for i in tl.static_range(K // 2):
            res = res + (es[i], os_[i])
        return res


@triton.jit
def _join_last(xs, K: tl.constexpr):
    """Inverse of _split_last: tuple of K tensors (...) -> (..., K)."""
    if K == 1:
        return tl.reshape(xs[0], xs[0].shape + (1,))
    elif K == 2:
        return tl.join(xs[0], xs[1])
    else:
        ev = ()
        od = ()
        for i in tl.static_range(K // 2):
            ev = ev + (xs[2 * i],)
            od = od + (xs[2 * i + 1],)
        e = _join_last(ev, K // 2)
        o = _join_last(od, K // 2)
        return tl.reshape(tl.join(e, o), e.shape[:-1] + (K,))


@triton.jit
def _exp2_poly(x):
    """2^x for x <= 0 on the FMA units: 2^n * p(f), n = round(x), |f| <= 1/2 (x clamped at -126)."""
    x = tl.maximum(x, -126.0)
    j = x + 12582912.0                      # 1.5 * 2^23: the rounded integer lands in the low mantissa bits
    n = j - 12582912.0
    f = x - n
    p = _P5 * f + _P4
    p = p * f + _P3
    p = p * f + _P2
    p = p * f + _P1
    p = p * f + 1.0
    bits = p.to(tl.int32, bitcast=True) + (j.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1], relative error ~3e-7 also for tiny e: 2 atanh(s), s = e / (2 + e) <= 1/3,
    as an odd series to s^15 (truncation < 2e-9). One reciprocal, no log (tl.log lowers to a long software
    routine; this is ~12 instructions)."""
    return _atanh2_series(tl.fdiv(e, 2.0 + e, ieee_rounding=False))


@triton.jit
def _atanh2_series(s):
    """2 atanh(s) for 0 <= s <= 1/3 (= log1p(e) at s = e / (2 + e))."""
    s2 = s * s
    q = s2 * 0.13333333333333333 + 0.15384615384615385
    q = q * s2 + 0.18181818181818182
    q = q * s2 + 0.2222222222222222
    q = q * s2 + 0.2857142857142857
    q = q * s2 + 0.4
    q = q * s2 + 0.6666666666666666
    q = q * s2 + 2.0
    return s * q


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)); x > 20 returns x (torch's threshold)."""
    sp = tl.maximum(x, 0.0) + _log1p_unit(tl.exp2(tl.abs(x) * -LOG2E))
    return tl.where(x > 20.0, x, sp)


@triton.jit
def _sigmoid(x):
    return tl.fdiv(1.0, 1.0 + tl.exp2(x * -LOG2E), ieee_rounding=False)


@triton.jit
def _rcp_newton(x, r):
    """1 / x refined from the estimate r by two Newton steps (relative error e -> e^4), FMAs only."""
    t = 1.0 - x * r
    r = r + r * t
    t = 1.0 - x * r
    return r + r * t


@triton.jit
def _softplus_fma(x):
    """_softplus with the reciprocal on the FMA units instead of the special-function unit (which the scan's
    exponentials keep busy): 1 / (2 + e), 2 + e in [2, 3], from a linear minimax start (error 2.0e-2) and two
    Newton steps (1.7e-7)."""
    e = tl.exp2(tl.abs(x) * -LOG2E)
    xe = 2.0 + e
    r = _rcp_newton(xe, 0.8163139263277465 - 0.16326275804032295 * xe)
    sp = tl.maximum(x, 0.0) + _atanh2_series(e * r)
    return tl.where(x > 20.0, x, sp)


@triton.jit
def _sigmoid_fma(x):
    """sigmoid(x) with one special-function op: e = exp(-|x|), r = 1 / (1 + e) (1 + e in [1, 2]: quadratic
    minimax start, error 1.0e-2, two Newton steps, 1e-8); sigmoid = r for x >= 0, e r otherwise."""
    e = tl.exp2(tl.abs(x) * -LOG2E)
    xe = 1.0 + e
    r = _rcp_newton(xe, (0.3232236682949876 * xe - 1.4545071040812798) * xe + 2.1211741338001477)
    return tl.where(x >= 0.0, r, e * r)


@triton.jit
def _scalars(x, K: tl.constexpr):
    """(K,) -> tuple of K scalars (every thread gets all of them: a broadcast through registers)."""
    if K == 1:
        return (tl.sum(x, axis=0),)
    else:
        ev, od = tl.split(tl.reshape(x, (K // 2, 2)))
        es = _scalars(ev, K // 2)
        os_ = _scalars(od, K // 2)
        res = ()
        for i in tl.static_range(K // 2):
            res = res + (es[i], os_[i])
        return res


@triton.jit
def _load_pe(u_row, dt_row, z_row, o_row, t0, L, d_ok, offs_t, W_U: tl.constexpr, W_Z: tl.constexpr,
             W_O: tl.constexpr):
    """Raw (storage dtype) per-element inputs (u, delta, z, dout) of steps t0 + offs_t as (D, len(offs_t)); steps
    outside [0, L) read as 0; inputs not asked for (W_* false) are placeholders. With t0 a multiple of the width,
    each lane reads its channel's steps as one vector (16 bytes at 8 bf16 steps)."""
    t = t0 + offs_t
    m2 = d_ok[:, None] & ((t >= 0) & (t < L))[None, :]
    dt = tl.load(dt_row + t[None, :], mask=m2, other=0.0)
    u = dt
    z = dt
    o = dt
    if W_U:
        u = tl.load(u_row + t[None, :], mask=m2, other=0.0)
    if W_Z:
        z = tl.load(z_row + t[None, :], mask=m2, other=0.0)
    if W_O:
        o = tl.load(o_row + t[None, :], mask=m2, other=0.0)
    return u, dt, z, o


@triton.jit
def _load_bc(B_b, C_b, t0, L, s_Bt, s_Ct, N: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, W_B: tl.constexpr,
             W_C: tl.constexpr):
    """B, C of steps t0..t0+T-1 as (T*NP,) fp32 vectors, index i*NP + n (memory (t, n), n contiguous); zero outside
    [0, L) and for padded states; a placeholder (zeros) when not asked for."""
    idx = tl.arange(0, T * NP)
    ti = t0 + idx // NP
    n = idx % NP
    mv = (n < N) & (ti >= 0) & (ti < L)
    Bv = tl.zeros((T * NP,), dtype=tl.float32)
    Cv = tl.zeros((T * NP,), dtype=tl.float32)
    if W_B:
        Bv = tl.load(B_b + ti * s_Bt + n, mask=mv, other=0.0).to(tl.float32)
    if W_C:
        Cv = tl.load(C_b + ti * s_Ct + n, mask=mv, other=0.0).to(tl.float32)
    return Bv, Cv


@triton.jit
def _load_tile(u_row, dt_row, z_row, o_row, B_b, C_b, t0, L, s_Bt, s_Ct, d_ok, offs_t,
               N: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, W_U: tl.constexpr, W_Z: tl.constexpr,
               W_O: tl.constexpr, W_B: tl.constexpr, W_C: tl.constexpr):
    """Raw inputs of the tile of steps t0..t0+T-1: (u, delta, z, dout) as (D, T) (_load_pe) and B, C as (T*NP,)
    vectors (_load_bc). Issued one tile ahead of their use, so memory latency overlaps compute."""
    u, dt, z, o = _load_pe(u_row, dt_row, z_row, o_row, t0, L, d_ok, offs_t, W_U, W_Z, W_O)
    Bv, Cv = _load_bc(B_b, C_b, t0, L, s_Bt, s_Ct, N, NP, T, W_B, W_C)
    return u, dt, z, o, Bv, Cv


@triton.jit
def _unit_ptr(ptr, PACK: tl.constexpr):
    """The base pointer in load units: PACK, 32-bit words (two 16-bit elements); else elements."""
    if PACK:
        return ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    else:
        return ptr


@triton.jit
def _unpack(x, dt: tl.constexpr, PACK: tl.constexpr):
    """(D, K) units -> (D, K * EP) elements of dtype dt (PACK: the low half of a word is the earlier step)."""
    if PACK:
        lo = (x & 0xFFFF).to(tl.int16).to(dt, bitcast=True)
        hi = (x >> 16).to(tl.int16).to(dt, bitcast=True)
        return tl.reshape(tl.join(lo, hi), (x.shape[0], 2 * x.shape[1]))
    else:
        return x


@triton.jit
def _pack(x, PACK: tl.constexpr):
    """Inverse of _unpack: (D, 2K) 16-bit elements -> (D, K) int32 words (PACK); else x."""
    if PACK:
        lo, hi = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
        lo = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi = hi.to(tl.int16, bitcast=True).to(tl.int32) << 16
        return lo | hi
    else:
        return x


@triton.jit
def _zeros_units(BLOCK_D: tl.constexpr, K: tl.constexpr, dt: tl.constexpr, PACK: tl.constexpr):
    """Tuple of K zero (BLOCK_D,) units (PACK: int32 words, else elements of dtype dt)."""
    z = ()
    for _k in tl.static_range(K):
        if PACK:
            z = z + (tl.zeros((BLOCK_D,), dtype=tl.int32),)
        else:
            z = z + (tl.zeros((BLOCK_D,), dtype=dt),)
    return z


@triton.jit
def _take(xs, j: tl.constexpr, T: tl.constexpr):
    """Units j*T..j*T+T-1 (j known at compile time) of a group split by _split_last, as one (D, T) tensor."""
    s = ()
    for i in tl.static_range(T):
        s = s + (xs[j * T + i],)
    return _join_last(s, T)


@triton.jit
def _exp2_sel(x, n: tl.constexpr, N_POLY: tl.constexpr):
    if n < N_POLY:
        return _exp2_poly(x)
    else:
        return tl.exp2(x)


@triton.jit
def _load_state(ptr, base, d_inner, offs_d, d_ok, N: tl.constexpr):
    """State buffer laid out (..., N, d_inner) at row base (an int64 row index) -> tuple of N (BLOCK_D,) fp32."""
    h = ()
    for n in tl.static_range(N):
        h = h + (tl.load(ptr + (base + n) * d_inner + offs_d, mask=d_ok, other=0.0).to(tl.float32),)
    return h


@triton.jit
def _store_state(ptr, base, d_inner, offs_d, d_ok, h, N: tl.constexpr):
    for n in tl.static_range(N):
        tl.store(ptr + (base + n) * d_inner + offs_d, h[n], mask=d_ok)


@triton.jit
def _zeros_state(BLOCK_D: tl.constexpr, N: tl.constexpr):
    h = ()
    for _n in tl.static_range(N):
        h = h + (tl.zeros((BLOCK_D,), dtype=tl.float32),)
    return h


@triton.jit
def _chain_step(h, A2, loc_ptr, dsum_ptr, seg_row, d_inner, offs_d, d_ok, N: tl.constexpr):
    """One link of the segment chain, as _chain_kernel computes it: h <- exp2(A2 * sum(delta)) * h + loc for the
    segment at seg_row = batch * n_seg + s (loc: (batch, n_seg, N, d_inner); dsum: (batch, n_seg, d_inner))."""
    ds = tl.load(dsum_ptr + seg_row * d_inner + offs_d, mask=d_ok, other=0.0)
    out = ()
    for n in tl.static_range(N):
        loc = tl.load(loc_ptr + (seg_row * N + n) * d_inner + offs_d, mask=d_ok, other=0.0)
        out = out + (tl.exp2(A2[n] * ds) * h[n] + loc,)
    return out


@triton.jit
def _delta(dt_raw, m2, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta tile (D, T) in fp32 from its raw load: (+ bias) (-> softplus), zero on padded steps (decay 1, no
    input). Also returns the pre-softplus value (for the softplus gradient)."""
    raw = dt_raw.to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    if SOFTPLUS:
        dl = _softplus(raw)
    else:
        dl = raw
    return tl.where(m2, dl, 0.0), raw


@triton.jit
def _tile_steps(h, A2, dls, dus, Bs, N: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, N_POLY: tl.constexpr):
    """Advance the state (tuple of N (D,)) through T steps without output."""
    for i in tl.static_range(T):
        hn = ()
        for n in tl.static_range(N):
            a = _exp2_sel(dls[i] * A2[n], n, N_POLY)
            hn = hn + (a * h[n] + dus[i] * Bs[i * NP + n],)
        h = hn
    return h


@triton.jit
def _fwd_tile(cur, h, dsum, t0, L, A2, bias, Dv, y_row, ck_ptr, b64, n_ck, d_inner, offs_d, d_ok, offs_t, y_ty,
              N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, CK: tl.constexpr,
              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              LOCAL: tl.constexpr, N_POLY: tl.constexpr):
    """_fwd_kernel's work on one tile of T steps from its raw inputs `cur` (see _load_tile): checkpoint, state
    update, y (or, LOCAL, the delta sum). Returns the new state and delta sum."""
    if CK > 0:
        if t0 % CK == 0:
            _store_state(ck_ptr, (b64 * n_ck + t0 // CK) * N, d_inner, offs_d, d_ok, h, N)
    t = t0 + offs_t
    m2 = d_ok[:, None] & (t < L)[None, :]                     # (D, T)
    dl, raw = _delta(cur[1], m2, bias, HAS_BIAS, SOFTPLUS)
    u = cur[0].to(tl.float32)
    dls = _split_last(dl, T)
    dus = _split_last(dl * u, T)
    Bs = _scalars(cur[4], T * NP)
    if LOCAL:
        dsum += tl.sum(dl, axis=1)
        h = _tile_steps(h, A2, dls, dus, Bs, N, NP, T, N_POLY)
    else:
        Cs = _scalars(cur[5], T * NP)
        ys = ()
        for i in tl.static_range(T):
            hn = ()
            y = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for n in tl.static_range(N):
                a = _exp2_sel(dls[i] * A2[n], n, N_POLY)
                hh = a * h[n] + dus[i] * Bs[i * NP + n]
                y += hh * Cs[i * NP + n]
                hn = hn + (hh,)
            h = hn
            ys = ys + (y,)
        y = _join_last(ys, T)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zt = cur[2].to(tl.float32)
            y = y * (zt * _sigmoid(zt))
        tl.store(y_row + t[None, :], y.to(y_ty), mask=m2)
    return h, dsum


# ---------------------------------------------------------------------------------- forward: one lane per channel
@triton.jit(do_not_specialize=["n_seg", "n_ck"])
def _fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, bias_ptr,
    h0_ptr, y_ptr, hout_ptr, dsum_ptr, ck_ptr, loc_ptr,
    L, d_inner, seg_len, n_seg, n_ck,
    s_ub, s_ud, s_tb, s_td, s_Bb, s_Bt, s_Cb, s_Ct, s_zb, s_zd, s_yb, s_yd,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, CK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, LOCAL: tl.constexpr, N_POLY: tl.constexpr, STAGES: tl.constexpr = 0,
    CHAIN_IN: tl.constexpr = False,
):
    """One (channel block, batch row, segment). LOCAL: zero start, write end state + sum(delta), no y.

    State buffers are (batch, n_seg, N, d_inner) fp32 (h0: start states in, hout: end states out);
    dsum: (batch, n_seg, d_inner); ck: (batch, n_ck, N, d_inner), the state before step c * CK (when CK > 0).
    B, C are read with d_state contiguous (strides s_Bt / s_Ct over time).
    CHAIN_IN (main pass): the program chains its start state itself instead of reading it from _chain_kernel's
    output: h0 (batch, N, d_inner) if HAS_H0, else zero, carried over the earlier segments' LOCAL results
    (loc: end states from a zero start, dsum: their sums of delta).
    """
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, T)
    d_ok = offs_d < d_inner
    b64 = pid_b.to(tl.int64)
    d64 = offs_d.to(tl.int64)

    A2 = ()
    for n in tl.static_range(N):
        A2 = A2 + (tl.load(A_ptr + offs_d * N + n, mask=d_ok, other=0.0).to(tl.float32) * LOG2E,)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(Dv_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    else:
        Dv = bias

    st_row = (b64 * n_seg + pid_s) * N
    if CHAIN_IN:
        if HAS_H0:
            h = _load_state(h0_ptr, b64 * N, d_inner, offs_d, d_ok, N)
        else:
            h = _zeros_state(BLOCK_D, N)
        for s in range(pid_s):
            h = _chain_step(h, A2, loc_ptr, dsum_ptr, b64 * n_seg + s, d_inner, offs_d, d_ok, N)
    elif HAS_H0:
        h = _load_state(h0_ptr, st_row, d_inner, offs_d, d_ok, N)
    else:
        h = _zeros_state(BLOCK_D, N)
    dsum = tl.zeros((BLOCK_D,), dtype=tl.float32)

    u_row = u_ptr + b64 * s_ub + d64[:, None] * s_ud          # (D, 1) pointers
    dt_row = dt_ptr + b64 * s_tb + d64[:, None] * s_td
    B_b = B_ptr + b64 * s_Bb
    C_b = C_ptr + b64 * s_Cb
    z_row = z_ptr + b64 * s_zb + d64[:, None] * s_zd
    y_row = y_ptr + b64 * s_yb + d64[:, None] * s_yd

    t_start = pid_s * seg_len
    t_end = tl.minimum(t_start + seg_len, L)
    W_Z: tl.constexpr = HAS_Z and not LOCAL
    W_C: tl.constexpr = not LOCAL
    if STAGES == 0:
        # register prefetch: the next tile's loads are issued before this tile's arithmetic
        nxt = _load_tile(u_row, dt_row, z_row, dt_row, B_b, C_b, t_start, L, s_Bt, s_Ct, d_ok, offs_t,
                         N, NP, T, True, W_Z, False, True, W_C)
        for t0 in range(t_start, t_end, T):
            cur = nxt
            nxt = _load_tile(u_row, dt_row, z_row, dt_row, B_b, C_b, t0 + T, L, s_Bt, s_Ct, d_ok, offs_t,
                             N, NP, T, True, W_Z, False, True, W_C)
            h, dsum = _fwd_tile(cur, h, dsum, t0, L, A2, bias, Dv, y_row, ck_ptr, b64, n_ck, d_inner, offs_d, d_ok,
                                offs_t, y_ptr.dtype.element_ty, N, NP, BLOCK_D, T, CK, HAS_D, HAS_Z, HAS_BIAS,
                                SOFTPLUS, LOCAL, N_POLY)
    else:
        # loads inside the loop: Triton's software pipeliner stages them STAGES - 1 tiles ahead through shared
        # memory (asynchronous copies)
        for t0 in tl.range(t_start, t_end, T, num_stages=STAGES):
            cur = _load_tile(u_row, dt_row, z_row, dt_row, B_b, C_b, t0, L, s_Bt, s_Ct, d_ok, offs_t,
                             N, NP, T, True, W_Z, False, True, W_C)
            h, dsum = _fwd_tile(cur, h, dsum, t0, L, A2, bias, Dv, y_row, ck_ptr, b64, n_ck, d_inner, offs_d, d_ok,
                                offs_t, y_ptr.dtype.element_ty, N, NP, BLOCK_D, T, CK, HAS_D, HAS_Z, HAS_BIAS,
                                SOFTPLUS, LOCAL, N_POLY)
    _store_state(hout_ptr, st_row, d_inner, offs_d, d_ok, h, N)
    if LOCAL:
        tl.store(dsum_ptr + (b64 * n_seg + pid_s) * d_inner + offs_d, dsum, mask=d_ok)


# --------------------------------------------------------------- forward: d_state split over G lanes
# Cross-lane exchange inside a channel's group of G lanes. Tensors (G, BLOCK_D) are laid out with g on the lowest
# lane bits (lane = g + G * channel): Triton derives that layout from the loads below (checked in the compiled IR,
# and the GPU benchmark checks every configuration against an fp64 oracle). On the GPU the exchange is a warp shuffle
# (inline PTX); under the interpreter (no inline assembly) the same function is computed with tensor reductions.
@triton.jit
def _group_bcast(x, src: tl.constexpr, g2, G: tl.constexpr, SHFL: tl.constexpr):
    """x (G, D) -> (G, D) holding, in every lane of a group, the value of the group's lane `src`."""
    if SHFL:
        c: tl.constexpr = ((32 - G) << 8) | 0x1F
        return tl.inline_asm_elementwise(
            "shfl.sync.idx.b32 $0, $1, $2, $3, -1;", "=r,r,r,r",
            [x, tl.full(x.shape, src, tl.int32), tl.full(x.shape, c, tl.int32)],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.broadcast_to(tl.sum(tl.where(g2 == src, x, 0.0), axis=0)[None, :], x.shape)


@triton.jit
def _group_xor(x, m: tl.constexpr, g2, G: tl.constexpr, SHFL: tl.constexpr):
    """x (G, D) -> the value of lane g ^ m of the same group."""
    if SHFL:
        return tl.inline_asm_elementwise(
            "shfl.sync.bfly.b32 $0, $1, $2, 0x1f, -1;", "=r,r,r",
            [x, tl.full(x.shape, m, tl.int32)], dtype=tl.float32, is_pure=True, pack=1)
    else:
        out = tl.zeros(x.shape, dtype=tl.float32)
        for q in tl.static_range(G):
            v = tl.sum(tl.where(g2 == q, x, 0.0), axis=0)[None, :]
            out = tl.where(g2 == (q ^ m), v, out)
        return out


@triton.jit
def _all_gather(xs, g2, G: tl.constexpr, TL: tl.constexpr, SHFL: tl.constexpr):
    """xs: TL tensors (G, D), lane g holding steps g*TL + j. -> T = G*TL tensors (G, D), step i in every lane."""
    out = ()
    for i in tl.static_range(G * TL):
        out = out + (_group_bcast(xs[i % TL], i // TL, g2, G, SHFL),)
    return out


@triton.jit
def _reduce_scatter(ps, g2, G: tl.constexpr, M: tl.constexpr, R: tl.constexpr, SHFL: tl.constexpr):
    """ps: M tensors (G, D) of per-lane partial sums, one per step (call with M = T, R = G / 2). -> T / G tensors
    (G, D): lane g gets the group sums of its own steps g*TL + j. Butterfly: each round (xor R) keeps the half of
    the steps owned by this lane's side, adds the partner's copy of it; T - TL shuffles in all."""
    if R == 0:
        return ps
    else:
        half: tl.constexpr = M // 2
        hi = (g2 & R) != 0
        nxt = ()
        for i in tl.static_range(half):
            keep = tl.where(hi, ps[half + i], ps[i])
            send = tl.where(hi, ps[i], ps[half + i])
            nxt = nxt + (keep + _group_xor(send, R, g2, G, SHFL),)
        return _reduce_scatter(nxt, g2, G, half, R // 2, SHFL)


@triton.jit
def _lane_xor(x, m: tl.constexpr, SHFL: tl.constexpr):
    """x (BLOCK_D,), one element per lane (lane = index % 32) -> the value of lane ^ m (a warp shuffle)."""
    if SHFL:
        return tl.inline_asm_elementwise(
            "shfl.sync.bfly.b32 $0, $1, $2, 0x1f, -1;", "=r,r,r",
            [x, tl.full(x.shape, m, tl.int32)], dtype=tl.float32, is_pure=True, pack=1)
    else:
        i = tl.arange(0, x.shape[0])
        return tl.sum(tl.where((i[:, None] ^ m) == i[None, :], x[None, :], 0.0), axis=1)


@triton.jit
def _warp_reduce_scatter(ps, lane, M: tl.constexpr, R: tl.constexpr, SHFL: tl.constexpr):
    """ps: M tensors (BLOCK_D,) -> sums over each warp's 32 lanes: while values remain to split, a round (xor R)
    keeps the half selected by the lane's bit R and adds the partner's copy of it; then the remaining rounds add
    the partner's value. Call with R = 16. See the caller for which lane holds which sum."""
    if R == 0:
        return ps
    else:
        if M >= 2:
            half: tl.constexpr = M // 2
            hi = (lane & R) != 0
            nxt = ()
            for i in tl.static_range(half):
                keep = tl.where(hi, ps[half + i], ps[i])
                send = tl.where(hi, ps[i], ps[half + i])
                nxt = nxt + (keep + _lane_xor(send, R, SHFL),)
            return _warp_reduce_scatter(nxt, lane, half, R // 2, SHFL)
        else:
            return _warp_reduce_scatter((ps[0] + _lane_xor(ps[0], R, SHFL),), lane, 1, R // 2, SHFL)


@triton.jit
def _pe_load(row, t0, tt3, t_end, dok3):
    """Raw (storage dtype) per-element tile (G, D, TL) of steps t0 + tt3, zero outside [.., t_end)."""
    return tl.load(row + (t0 + tt3), mask=dok3 & ((t0 + tt3) < t_end), other=0.0)


@triton.jit
def _pe_delta(dt_raw, u_raw, t, t_end, dok3, bias3, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              FMA_RCP: tl.constexpr):
    """delta and delta * u (fp32, (G, D, TL)) of one per-element tile; zero outside the segment (decay 1)."""
    x = dt_raw.to(tl.float32)
    if HAS_BIAS:
        x = x + bias3
    if SOFTPLUS:
        if FMA_RCP:
            x = _softplus_fma(x)
        else:
            x = _softplus(x)
    dl = tl.where(dok3 & (t < t_end), x, 0.0)
    return dl, dl * u_raw.to(tl.float32)


@triton.jit
def _bc_chunk(B_b, C_b, t0, NP: tl.constexpr, bc_off, G: tl.constexpr, BLOCK_D: tl.constexpr, K: tl.constexpr,
              WITH_C: tl.constexpr):
    """B (and C) rows of steps t0.. for this lane's states, as tuples of K = TC * NS tensors (G, D)."""
    Bs = _split_last(tl.reshape(tl.load(B_b + t0 * NP + bc_off), (G, BLOCK_D, K)), K)
    Cs = Bs
    if WITH_C:
        Cs = _split_last(tl.reshape(tl.load(C_b + t0 * NP + bc_off), (G, BLOCK_D, K)), K)
    return Bs, Cs


@triton.jit(do_not_specialize=["n_seg", "n_ck"])
def _fwd_split_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, bias_ptr,
    h0_ptr, y_ptr, hout_ptr, dsum_ptr, ck_ptr, loc_ptr,
    L, L_bc, d_inner, seg_len, n_seg, n_ck,
    s_ub, s_ud, s_tb, s_td, s_zb, s_zd, s_yb, s_yd,
    N: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
    CK: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, LOCAL: tl.constexpr, N_POLY: tl.constexpr, TC: tl.constexpr,
    BC_PRE: tl.constexpr, FMA_RCP: tl.constexpr, SHFL: tl.constexpr,
):
    """One (channel block, batch row, segment). LOCAL: zero start, write end state + sum(delta), no y.

    Layout: G lanes share a channel, lane g holds states g*NS .. g*NS+NS-1 as NS tensors (G, BLOCK_D). Per-element
    work (softplus, gating, loads, stores) runs on tiles (G, BLOCK_D, TL): lane g owns steps g*TL .. g*TL+TL-1 of
    each T-step tile, so nothing is computed twice. Per tile the lanes exchange delta and delta*u (every step to
    every lane: T shuffles each) and the partial <h, C> sums (back to each step's owner: a reduce-scatter).
    State buffers are (batch, n_seg, N, d_inner) fp32 (h0: start states in, hout: end states out);
    dsum: (batch, n_seg, d_inner); ck: (batch, n_ck, N, d_inner), the state before step c * CK (when CK > 0).
    B, C: (batch, L_bc, NP) fp32, contiguous, zero past L (L_bc a multiple of T: the loads need no mask).
    loc_ptr: unused (the one-lane kernel's CHAIN_IN input; the arguments of both kernels are the same).
    """
    NS: tl.constexpr = NP // G
    TL: tl.constexpr = T // G
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_g = tl.arange(0, G)
    offs_l = tl.arange(0, BLOCK_D)
    offs_d = pid_d * BLOCK_D + offs_l
    d_ok = offs_d < d_inner
    b64 = pid_b.to(tl.int64)
    d64 = offs_d.to(tl.int64)

    # state side (G, D): state n = g * NS + k in tuple entry k
    g2 = offs_g[:, None]
    d2 = offs_d[None, :]
    A2 = ()
    for k in tl.static_range(NS):
        nk = g2 * NS + k
        A2 = A2 + (tl.load(A_ptr + d2 * N + nk, mask=(d2 < d_inner) & (nk < N), other=0.0).to(tl.float32) * LOG2E,)
    st_row = (b64 * n_seg + pid_s) * N
    h = ()
    for k in tl.static_range(NS):
        nk = g2 * NS + k
        if HAS_H0:
            h = h + (tl.load(h0_ptr + (st_row + nk) * d_inner + d2, mask=(d2 < d_inner) & (nk < N), other=0.0),)
        else:
            h = h + (tl.zeros((G, BLOCK_D), dtype=tl.float32),)

    # per-element side (G, D, TL): step g * TL + j of the tile
    g3 = offs_g[:, None, None]
    tt3 = g3 * TL + tl.arange(0, TL)[None, None, :]
    dok3 = d_ok[None, :, None]
    dd3 = d64[None, :, None]
    if HAS_BIAS:
        bias3 = tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :, None]
    else:
        bias3 = tl.zeros((1, BLOCK_D, 1), dtype=tl.float32)
    if HAS_D:
        Dv3 = tl.load(Dv_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :, None]
    u_row = u_ptr + b64 * s_ub + dd3 * s_ud
    dt_row = dt_ptr + b64 * s_tb + dd3 * s_td
    z_row = z_ptr + b64 * s_zb + dd3 * s_zd
    y_row = y_ptr + b64 * s_yb + dd3 * s_yd
    # B, C rows of this lane's states, TC steps at a time: (G, D, TC, NS), the same for every channel
    g4 = offs_g[:, None, None, None]
    bc_off = (tl.arange(0, TC)[None, None, :, None] * NP + g4 * NS + tl.arange(0, NS)[None, None, None, :]
              + offs_l[None, :, None, None] * 0)
    B_b = B_ptr + b64 * L_bc * NP
    C_b = C_ptr + b64 * L_bc * NP

    t_start = pid_s * seg_len
    t_end = tl.minimum(t_start + seg_len, L)
    n_tiles = (t_end - t_start + T - 1) // T
    dsum = tl.zeros((G, BLOCK_D, TL), dtype=tl.float32)
    # raw inputs one tile ahead of their use (loop-carried; distinct values, see the loop's end)
    dt_n = _pe_load(dt_row, t_start, tt3, t_end, dok3)
    u_n = _pe_load(u_row, t_start, tt3, t_end, dok3)
    if HAS_Z and not LOCAL:
        z_n = _pe_load(z_row, t_start, tt3, t_end, dok3)
    for k in range(n_tiles):
        t0 = t_start + k * T
        dt_c = dt_n
        u_c = u_n
        if HAS_Z and not LOCAL:
            z_c = z_n
            z_n = _pe_load(z_row, t0 + T, tt3, t_end, dok3)
        dt_n = _pe_load(dt_row, t0 + T, tt3, t_end, dok3)
        u_n = _pe_load(u_row, t0 + T, tt3, t_end, dok3)
        # B, C of this tile, TC steps at a time, each chunk loaded one chunk ahead of its use (the first one before
        # the per-element work when BC_PRE: more latency hidden, more registers)
        if BC_PRE:
            Bn, Cn = _bc_chunk(B_b, C_b, t0, NP, bc_off, G, BLOCK_D, TC * NS, not LOCAL)
        dl, du = _pe_delta(dt_c, u_c, t0 + tt3, t_end, dok3, bias3, HAS_BIAS, SOFTPLUS, FMA_RCP)
        if LOCAL:
            dsum += dl
        dls = _all_gather(_split_last(dl, TL), g2, G, TL, SHFL)
        dus = _all_gather(_split_last(du, TL), g2, G, TL, SHFL)
        if not BC_PRE:
            Bn, Cn = _bc_chunk(B_b, C_b, t0, NP, bc_off, G, BLOCK_D, TC * NS, not LOCAL)
        if CK > 0:
            if t0 % CK == 0:
                for kk in tl.static_range(NS):
                    nk = g2 * NS + kk
                    tl.store(ck_ptr + ((b64 * n_ck + t0 // CK) * N + nk) * d_inner + d2, h[kk],
                             mask=(d2 < d_inner) & (nk < N))
        # the recurrence over the tile; LOCAL (the segments' pre-pass) needs only the final state, not y
        ys = ()
        for c in tl.static_range(T // TC):
            Bs = Bn
            Cs = Cn
            if c + 1 < T // TC:
                Bn, Cn = _bc_chunk(B_b, C_b, t0 + (c + 1) * TC, NP, bc_off, G, BLOCK_D, TC * NS, not LOCAL)
            for ii in tl.static_range(TC):
                hn = ()
                for kk in tl.static_range(NS):
                    a = _exp2_sel(dls[c * TC + ii] * A2[kk], kk, N_POLY)
                    hh = a * h[kk] + dus[c * TC + ii] * Bs[ii * NS + kk]
                    if not LOCAL:
                        if kk == 0:
                            y = hh * Cs[ii * NS]
                        else:
                            y += hh * Cs[ii * NS + kk]
                    hn = hn + (hh,)
                h = hn
                if not LOCAL:
                    ys = ys + (y,)
        if not LOCAL:
            # <h, C> of each step back to its owner lane, then + D u, * silu(z), store
            y = _join_last(_reduce_scatter(ys, g2, G, T, G // 2, SHFL), TL)
            if HAS_D:
                y += Dv3 * u_c.to(tl.float32)
            if HAS_Z:
                zf = z_c.to(tl.float32)
                if FMA_RCP:
                    y = y * (zf * _sigmoid_fma(zf))
                else:
                    y = y * (zf * _sigmoid(zf))
            tl.store(y_row + (t0 + tt3), y.to(y_row.dtype.element_ty), mask=dok3 & ((t0 + tt3) < t_end))
    for k in tl.static_range(NS):
        nk = g2 * NS + k
        tl.store(hout_ptr + (st_row + nk) * d_inner + d2, h[k], mask=(d2 < d_inner) & (nk < N))
    if LOCAL:
        tl.store(dsum_ptr + (b64 * n_seg + pid_s) * d_inner + offs_d, tl.sum(tl.sum(dsum, axis=2), axis=0),
                 mask=d_ok)


@triton.jit(do_not_specialize=["n_seg"])
def _chain_kernel(
    loc_ptr, dsum_ptr, A_ptr, init_ptr, start_ptr, fin_ptr,
    total, d_inner, n_seg,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
):
    """Chain per-segment results. Forward: start[s] = state entering segment s; state(s+1) = exp(A sum dl_s)
    * state(s) + loc[s]. REVERSE: the same recurrence from the last segment down (backward carries p).
    loc / start: (batch, n_seg, N, d_inner); dsum: (batch, n_seg, d_inner); init / fin: (batch, N, d_inner)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    b = (idx // (d_inner * N)).to(tl.int64)
    nd = idx % (d_inner * N)
    n = nd // d_inner
    d = nd % d_inner
    A2 = tl.load(A_ptr + d * N + n, mask=ok, other=0.0).to(tl.float32) * LOG2E
    if HAS_INIT:
        h = tl.load(init_ptr + idx, mask=ok, other=0.0)
    else:
        h = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(n_seg):
        if REVERSE:
            s = n_seg - 1 - k
        else:
            s = k
        off = (b * n_seg + s) * (d_inner * N) + nd
        tl.store(start_ptr + off, h, mask=ok)
        ds = tl.load(dsum_ptr + (b * n_seg + s) * d_inner + d, mask=ok, other=0.0)
        h = tl.exp2(A2 * ds) * h + tl.load(loc_ptr + off, mask=ok, other=0.0)
    tl.store(fin_ptr + idx, h, mask=ok)


# ------------------------------------------------------------------------------------------ backward kernel
@triton.jit
def _pick(xs, j, S: tl.constexpr, T: tl.constexpr):
    """Steps j*T..j*T+T-1 (j a run-time index < S) of a wide tile split by _split_last, as one (D, T) tensor
    (S - 1 selects per value)."""
    s = ()
    for i in tl.static_range(T):
        v = xs[i]
        for jj in tl.static_range(1, S):
            v = tl.where(j == jj, xs[jj * T + i], v)
        s = s + (v,)
    return _join_last(s, T)


@triton.jit
def _put(buf, xs, j, S: tl.constexpr, T: tl.constexpr):
    """buf (tuple of S*T (D,)) with entries j*T..j*T+T-1 (j a run-time index < S) replaced by xs (tuple of T)."""
    out = ()
    for jj in tl.static_range(S):
        for i in tl.static_range(T):
            out = out + (tl.where(j == jj, xs[i], buf[jj * T + i]),)
    return out


@triton.jit
def _load_parked(scr_base, k, N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The state parked by phase A at tile k of the chunk (per-program scratch, (tile, N, BLOCK_D))."""
    h = ()
    for n in tl.static_range(N):
        h = h + (tl.load(scr_base + (k * N + n) * BLOCK_D),)
    return h


@triton.jit
def _bwd_tile(u_r, dt_r, z_r, o_r, Bv, Cv, h, p, dA_acc, dD_acc, db_acc, t0, L, A, A2, bias, Dv, d_ok, offs_t, lane,
              dB_b, dC_b, N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              N_POLY: tl.constexpr, SHFL: tl.constexpr, MF: tl.constexpr, LOWB: tl.constexpr):
    """Phase B's work on one tile of T steps t0.. from its raw inputs (D, T), its B / C vectors and the state h
    parked at its start: recompute the tile, reverse through it (carry p), add dB / dC (atomics), accumulate dA,
    dD, d(delta_bias). Returns the new carry and accumulators and the tile's du, ddelta, dz (fp32, (D, T); dz a
    placeholder without z)."""
    K: tl.constexpr = T * NP
    t = t0 + offs_t
    m2 = d_ok[:, None] & (t < L)[None, :]
    dl, raw = _delta(dt_r, m2, bias, HAS_BIAS, SOFTPLUS)
    u = u_r.to(tl.float32)
    dout = o_r.to(tl.float32)
    Bs = _scalars(Bv, T * NP)
    Cs = _scalars(Cv, T * NP)
    if HAS_Z:
        zt = z_r.to(tl.float32)
        sz = _sigmoid(zt)
        dy = dout * (zt * sz)
    else:
        dy = dout
    dls = _split_last(dl, T)
    us = _split_last(u, T)
    dus = _split_last(dl * u, T)
    dys = _split_last(dy, T)
    # recompute the tile: the decays and the state after every step
    hs = (h,)
    As = ()
    ys = ()
    for i in tl.static_range(T):
        hn = ()
        a_row = ()
        y = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for n in tl.static_range(N):
            a = _exp2_sel(dls[i] * A2[n], n, N_POLY)
            hh = a * h[n] + dus[i] * Bs[i * NP + n]
            if HAS_Z:
                y += hh * Cs[i * NP + n]
            hn = hn + (hh,)
            a_row = a_row + (a,)
        h = hn
        hs = hs + (hn,)
        As = As + (a_row,)
        ys = ys + (y,)
    # reverse through the tile
    du_out = ()
    ddl_out = ()
    dB_cols = ()
    dC_cols = ()
    for i in tl.static_range(T - 1, -1, -1):
        gB = tl.zeros((BLOCK_D,), dtype=tl.float32)
        gA = tl.zeros((BLOCK_D,), dtype=tl.float32)
        pn = ()
        dAn = ()
        dBc = ()
        dCc = ()
        for n in tl.static_range(N):
            g = Cs[i * NP + n] * dys[i] + p[n]
            gB += g * Bs[i * NP + n]
            q = As[i][n] * g                                   # p_t = a_t g_t
            ph = q * hs[i][n]                                  # a_t g_t h_{t-1}
            gA += A[n] * ph
            dAn = dAn + (dA_acc[n] + dls[i] * ph,)
            pn = pn + (q,)
            dBc = dBc + (g * dus[i],)
            dCc = dCc + (hs[i + 1][n] * dys[i],)
        for _n in tl.static_range(N, NP):
            dBc = dBc + (gB * 0.0,)
            dCc = dCc + (gB * 0.0,)
        p = pn
        dA_acc = dAn
        dB_cols = dBc + dB_cols
        dC_cols = dCc + dC_cols
        du_out = (dls[i] * gB,) + du_out
        ddl_out = (us[i] * gB + gA,) + ddl_out
    # sums over the warp's channels of the 2K values (dB then dC, index i*NP + n): a reduce-scatter leaves lane l
    # with values (l >> LOWB) * MF + j, which it adds to global memory (LOWB low lane bits hold copies when 2K < 32;
    # only the lane with those bits clear adds)
    red = _warp_reduce_scatter(dB_cols + dC_cols, lane, 2 * K, 16, SHFL)
    for j in tl.static_range(MF):
        v = (lane >> LOWB) * MF + j
        vk = v % K
        ok = ((lane & ((1 << LOWB) - 1)) == 0) & ((t0 + vk // NP) < L)
        ptr = tl.where(v < K, dB_b, dC_b) + t0 * NP + vk
        tl.atomic_add(ptr, red[j], mask=ok, sem="relaxed")
    du = _join_last(du_out, T)
    ddl = _join_last(ddl_out, T)
    if HAS_D:
        du += Dv[:, None] * dy
        dD_acc += tl.sum(dy * u, axis=1)
    if SOFTPLUS:
        ddl = ddl * _sigmoid(raw)
    ddl = tl.where(m2, ddl, 0.0)
    db_acc += tl.sum(ddl, axis=1)
    dz = du
    if HAS_Z:
        y = _join_last(ys, T)
        if HAS_D:
            y += Dv[:, None] * u
        dz = dout * y * (sz * (1.0 + zt * (1.0 - sz)))
    return p, dA_acc, dD_acc, db_acc, du, ddl, dz


@triton.jit(do_not_specialize=["n_seg", "n_ck"])
def _bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, bias_ptr, dout_ptr,
    ck_ptr, pend_ptr, scr_ptr,
    du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dAp_ptr, dDp_ptr, dbp_ptr, dh0_ptr, ploc_ptr, dsum_ptr,
    L, d_inner, seg_len, n_seg, n_ck,
    s_ub, s_ud, s_tb, s_td, s_Bb, s_Bt, s_Cb, s_Ct, s_zb, s_zd, s_ob, s_od,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, CK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_PEND: tl.constexpr, LOCAL: tl.constexpr, N_POLY: tl.constexpr, SHFL: tl.constexpr,
    MF: tl.constexpr, LOWB: tl.constexpr, W: tl.constexpr = 2, PACK: tl.constexpr = False,
    WS: tl.constexpr = 2, LA: tl.constexpr = 1, CHAIN_IN: tl.constexpr = False,
):
    """Backward of one (channel block, batch row, segment).

    Recurrence: h_t = a_t h_{t-1} + b_t; g_t = dL/dh_t = C_t dy_t + p_{t+1}; p_t = a_t g_t (carried backwards).
    LOCAL: reverse pass from a zero carry: writes ploc (the carry leaving the segment's start when no gradient
    enters at its end) and sum(delta). Otherwise the full backward from the incoming carry pend
    (batch, n_seg, N, d_inner): du / ddelta / dz (batch, d_inner, L); dB, dC (batch, L, NP) fp32, accumulated
    over channel blocks with atomic adds (so their last bits depend on the order blocks finish);
    dA partials (batch, n_seg, N, d_inner); dD / d(delta_bias) partials (batch, n_seg, d_inner); dh0
    (batch, N, d_inner), written by segment 0.

    Per-element inputs are read in groups of W steps (one vector per lane: 16 bytes at 8 bf16 or 4 fp32 steps,
    instead of a 4-byte piece of a separate memory sector per input and tile) and worked in tiles of T steps.
    PACK (16-bit data, even strides): groups are read and kept as 32-bit words of two steps (a register holds two
    steps, not one). Groups are aligned to the chunk start (CK % W == 0); a group's steps past L are worked with
    zero inputs (delta 0: state and carry pass unchanged), so phase A parks the start state of every tile of the
    group. Phase A and the LOCAL pass unroll a group's S = W / T tiles; phase B keeps one loop iteration per tile
    (unrolled over the group it compiled ~14x slower and spilled) and picks the tile's words by selects on its
    place j in the group. WS = W: du / ddelta / dz collected the same way and written a group at a time (WS = T:
    per tile).
    LA: tiles of look-ahead for the next group's inputs in phase B (the parked state: one tile).
    CHAIN_IN (main pass): the program chains its incoming carry itself instead of reading _chain_kernel's output:
    pend (batch, N, d_inner) if HAS_PEND, else zero, carried down over the later segments' LOCAL results (ploc,
    dsum).
    """
    S: tl.constexpr = W // T
    EP: tl.constexpr = 2 if PACK else 1          # steps per loaded unit (a 32-bit word of two 16-bit steps)
    NU: tl.constexpr = W // EP                   # units per group
    TU: tl.constexpr = T // EP                   # units per tile
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_db = tl.num_programs(0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_u = tl.arange(0, NU)
    offs_t = tl.arange(0, T)
    d_ok = offs_d < d_inner
    b64 = pid_b.to(tl.int64)
    d64 = offs_d.to(tl.int64)

    A = ()
    A2 = ()
    for n in tl.static_range(N):
        an = tl.load(A_ptr + offs_d * N + n, mask=d_ok, other=0.0).to(tl.float32)
        A = A + (an,)
        A2 = A2 + (an * LOG2E,)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(Dv_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    else:
        Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)

    st_row = (b64 * n_seg + pid_s) * N
    if CHAIN_IN:
        if HAS_PEND:
            p = _load_state(pend_ptr, b64 * N, d_inner, offs_d, d_ok, N)
        else:
            p = _zeros_state(BLOCK_D, N)
        for k in range(n_seg - 1 - pid_s):
            p = _chain_step(p, A2, ploc_ptr, dsum_ptr, b64 * n_seg + (n_seg - 1 - k), d_inner, offs_d, d_ok, N)
    elif HAS_PEND:
        p = _load_state(pend_ptr, st_row, d_inner, offs_d, d_ok, N)
    else:
        p = _zeros_state(BLOCK_D, N)

    # rows of the per-element inputs in load units (PACK: int32 words, the row offsets halved: strides are even)
    u_row = _unit_ptr(u_ptr, PACK) + (b64 * s_ub + d64[:, None] * s_ud) // EP
    dt_row = _unit_ptr(dt_ptr, PACK) + (b64 * s_tb + d64[:, None] * s_td) // EP
    o_row = _unit_ptr(dout_ptr, PACK) + (b64 * s_ob + d64[:, None] * s_od) // EP
    z_row = _unit_ptr(z_ptr, PACK) + (b64 * s_zb + d64[:, None] * s_zd) // EP
    u_ty: tl.constexpr = u_ptr.dtype.element_ty
    dt_ty: tl.constexpr = dt_ptr.dtype.element_ty
    z_ty: tl.constexpr = z_ptr.dtype.element_ty
    o_ty: tl.constexpr = dout_ptr.dtype.element_ty
    LU = L // EP                                 # PACK: L is even
    B_b = B_ptr + b64 * s_Bb
    C_b = C_ptr + b64 * s_Cb

    t_start = pid_s * seg_len
    t_end = tl.minimum(t_start + seg_len, L)

    if LOCAL:
        dsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        n_grp = (t_end - t_start + W - 1) // W
        npe = _load_pe(u_row, dt_row, z_row, o_row, (t_start + (n_grp - 1) * W) // EP, LU, d_ok, offs_u, False, HAS_Z,
                       True)
        nbc = _load_bc(B_b, C_b, t_start + n_grp * W - T, L, s_Bt, s_Ct, N, NP, T, False, True)
        for gg in range(n_grp):
            g0 = t_start + (n_grp - 1 - gg) * W
            pe = npe
            npe = _load_pe(u_row, dt_row, z_row, o_row, (g0 - W) // EP, LU, d_ok, offs_u, False, HAS_Z, True)
            dts_w = _split_last(pe[1], NU)
            zs_w = _split_last(pe[2], NU)
            os_w = _split_last(pe[3], NU)
            for jr in tl.static_range(S - 1, -1, -1):
                bc = nbc
                nbc = _load_bc(B_b, C_b, g0 + jr * T - T, L, s_Bt, s_Ct, N, NP, T, False, True)
                t = g0 + jr * T + offs_t
                m2 = d_ok[:, None] & (t < L)[None, :]
                dl, raw = _delta(_unpack(_take(dts_w, jr, TU), dt_ty, PACK), m2, bias, HAS_BIAS, SOFTPLUS)
                dsum += tl.sum(dl, axis=1)
                dy = _unpack(_take(os_w, jr, TU), o_ty, PACK).to(tl.float32)
                if HAS_Z:
                    zt = _unpack(_take(zs_w, jr, TU), z_ty, PACK).to(tl.float32)
                    dy = dy * (zt * _sigmoid(zt))
                Cs = _scalars(bc[1], T * NP)
                dls = _split_last(dl, T)
                dys = _split_last(dy, T)
                for i in tl.static_range(T - 1, -1, -1):
                    pn = ()
                    for n in tl.static_range(N):
                        a = _exp2_sel(dls[i] * A2[n], n, N_POLY)
                        pn = pn + (a * (Cs[i * NP + n] * dys[i] + p[n]),)
                    p = pn
        _store_state(ploc_ptr, st_row, d_inner, offs_d, d_ok, p, N)
        tl.store(dsum_ptr + (b64 * n_seg + pid_s) * d_inner + offs_d, dsum, mask=d_ok)
    else:
        pid_lin = (pid_s * tl.num_programs(1) + pid_b) * n_db + pid_d
        scr_base = scr_ptr + pid_lin.to(tl.int64) * ((CK // T) * N * BLOCK_D) + tl.arange(0, BLOCK_D)
        dB_b = dB_ptr + b64 * L * NP
        dC_b = dC_ptr + b64 * L * NP
        g_row = (b64 * d_inner + d64[:, None]) * L                 # gradient outputs are contiguous
        du_row = _unit_ptr(du_ptr, PACK) + g_row // EP
        ddt_row = _unit_ptr(ddt_ptr, PACK) + g_row // EP
        dz_row = _unit_ptr(dz_ptr, PACK) + g_row // EP
        lane = tl.arange(0, BLOCK_D) % 32
        dA_acc = _zeros_state(BLOCK_D, N)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        n_chunks = (t_end - t_start + CK - 1) // CK
        for c in range(n_chunks):
            c_start = t_start + (n_chunks - 1 - c) * CK
            n_grp = (tl.minimum(c_start + CK, t_end) - c_start + W - 1) // W
            h = _load_state(ck_ptr, (b64 * n_ck + c_start // CK) * N, d_inner, offs_d, d_ok, N)
            # phase A: forward through the chunk, parking the state at every tile start
            npe = _load_pe(u_row, dt_row, z_row, o_row, c_start // EP, LU, d_ok, offs_u, True, False, False)
            nbc = _load_bc(B_b, C_b, c_start, L, s_Bt, s_Ct, N, NP, T, True, False)
            for gi in range(n_grp):
                g0 = c_start + gi * W
                pe = npe
                npe = _load_pe(u_row, dt_row, z_row, o_row, (g0 + W) // EP, LU, d_ok, offs_u, True, False, False)
                us_w = _split_last(pe[0], NU)
                dts_w = _split_last(pe[1], NU)
                for ja in tl.static_range(S):
                    for n in tl.static_range(N):
                        tl.store(scr_base + ((gi * S + ja) * N + n) * BLOCK_D, h[n])
                    bc = nbc
                    nbc = _load_bc(B_b, C_b, g0 + ja * T + T, L, s_Bt, s_Ct, N, NP, T, True, False)
                    t = g0 + ja * T + offs_t
                    m2 = d_ok[:, None] & (t < L)[None, :]
                    dl, raw = _delta(_unpack(_take(dts_w, ja, TU), dt_ty, PACK), m2, bias, HAS_BIAS, SOFTPLUS)
                    u = _unpack(_take(us_w, ja, TU), u_ty, PACK).to(tl.float32)
                    Bs = _scalars(bc[0], T * NP)
                    h = _tile_steps(h, A2, _split_last(dl, T), _split_last(dl * u, T), Bs, N, NP, T, N_POLY)
            tl.debug_barrier()
            # phase B: the chunk's tiles in reverse, one loop iteration per tile. The group's inputs (W steps) are
            # loaded LA tiles before its first tile; each tile picks its units from them (selects on its place j
            # in the group), and with WS = W its outputs are collected the same way and written at j = 0.
            # B / C and the parked state of the next tile are prefetched one tile ahead.
            n_t = n_grp * S
            pe = _load_pe(u_row, dt_row, z_row, o_row, (c_start + (n_grp - 1) * W) // EP, LU, d_ok, offs_u, True,
                          HAS_Z, True)
            # npe, the next group's inputs, is loaded in the loop; it starts as its own (identical) load, not as an
            # alias of pe (the front end decides loop-carried values by comparing them before and after the body)
            npe = _load_pe(u_row, dt_row, z_row, o_row, (c_start + (n_grp - 1) * W) // EP, LU, d_ok, offs_u, True,
                           HAS_Z, True)
            nbc = _load_bc(B_b, C_b, c_start + (n_t - 1) * T, L, s_Bt, s_Ct, N, NP, T, True, True)
            h_nxt = _load_parked(scr_base, n_t - 1, N, BLOCK_D)
            if WS == W:
                du_b = _zeros_units(BLOCK_D, NU, du_ptr.dtype.element_ty, PACK)
                ddl_b = _zeros_units(BLOCK_D, NU, ddt_ptr.dtype.element_ty, PACK)
                dz_b = _zeros_units(BLOCK_D, NU, dz_ptr.dtype.element_ty, PACK)
            for kk in range(n_t):
                k = n_t - 1 - kk
                j = k % S
                g0 = c_start + (k // S) * W                         # the group's start (a multiple of W)
                t0 = g0 + j * T
                if j == LA - 1:
                    npe = _load_pe(u_row, dt_row, z_row, o_row, (g0 - W) // EP, LU, d_ok, offs_u, True, HAS_Z, True)
                bc = nbc
                h = h_nxt
                nbc = _load_bc(B_b, C_b, t0 - T, L, s_Bt, s_Ct, N, NP, T, True, True)
                h_nxt = _load_parked(scr_base, tl.maximum(k - 1, 0), N, BLOCK_D)
                p, dA_acc, dD_acc, db_acc, du, ddl, dz = _bwd_tile(
                    _unpack(_pick(_split_last(pe[0], NU), j, S, TU), u_ty, PACK),
                    _unpack(_pick(_split_last(pe[1], NU), j, S, TU), dt_ty, PACK),
                    _unpack(_pick(_split_last(pe[2], NU), j, S, TU), z_ty, PACK),
                    _unpack(_pick(_split_last(pe[3], NU), j, S, TU), o_ty, PACK),
                    bc[0], bc[1], h, p, dA_acc, dD_acc, db_acc, t0, L, A, A2, bias, Dv, d_ok, offs_t, lane, dB_b,
                    dC_b, N, NP, BLOCK_D, T, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, N_POLY, SHFL, MF, LOWB)
                if WS == W:
                    du_b = _put(du_b, _split_last(_pack(du.to(du_ptr.dtype.element_ty), PACK), TU), j, S, TU)
                    ddl_b = _put(ddl_b, _split_last(_pack(ddl.to(ddt_ptr.dtype.element_ty), PACK), TU), j, S, TU)
                    if HAS_Z:
                        dz_b = _put(dz_b, _split_last(_pack(dz.to(dz_ptr.dtype.element_ty), PACK), TU), j, S, TU)
                    if j == 0:
                        # the buffers hold the group's W steps: one vector store per output and lane
                        tw = g0 // EP + offs_u
                        mw = d_ok[:, None] & (tw < LU)[None, :]
                        tl.store(du_row + tw[None, :], _join_last(du_b, NU), mask=mw)
                        tl.store(ddt_row + tw[None, :], _join_last(ddl_b, NU), mask=mw)
                        if HAS_Z:
                            tl.store(dz_row + tw[None, :], _join_last(dz_b, NU), mask=mw)
                else:
                    t = t0 + offs_t
                    m2 = d_ok[:, None] & (t < L)[None, :]
                    g_off = g_row + t[None, :]
                    tl.store(du_ptr + g_off, du.to(du_ptr.dtype.element_ty), mask=m2)
                    tl.store(ddt_ptr + g_off, ddl.to(ddt_ptr.dtype.element_ty), mask=m2)
                    if HAS_Z:
                        tl.store(dz_ptr + g_off, dz.to(dz_ptr.dtype.element_ty), mask=m2)
                if j == 0:
                    pe = npe
            tl.debug_barrier()
        _store_state(dAp_ptr, st_row, d_inner, offs_d, d_ok, dA_acc, N)
        vec_off = (b64 * n_seg + pid_s) * d_inner + offs_d
        if HAS_D:
            tl.store(dDp_ptr + vec_off, dD_acc, mask=d_ok)
        if HAS_BIAS:
            tl.store(dbp_ptr + vec_off, db_acc, mask=d_ok)
        if pid_s == 0:
            _store_state(dh0_ptr, b64 * N, d_inner, offs_d, d_ok, p, N)


# ------------------------------------------------------------------------------------------------ host side
CK_DEFAULT = 64          # backward checkpoint interval (steps): forward writes N fp32 per channel every CK steps


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _wave_segments(warps: int, cap: int, min_waves: int, n_max: int) -> int:
    """Segment count for a pass of `warps` one-warp programs per segment on a GPU that holds `cap` of them at once:
    at least `min_waves` waves if segments may be that many (n_max: segments >= 4 chunks long), and among up to
    twice that count the one whose last wave is fullest (least time per segment-length: ceil(waves) / n_seg;
    ties to fewer segments)."""
    lo = max(1, min(cdiv(min_waves * cap, warps), n_max))
    hi = max(lo, min(2 * lo, n_max))
    return min(range(lo, hi + 1), key=lambda n: (cdiv(n * warps, cap) / n, n))


def _pick_config(b: int, d: int, L: int, dtype: torch.dtype, device: torch.device, backward: bool) -> dict:
    """Block shapes and the number of parallel segments. Overridable for tuning via _CONFIG_OVERRIDE."""
    cfg = dict(_base_config(b, d, L, dtype, device, backward, CK_DEFAULT))
    cfg.update(_CONFIG_OVERRIDE.get("bwd" if backward else "fwd", {}))
    return cfg


# _pick_config runs two or three times per forward + backward; its answer depends only on these arguments (and
# CK_DEFAULT, which the tests change), so it is kept. In a torch.profiler trace on the H200 host (session 8, 8 x 1536
# x 2048) the stretches of host time where it runs, with no torch op in them, were ~100-130 us each, the device
# query the likely part (not timed on its own); on this 2-core CPU a fresh pick is ~5 us, a kept one 0.4 us.
@functools.lru_cache(maxsize=1024)
def _base_config(b: int, d: int, L: int, dtype: torch.dtype, device: torch.device, backward: bool,
                 ck_default: int) -> dict:
    """_pick_config without the overrides; ck_default is CK_DEFAULT."""
    sms = _num_sms(device)
    if backward:
        block_d, num_warps = (32, 1)
        T = 2                           # backward keeps T steps of states and decays live: T = 4 spills registers
        warps = b * cdiv(d, block_d) * num_warps
        # The loop is latency-bound below ~6 warps per SM (8 x 4096 runs fastest with 1 segment), so split only when
        # short of warps; then fill whole waves: the main pass holds 8 one-warp programs per SM (255 registers) and
        # all programs are equally long, so 1.5 waves cost as much as 2 (H200, session 6: 8 x 1536 x 32768 bf16,
        # backward 19.3 ms at 5 segments = 1.8 waves, 22.2 at 4 = 1.45 waves, 18.7-19.0 at 8 / 11 = 2.9 / 4 waves;
        # 1 x 1536 x 1M: 85.4 ms at 33 = 1.5 waves, 76.7 / 74.3 / 73.2 at 1 / 2 / 3 waves).
        # CK: checkpoint interval (steps) of the state saved by the forward for the backward, which recomputes
        # inside each chunk; the forward with checkpoints takes it from here (_ck_len), so it can differ by shape.
        # CK 16 for 4-byte inputs when short of warps (H200, session 8, same-call A/B of forward + backward at
        # 8 x 1536 fp32: L 2048 3.38 -> 3.07 ms, L 8192 8.31 -> 7.82; bf16 there: 0.99x / 0.95x, so 16-bit keeps 64).
        # fp32 (CK 16) at batch 1 fills 2 waves instead of 3 (H200, session 10, same-call A/B of forward +
        # backward at 1 x 1536 x 1M fp32: 135.6 ms at 66 segments = 3 waves, 130.9 at 44 = 2 waves, 132.2 / 131.5 at
        # 4 / 6 waves; 8 x 1536 shapes get the same count either way)
        ck = 16 if warps < 6 * sms and dtype == torch.float32 else ck_default
        waves = 2 if ck < ck_default else 3
        n_seg = 1 if warps >= 6 * sms else _wave_segments(warps, 8 * sms, waves, cdiv(L, 4 * ck_default))
        # Per-element inputs read 16 bytes per lane at a time (8 bf16 / 4 fp32 steps), gradients collected and
        # written likewise, the next group's inputs loaded at the current group's first tile (LA 4 >= W / T): H200,
        # backward alone, 1.27-1.41x the tile-wide version (loads alone 1.03-1.08x; 8-byte groups 1.22-1.24x bf16).
        cfg = {"BLOCK_D": block_d, "T": T, "num_warps": num_warps, "n_seg": n_seg, "N_POLY": 2,
               "WB": 16, "WIDE_ST": True, "LA": 4, "CK": ck}
    else:
        # Two forward kernels (docs/notes/triton_scan_notes.md, H200):
        # - one lane per channel, all states in the thread (G = 1), its loads left in the loop for Triton's software
        #   pipeliner (STAGES = 3: asynchronous copies through shared memory, two tiles in flight), T = 8 (session 4,
        #   same calls: 1.14-1.53x the register-prefetch T = 4 version at L >= 32768, bf16 and fp32, 1.2x at
        #   8 x 1536 x 8192, 1.02x at 8 x 4096 x 2048; T = 8 with register prefetch spills, this needs 124 registers);
        # - d_state split over G = 4 lanes (T = 8): 4x the warps in one pass; since session 4 only at short
        #   sequences of 8 x 1536 16-bit (L = 2048: 0.544 vs 0.575 ms; at L = 8192 the first is 1.10x faster,
        #   at 32768 1.19x).
        warps1 = b * cdiv(d, 32)
        warps4 = b * d * 4 // 32
        if dtype in (torch.bfloat16, torch.float16) and warps1 < 6 * sms <= warps4 and L <= 4096:
            cfg = {"G": 4, "T": 8, "TC": 4, "BC_PRE": True, "FMA_RCP": True, "num_warps": 1, "n_seg": 1,
                   "N_POLY": 0}
        else:
            # The loop is latency-bound below ~6 warps per SM (8 x 4096 runs fastest with 1 segment). A segment
            # pre-pass costs ~3/4 of a forward, so split only when short of warps; then fill two whole waves of the
            # main pass (16 one-warp programs per SM at <= 128 registers). H200, session 6: 8 x 1536 x 32768
            # forward with checkpoints 6.25 ms (bf16) / 6.81 (fp32) at 5 segments, 5.75 / 5.77 at 11 (2 waves);
            # 1 x 1536 x 1M 24.7 at 33, 24.2 at 66.
            n_seg = 1 if warps1 >= 6 * sms else _wave_segments(warps1, 16 * sms, 2, cdiv(L, 4 * ck_default))
            # N_POLY: 3 polynomial exponentials per step in fp32 with one segment (H200, session 14, forward vs
            # N_POLY 2: 8 x 4096 x 32768 1.028x / 1.031x in two calls, 8 x 4096 x 2048 1.016x; 1 and 4 slower there:
            # 0.86x, 0.95x in session 4); with segments 2 stays (8 x 1536 x 8192 0.976x, 8 x 1536 x 2048 0.986x,
            # 1 x 1536 x 1M 0.995x at 3)
            n_poly = 3 if dtype == torch.float32 and n_seg == 1 else 2
            cfg = {"G": 1, "BLOCK_D": 32, "T": 8, "STAGES": 3, "num_warps": 1, "n_seg": n_seg, "N_POLY": n_poly}
    cfg["n_seg"] = max(1, min(cfg["n_seg"], cdiv(L, 4 * ck_default)))
    return cfg


_CONFIG_OVERRIDE: dict[str, dict] = {}


def _ck_len(b: int, d: int, L: int, dtype: torch.dtype, device: torch.device) -> int:
    """Checkpoint interval of the backward's config for this shape: the forward with checkpoints writes the state
    every this many steps, and the backward must read it at the same spacing (passed along through ctx)."""
    return int(_pick_config(b, d, L, dtype, device, backward=True).get("CK", CK_DEFAULT))


def _lastdim_contig(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    return x if x.stride(-1) == 1 else x.contiguous()


def _seg_len(L: int, n_seg: int, ck: int) -> tuple[int, int]:
    seg = cdiv(cdiv(L, n_seg), ck) * ck
    return seg, cdiv(L, seg)


def _n_contig(x: torch.Tensor) -> torch.Tensor:
    """B / C (batch, d_state, L) as a view whose d_state axis is contiguous (memory (batch, L, d_state)): each time
    step's d_state values are one vectorised load. Free when B, C come as transposed views of token-major x_proj
    output; the model's batched x_proj gives them time-contiguous, so one small copy each (d_state values per step)."""
    if x.stride(1) == 1:
        return x
    b, n, L = x.shape
    return torch.empty_strided((b, n, L), (L * n, 1, n), device=x.device, dtype=x.dtype).copy_(x)


# Launching. Triton's launcher derives every argument's specialisation (dtype, 16-byte alignment, ints equal to 1 or
# divisible by 16) and a cache key from them on every call; _launch can instead keep the compiled kernel per key of
# exactly those properties and launch it directly (the first call of a key goes through Triton). It relies on how
# Triton specialises arguments and on its compiled kernels' launch API, so it is on by default only with the Triton
# release it was checked with (3.6; RMAMBA_TRITON_FAST_LAUNCH=0 / 1 turns it off / on for any version). Checked on
# an H200 with the benchmark's full checks (poisoned outputs, fresh inputs; every gradient against Triton's own
# launcher in the same process) at 8 x 1536 x 2048 bf16 / fp32 and 8 x 4096 x 2048 bf16, session 10: passed;
# 2-5% less time per synced call at those shapes (inference forward 1.02-1.07x, fwd + bwd 1.02-1.05x), no change
# when calls are queued. The short-sequence host cost is mostly elsewhere: one fwd + bwd there spends ~2-3 ms on the
# host for ~1.5 ms of kernels; with the launches stubbed out ~1.6-2.6 ms remain (H200 host, session 9: ~56 torch
# ops then, ~30 us each, and the autograd engine).
def _fast_launch_default() -> bool:
    env = os.environ.get("RMAMBA_TRITON_FAST_LAUNCH", "")
    if env not in ("", "0", "1"):
        raise ValueError(f"RMAMBA_TRITON_FAST_LAUNCH: expected 0 or 1 (or unset), got {env!r}")
    if env:
        return env == "1"
    return triton.__version__.split(".")[:2] == ["3", "6"]


_FAST_LAUNCH = _fast_launch_default()
_FAST_CACHE: dict = {}


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return a == 1, a % 16 == 0, -(1 << 31) <= a < (1 << 31)
    return type(a)


def _launch(kernel, grid, args: tuple, kw: dict):
    """kernel[grid](*args, **kw); returns the compiled kernel. See _FAST_LAUNCH."""
    if not _FAST_LAUNCH or os.environ.get("TRITON_INTERPRET") == "1":
        return kernel[grid](*args, **kw)
    key = (kernel, args[0].device.index, tuple(kw.items()), tuple(map(_arg_key, args)))
    hit = _FAST_CACHE.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **kw)
        params = list(inspect.signature(kernel.fn).parameters.values())[len(args):]
        tail = tuple(kw[p.name] if p.name in kw else p.default for p in params)
        if compiled is not None and hasattr(compiled, "__getitem__"):
            _FAST_CACHE[key] = (compiled, tail)
        return compiled
    compiled, tail = hit
    compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *tail)
    return compiled


# Warp shuffles assume a layout: lane = g + G * channel for the forward's (G, BLOCK_D) tensors, lane = channel % 32 for
# the backward's (BLOCK_D,) tensors. Triton picks layouts itself (Triton 3.6 gives these; another version may not),
# so every compiled kernel that shuffles is checked once, from its TTGIR, and a kernel that fails the check is run
# again without shuffles (the tensor-reduction path: slower, right for any layout) and never used again.
_SHFL_CHECKED: dict[int, bool] = {}
_SHFL_OFF: set[str] = set()


def _lane_bases(layout: str) -> list[list[int]] | None:
    """Lane bases (per-dimension offsets of lane bits 0..4) of a #ttg.blocked or #ttg.linear layout's text."""
    import json
    import re

    m = re.search(r"lane = (\[\[[^=]*?\]\])", layout)
    if m:
        return json.loads(m.group(1))
    try:
        spt, tpw, order = (json.loads(re.search(key + r" = (\[[^\]]*\])", layout).group(1))
                           for key in ("sizePerThread", "threadsPerWarp", "order"))
    except (AttributeError, ValueError):
        return None
    bases = []
    for d in order:
        k = 1
        while k < tpw[d]:
            bases.append([spt[d] * k if i == d else 0 for i in range(len(spt))])
            k *= 2
    return bases


def _shfl_layout_ok(ttgir: str, G: int) -> bool:
    """Whether every shuffle in this TTGIR runs on a layout whose lowest log2(G) lane bits step along dim 0 by 1
    (G = 32: all five lane bits, the backward's one-channel-per-lane tensors). False if no shuffle is found."""
    import re

    defs = dict(re.findall(r"^(#[\w]+) = (#ttg\.\w+<.*>)\s*$", ttgir, re.M))
    used = set(re.findall(r"elementwise_inline_asm \"shfl[^\n]*-> tensor<[^,>]*, (#[\w]+)>", ttgir))
    if not used:
        return False
    bits = G.bit_length() - 1
    for name in used:
        bases = _lane_bases(defs.get(name, ""))
        if bases is None or len(bases) < bits:
            return False
        for i in range(bits):
            if bases[i][0] != 1 << i or any(bases[i][1:]):
                return False
    return True


def _launch_checked(kernel, grid, args, kw, G: int, redo=None):
    """kernel[grid](*args, **kw) with the shuffle-layout check above; on a failed check redo() (clears outputs
    that accumulate) and run it again with SHFL=False."""
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel)
    if name in _SHFL_OFF:
        kw = dict(kw, SHFL=False)
    compiled = _launch(kernel, grid, args, kw)
    if not kw.get("SHFL") or compiled is None or not hasattr(compiled, "asm"):
        return
    ok = _SHFL_CHECKED.get(id(compiled))
    if ok is None:
        ok = _SHFL_CHECKED[id(compiled)] = _shfl_layout_ok(compiled.asm.get("ttgir", ""), G)
    if not ok:
        import warnings

        warnings.warn(f"{name}: this Triton lays the shuffled tensors out differently than the kernel assumes; "
                      "using the slower path without warp shuffles", RuntimeWarning, stacklevel=3)
        _SHFL_OFF.add(name)
        if redo is not None:
            redo()
        _launch(kernel, grid, args, dict(kw, SHFL=False))


def _bc_rows(x: torch.Tensor, NP: int, T: int) -> torch.Tensor:
    """B / C (batch, d_state, L) -> fp32 (batch, L_bc, NP), L_bc = L rounded up to T, zero-padded states and steps:
    one contiguous row per time step, so a lane's states of one step are one vector load, and whole tiles load
    without masks. One small copy (the tensor is d_inner times smaller than u)."""
    b, n, L = x.shape
    Lb = cdiv(L, T) * T
    if NP == n and Lb == L:                      # nothing to pad: one copy-cast (copy=True: without it, an fp32
        # x would come back as the transposed view itself, since .to() keeps a 3-D tensor of unchanged dtype)
        return x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    out = torch.empty((b, Lb, NP), device=x.device, dtype=torch.float32)
    if NP > n:
        out[:, :, n:].zero_()
    if Lb > L:
        out[:, L:].zero_()
    out[:, :L, :n].copy_(x.transpose(1, 2))
    return out


def _chain_buffers(loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_chain's outputs for LOCAL results shaped like loc: allocated before the LOCAL launch, so that between the
    launches the host has nothing left to do but launch (at short sequences the GPU would wait for it)."""
    b, n_seg, n, d = loc.shape
    return torch.empty_like(loc), torch.empty((b, n, d), device=loc.device, dtype=torch.float32)


def _chain(loc: torch.Tensor, dsum: torch.Tensor, A: torch.Tensor, init: torch.Tensor | None,
           reverse: bool, bufs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """_chain_kernel: every segment's start state (forward) or incoming carry (reverse), (b, n_seg, n, d) fp32, from
    the LOCAL pass's results (loc, dsum) and the initial state / final-state gradient init (b, n, d) or None.
    bufs: its two output buffers (start, fin) from _chain_buffers."""
    b, n_seg, n, d = loc.shape
    start, fin = bufs
    total = b * d * n
    args = (loc, dsum, A, fin if init is None else init, start, fin, total, d, n_seg)
    _launch(_chain_kernel, (cdiv(total, 512),), args,
            dict(N=n, BLOCK=512, HAS_INIT=init is not None, REVERSE=reverse, num_warps=4))
    return start


def _forward(u, delta, A, B, C, D, z, delta_bias, h0, softplus: bool, save_ck: bool, ck_len: int | None = None):
    """Launch the forward kernels. Returns y, final_state (b, d, n) fp32 (a strided view), checkpoints
    (b, n_ck, n, d) or None.
    ck_len: checkpoint interval when save_ck (default: the backward config's, _ck_len)."""
    b, d, L = u.shape
    n = A.shape[1]
    NP = next_pow2(n)
    dev = u.device
    cfg = _pick_config(b, d, L, u.dtype, dev, backward=False)
    G, T, nw = min(cfg.get("G", 1), NP), cfg["T"], cfg["num_warps"]
    if not save_ck:
        ck_len = CK_DEFAULT                  # only rounds the segment length
    elif ck_len is None:
        ck_len = _ck_len(b, d, L, u.dtype, dev)
    seg, n_seg = _seg_len(L, cfg["n_seg"], ck_len)
    n_ck = cdiv(L, ck_len)
    f32 = dict(device=dev, dtype=torch.float32)
    y = torch.empty((b, d, L), device=dev, dtype=u.dtype)
    hout = torch.empty((b, n_seg, n, d), **f32)
    ck = torch.empty((b, n_ck, n, d), **f32) if save_ck else hout
    dummy = hout
    h0p = h0.transpose(1, 2).contiguous() if h0 is not None else None          # (b, n, d)
    zz = z if z is not None else u
    opt = (D if D is not None else dummy, zz, delta_bias if delta_bias is not None else dummy)
    if G == 1:
        BD = cfg.get("BLOCK_D", 32 * nw)
        assert ck_len % T == 0, (T, ck_len)            # checkpoints are written at tile starts
        B, C = _n_contig(B), _n_contig(C)
        kernel, check = _fwd_kernel, None
        bc = (B, C)
        common = dict(N=n, NP=NP, BLOCK_D=BD, T=T, HAS_D=D is not None, HAS_Z=z is not None,
                      HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, N_POLY=min(cfg["N_POLY"], n),
                      STAGES=cfg.get("STAGES", 0), num_warps=nw)
        sizes = ()
        strides = (u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(2),
                   C.stride(0), C.stride(2), zz.stride(0), zz.stride(1), y.stride(0), y.stride(1))
    else:
        BD = 32 * nw // G
        assert T % G == 0 and ck_len % T == 0, (T, G, ck_len)
        kernel, check = _fwd_split_kernel, G
        bc = (_bc_rows(B, NP, T), _bc_rows(C, NP, T))
        common = dict(N=n, NP=NP, G=G, BLOCK_D=BD, T=T, HAS_D=D is not None, HAS_Z=z is not None,
                      HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, N_POLY=min(cfg["N_POLY"], NP // G),
                      TC=min(cfg["TC"], T), BC_PRE=cfg["BC_PRE"], FMA_RCP=cfg["FMA_RCP"],
                      SHFL=os.environ.get("TRITON_INTERPRET") != "1", num_warps=nw)
        sizes = (bc[0].shape[1],)                                              # L_bc
        strides = (u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
                   y.stride(0), y.stride(1))
    grid = (cdiv(d, BD), b, n_seg)

    def launch(args, kw):
        if check is None:
            _launch(kernel, grid, args, kw)
        else:
            _launch_checked(kernel, grid, args, kw, check)

    h0_main, has_h0 = (h0p if h0p is not None else dummy), h0p is not None
    loc = dsum = dummy
    chain_in = False
    if n_seg > 1:
        hloc = torch.empty((b, n_seg, n, d), **f32)
        dsum = torch.empty((b, n_seg, d), **f32)
        chain_in = bool(cfg.get("CHAIN_IN")) and G == 1      # the main pass chains its start state itself
        bufs = None if chain_in else _chain_buffers(hloc)
        launch((u, delta, A, *bc, *opt, dummy, y, hloc, dsum, dummy, dummy, L, *sizes, d, seg, n_seg, 1, *strides),
               dict(CK=0, HAS_H0=False, LOCAL=True, **common))
        if chain_in:
            loc = hloc
        else:
            h0_main, has_h0, dsum = _chain(hloc, dsum, A, h0p, reverse=False, bufs=bufs), True, dummy
    main_kw = dict(CK=ck_len if save_ck else 0, HAS_H0=has_h0, LOCAL=False, **common)
    if chain_in:
        main_kw["CHAIN_IN"] = True
    launch((u, delta, A, *bc, *opt, h0_main, y, hout, dsum, ck, loc, L, *sizes, d, seg, n_seg, n_ck, *strides),
           main_kw)
    final = hout[:, -1].transpose(1, 2)          # a view: selective_scan_triton copies it only when asked for it
    return y, final, (ck if save_ck else None)


def _backward(dout, dfinal, u, delta, A, B, C, D, z, delta_bias, softplus: bool, ck, ck_len: int | None = None):
    """Launch the backward kernels. Returns du, ddelta, dz (input dtypes), dA, dB, dC, dD, dbias, dh0 (fp32; dh0 as
    (b, n, d)).
    ck: the forward's checkpoints, written every ck_len steps (default: this config's CK)."""
    B, C = _n_contig(B), _n_contig(C)
    b, d, L = u.shape
    n = A.shape[1]
    NP = next_pow2(n)
    dev = u.device
    cfg = _pick_config(b, d, L, u.dtype, dev, backward=True)
    BD, T, nw = cfg["BLOCK_D"], cfg["T"], cfg["num_warps"]
    ck_len = ck_len or cfg.get("CK", CK_DEFAULT)
    seg, n_seg = _seg_len(L, cfg["n_seg"], ck_len)
    n_ck = ck.shape[1]
    assert n_ck == cdiv(L, ck_len), (n_ck, L, ck_len)    # checkpoints written at another spacing
    n_db = cdiv(d, BD)
    f32 = dict(device=dev, dtype=torch.float32)
    du = torch.empty((b, d, L), device=dev, dtype=u.dtype)
    ddelta = torch.empty((b, d, L), device=dev, dtype=delta.dtype)
    dz = torch.empty((b, d, L), device=dev, dtype=z.dtype) if z is not None else None
    dBCt = torch.zeros((2, b, L, NP), **f32)     # dB, dC accumulated by atomics: one fill for both
    dBt, dCt = dBCt.unbind(0)
    dAp = torch.empty((b, n_seg, n, d), **f32)
    dDp = torch.empty((b, n_seg, d), **f32) if D is not None else None
    dbp = torch.empty((b, n_seg, d), **f32) if delta_bias is not None else None
    dh0 = torch.empty((b, n, d), **f32)
    dummy = dh0
    grid = (n_db, b, n_seg)
    zz = z if z is not None else u
    assert BD == 32 * nw, (BD, nw)         # one channel per lane: the dB / dC reduce-scatter works on lanes
    m0 = 2 * T * NP                        # dB and dC values per tile, summed over each warp's 32 channels
    mf = max(1, m0 // 32)                  # values per lane after the reduce-scatter
    lowb = (32 // m0).bit_length() - 1 if m0 < 32 else 0      # lane bits that only hold copies
    # per-element inputs loaded WB bytes per lane at a time (W steps), as 32-bit words of two steps when all are
    # 16-bit with even strides (PACK); gradients written W steps at a time (WIDE_ST) or per tile
    pe_in = (u, delta, zz, dout)
    sizes = {t.element_size() for t in pe_in}
    pack = (sizes == {2} and T % 2 == 0 and L % 2 == 0 and all(t.stride(0) % 2 == 0 and t.stride(1) % 2 == 0
                                                                and t.data_ptr() % 4 == 0 for t in pe_in))
    W = T
    if pack or sizes == {4}:
        W = min(max(T, cfg.get("WB", 2 * T) // max(sizes)), ck_len)
    WS = W if cfg.get("WIDE_ST", False) else T
    assert ck_len % W == 0 and W % T == 0, (ck_len, W, T)
    common = dict(N=n, NP=NP, BLOCK_D=BD, T=T, CK=ck_len, HAS_D=D is not None, HAS_Z=z is not None,
                  HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, N_POLY=min(cfg["N_POLY"], n),
                  SHFL=os.environ.get("TRITON_INTERPRET") != "1", MF=mf, LOWB=lowb, W=W, PACK=pack, WS=WS,
                  LA=max(1, min(cfg.get("LA", 1), W // T)), num_warps=nw)
    strides = (u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(2),
               C.stride(0), C.stride(2), zz.stride(0), zz.stride(1), dout.stride(0), dout.stride(1))
    pf = dfinal.float().transpose(1, 2).contiguous() if dfinal is not None else None     # (b, n, d)
    opt = (D if D is not None else dummy, zz, delta_bias if delta_bias is not None else dummy)
    pend, has_pend = (pf if pf is not None else dummy), pf is not None
    ploc = dsum = dummy
    chain_in = False
    scr = torch.empty((n_db * b * n_seg, ck_len // T, n, BD), **f32)   # before the first launch, as _chain_buffers
    if n_seg > 1:
        ploc = torch.empty((b, n_seg, n, d), **f32)
        dsum = torch.empty((b, n_seg, d), **f32)
        chain_in = bool(cfg.get("CHAIN_IN"))     # the main pass chains its incoming carry itself
        bufs = None if chain_in else _chain_buffers(ploc)
        _launch(_bwd_kernel, grid, (u, delta, A, B, C, *opt, dout, dummy, dummy, dummy, dummy, dummy, dummy, dummy,
                                    dummy, dummy, dummy, dummy, dummy, ploc, dsum, L, d, seg, n_seg, n_ck, *strides),
                dict(HAS_PEND=False, LOCAL=True, **common))
        if not chain_in:
            pend, has_pend, ploc, dsum = _chain(ploc, dsum, A, pf, reverse=True, bufs=bufs), True, dummy, dummy
    main_kw = dict(HAS_PEND=has_pend, LOCAL=False, **common)
    if chain_in:
        main_kw["CHAIN_IN"] = True
    _launch_checked(_bwd_kernel, grid,
                    (u, delta, A, B, C, *opt, dout, ck, pend, scr, du, ddelta, dz if dz is not None else dummy, dBt,
                     dCt, dAp, dDp if dDp is not None else dummy, dbp if dbp is not None else dummy, dh0, ploc, dsum,
                     L, d, seg, n_seg, n_ck, *strides),
                    main_kw, 32, redo=dBCt.zero_)
    dB = (dBt[:, :, :n] if NP > n else dBt).transpose(1, 2)
    dC = (dCt[:, :, :n] if NP > n else dCt).transpose(1, 2)
    dA = dAp.permute(0, 1, 3, 2).sum((0, 1))      # (d, n) contiguous, A's layout: autograd keeps it as it is
    dD = dDp.sum((0, 1)) if dDp is not None else None
    dbias = dbp.sum((0, 1)) if dbp is not None else None
    return du, ddelta, dz, dA, dB, dC, dD, dbias, dh0


def _as(x: torch.Tensor | None, dtype: torch.dtype | None, fmt=torch.preserve_format) -> torch.Tensor | None:
    """x in dtype (None if either is None); a cast writes memory format fmt, an unchanged dtype keeps x as it is."""
    if x is None or dtype is None:
        return None
    return x if x.dtype == dtype else x.to(dtype, memory_format=fmt)


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus):
        # only calls that need gradients come here (selective_scan_triton runs inference without the Function)
        ck_len = _ck_len(*u.shape, u.dtype, u.device)
        B, C = _n_contig(B), _n_contig(C)   # the backward needs B, C with d_state contiguous: copy them once, here
        y, final, ck = _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, True, ck_len)
        ctx.set_materialize_grads(False)    # an unused output's gradient stays None (no zero tensors to read)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ck)
        ctx.softplus = softplus
        ctx.ck_len = ck_len
        ctx.in_dtypes = tuple(t.dtype if t is not None else None for t in (A, B, C, D, delta_bias, initial_state))
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        u, delta, A, B, C, D, z, delta_bias, ck = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        dy = _lastdim_contig(dy)
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0 = _backward(dy, dfinal, u, delta, A, B, C, D, z, delta_bias,
                                                               ctx.softplus, ck, ctx.ck_len)
        tA, tB, tC, tD, tb, th = ctx.in_dtypes
        # dB / dC: a cast copies anyway, so it writes B's (batch, d_state, L) layout (the engine would otherwise
        # copy a leaf's gradient once more into that layout); fp32 ones stay views
        return (du, ddelta, _as(dA, tA), _as(dB, tB, torch.contiguous_format), _as(dC, tC, torch.contiguous_format),
                _as(dD, tD), dz, _as(dbias, tb),
                _as(dh0.transpose(1, 2), th) if th is not None else None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, return_final_state=False):
    """Selective scan on the GPU (or on CPU tensors under TRITON_INTERPRET=1); differentiable.

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L); D, delta_bias: (d_inner,);
    initial_state: (batch, d_inner, d_state). Returns y (batch, d_inner, L) in u's dtype, and with
    return_final_state also the final state (batch, d_inner, d_state) fp32. Arithmetic and state are fp32.
    """
    if u.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("selective_scan_triton: needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    args = [u, delta, A, B, C, D, z, delta_bias, initial_state]
    orig_dtype = u.dtype
    if any(t is not None and t.dtype == torch.float64 for t in args):
        args = [t.float() if t is not None and t.dtype == torch.float64 else t for t in args]
    u, delta, A, B, C, D, z, delta_bias, initial_state = args
    u, delta, z = (_lastdim_contig(t) for t in (u, delta, z))
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    if initial_state is not None:
        initial_state = initial_state.float()
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, final = _SelectiveScanFn.apply(*tensors, bool(delta_softplus))
    else:       # inference (scoring): the kernels without the autograd Function around them (less host time)
        y, final, _ = _forward(*tensors, bool(delta_softplus), False)
    if y.dtype != orig_dtype:
        y = y.to(orig_dtype)
    return (y, final.contiguous()) if return_final_state else y


def _fit_exp2_poly(degree: int = 5, iters: int = 200) -> list[float]:
    """How the _P* coefficients were made: p(f) = 1 + sum_k c_k f^k fitted to 2^f on [-1/2, 1/2] for minimal
    maximum relative error (least squares with Lawson reweighting). Returns [c_degree, ..., c_1]."""
    import numpy as np

    f = np.linspace(-0.5, 0.5, 20001)
    target = np.exp2(f)
    V = np.stack([f**k for k in range(1, degree + 1)], 1) / target[:, None]
    rhs = 1.0 - 1.0 / target
    w = np.ones_like(f)
    for _ in range(iters):
        sw = np.sqrt(w)
        coef, *_ = np.linalg.lstsq(V * sw[:, None], rhs * sw, rcond=None)
        w = w * np.abs(V @ coef - rhs)
        w /= w.sum()
    return [float(c) for c in coef[::-1]]


__all__ = ["selective_scan_triton"]
