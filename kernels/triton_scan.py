"""Selective scan (Mamba-1) in Triton: forward and backward, chunked over L, exact streaming.

Shapes (ROM_SPEC section 1): u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
D, delta_bias: (d_inner,); initial_state / final_state: (batch, d_inner, d_state), fp32.
Activations may be fp32, bf16 or fp16; the state and all arithmetic are fp32. fp64 inputs are computed in fp32.

Design (why it is shaped like this):
- One program owns BLOCK_D channels x all d_state states of one batch row and walks time in tiles of T steps.
  A tile of u / delta / z (channels x T, contiguous in time) is loaded once, split in registers into T per-step
  vectors, and the recurrence is unrolled over the T steps: per state and step that is one exp2 and ~4 fp32
  ops, with no shuffles (the d_state axis lives inside a thread, so <h, C> is an in-thread sum).
- The next tile's inputs are loaded one iteration ahead (carried in registers), so DRAM latency overlaps the
  current tile's arithmetic: the first version without this ran at 2-6x below its instruction-count bound.
- exp(delta * A) = exp2(delta * (A * log2 e)): log2 e is folded into A once. The first N_POLY states of every
  channel compute exp2 with an FMA polynomial instead of the special-function unit, so both units work (at
  d_state = 16 the exponentials bind; ROM_SPEC 5).
- Long sequences and small batch x d_inner are split into segments that run in parallel: pass 1 scans every
  segment from a zero state (and sums delta), a tiny kernel chains the segment end states
  (h_start[s+1] = exp(A * sum delta_s) h_start[s] + h_local[s]), pass 2 rescans each segment from its true
  start state and writes y. With one segment pass 1 is skipped.
- Backward keeps only states at chunk boundaries (every CK steps, written by the forward pass) and recomputes
  inside each chunk: phase A walks the chunk forward and parks the state at every tile start in a small
  per-program scratch buffer (L2-resident), phase B walks the tiles backwards, recomputes the T steps of the
  tile, and runs the reverse recurrence for g = dL/dh (carried as p = a * g between steps). Segments run in
  parallel here too: a reverse pass 1 computes each segment's carry from a zero incoming carry and the same
  chaining kernel combines them.
- dB / dC (sums over channels) are reduced inside a program, then added across channel blocks with fp32
  atomics (summation order, hence the last bits, can vary run to run). dA, dD, d(delta_bias) are accumulated
  in registers and written per (batch, segment).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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
def _split_t(x, T: tl.constexpr):
    """(R, T) -> tuple of T tensors (R,), in time order. Free in registers when T is inside a thread."""
    if T == 1:
        return (tl.reshape(x, (x.shape[0],)),)
    elif T == 2:
        a, b = tl.split(x)
        return (a, b)
    else:
        x3 = tl.reshape(x, (x.shape[0], T // 2, 2))
        ev, od = tl.split(x3)
        es = _split_t(ev, T // 2)
        os_ = _split_t(od, T // 2)
        res = ()
        for i in tl.static_range(T // 2):
            res = res + (es[i], os_[i])
        return res


@triton.jit
def _join_t(xs, T: tl.constexpr):
    """Inverse of _split_t: tuple of T tensors (R,) -> (R, T)."""
    if T == 1:
        return tl.reshape(xs[0], (xs[0].shape[0], 1))
    elif T == 2:
        return tl.join(xs[0], xs[1])
    else:
        ev = ()
        od = ()
        for i in tl.static_range(T // 2):
            ev = ev + (xs[2 * i],)
            od = od + (xs[2 * i + 1],)
        e = _join_t(ev, T // 2)
        o = _join_t(od, T // 2)
        return tl.reshape(tl.join(e, o), (e.shape[0], T))


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
    s = tl.fdiv(e, 2.0 + e, ieee_rounding=False)
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
def _load_tile(u_row, dt_row, z_row, o_row, B_b, C_b, t0, L, s_Bt, s_Ct, d_ok, offs_t,
               N: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, W_U: tl.constexpr, W_Z: tl.constexpr,
               W_O: tl.constexpr, W_B: tl.constexpr, W_C: tl.constexpr):
    """Raw (storage dtype) inputs of the tile of steps t0..t0+T-1: (u, delta, z, dout) as (D, T) and B, C as
    (T*NP,) vectors, index i*NP + n (memory (t, n), n contiguous). Steps outside [0, L) read as 0; inputs not
    asked for (W_* false) are placeholders. Issued one tile ahead of their use, so memory latency overlaps compute."""
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
    return u, dt, z, o, Bv, Cv


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


# ------------------------------------------------------------------------------------------- forward kernel
@triton.jit(do_not_specialize=["n_seg", "n_ck"])
def _fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, bias_ptr,
    h0_ptr, y_ptr, hout_ptr, dsum_ptr, ck_ptr,
    L, d_inner, seg_len, n_seg, n_ck,
    s_ub, s_ud, s_tb, s_td, s_Bb, s_Bt, s_Cb, s_Ct, s_zb, s_zd, s_yb, s_yd,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, CK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, LOCAL: tl.constexpr, N_POLY: tl.constexpr,
):
    """One (channel block, batch row, segment). LOCAL: zero start, write end state + sum(delta), no y.

    State buffers are (batch, n_seg, N, d_inner) fp32 (h0: start states in, hout: end states out);
    dsum: (batch, n_seg, d_inner); ck: (batch, n_ck, N, d_inner), the state before step c * CK (when CK > 0).
    B, C are read with d_state contiguous (strides s_Bt / s_Ct over time).
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

    st_row = (b64 * n_seg + pid_s) * N
    if HAS_H0:
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
    nxt = _load_tile(u_row, dt_row, z_row, dt_row, B_b, C_b, t_start, L, s_Bt, s_Ct, d_ok, offs_t,
                     N, NP, T, True, W_Z, False, True, W_C)
    for t0 in range(t_start, t_end, T):
        cur = nxt
        nxt = _load_tile(u_row, dt_row, z_row, dt_row, B_b, C_b, t0 + T, L, s_Bt, s_Ct, d_ok, offs_t,
                         N, NP, T, True, W_Z, False, True, W_C)
        if CK > 0:
            if t0 % CK == 0:
                _store_state(ck_ptr, (b64 * n_ck + t0 // CK) * N, d_inner, offs_d, d_ok, h, N)
        t = t0 + offs_t
        m2 = d_ok[:, None] & (t < L)[None, :]                     # (D, T)
        dl, raw = _delta(cur[1], m2, bias, HAS_BIAS, SOFTPLUS)
        u = cur[0].to(tl.float32)
        dls = _split_t(dl, T)
        dus = _split_t(dl * u, T)
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
            y = _join_t(ys, T)
            if HAS_D:
                y += Dv[:, None] * u
            if HAS_Z:
                zt = cur[2].to(tl.float32)
                y = y * (zt * _sigmoid(zt))
            tl.store(y_row + t[None, :], y.to(y_ptr.dtype.element_ty), mask=m2)
    _store_state(hout_ptr, st_row, d_inner, offs_d, d_ok, h, N)
    if LOCAL:
        tl.store(dsum_ptr + (b64 * n_seg + pid_s) * d_inner + offs_d, dsum, mask=d_ok)


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
@triton.jit(do_not_specialize=["n_seg", "n_ck"])
def _bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dv_ptr, z_ptr, bias_ptr, dout_ptr,
    ck_ptr, pend_ptr, scr_ptr,
    du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dAp_ptr, dDp_ptr, dbp_ptr, dh0_ptr, ploc_ptr, dsum_ptr,
    L, d_inner, seg_len, n_seg, n_ck,
    s_ub, s_ud, s_tb, s_td, s_Bb, s_Bt, s_Cb, s_Ct, s_zb, s_zd, s_ob, s_od,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, CK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_PEND: tl.constexpr, LOCAL: tl.constexpr, N_POLY: tl.constexpr,
):
    """Backward of one (channel block, batch row, segment).

    Recurrence: h_t = a_t h_{t-1} + b_t; g_t = dL/dh_t = C_t dy_t + p_{t+1}; p_t = a_t g_t (carried backwards).
    LOCAL: reverse pass from a zero carry: writes ploc (the carry leaving the segment's start when no gradient
    enters at its end) and sum(delta). Otherwise the full backward from the incoming carry pend
    (batch, n_seg, N, d_inner): du / ddelta / dz (batch, d_inner, L); dB, dC (batch, L, NP) fp32, accumulated
    over channel blocks with atomic adds (so their last bits depend on the order blocks finish);
    dA partials (batch, n_seg, N, d_inner); dD / d(delta_bias) partials (batch, n_seg, d_inner); dh0
    (batch, N, d_inner), written by segment 0.
    """
    KT: tl.constexpr = CK // T
    K: tl.constexpr = T * NP
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_db = tl.num_programs(0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
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

    st_row = (b64 * n_seg + pid_s) * N
    if HAS_PEND:
        p = _load_state(pend_ptr, st_row, d_inner, offs_d, d_ok, N)
    else:
        p = _zeros_state(BLOCK_D, N)

    u_row = u_ptr + b64 * s_ub + d64[:, None] * s_ud
    dt_row = dt_ptr + b64 * s_tb + d64[:, None] * s_td
    o_row = dout_ptr + b64 * s_ob + d64[:, None] * s_od
    B_b = B_ptr + b64 * s_Bb
    C_b = C_ptr + b64 * s_Cb
    z_row = z_ptr + b64 * s_zb + d64[:, None] * s_zd

    t_start = pid_s * seg_len
    t_end = tl.minimum(t_start + seg_len, L)
    n_tiles = (t_end - t_start + T - 1) // T

    if LOCAL:
        dsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        nxt = _load_tile(u_row, dt_row, z_row, o_row, B_b, C_b, t_start + (n_tiles - 1) * T, L, s_Bt, s_Ct, d_ok,
                         offs_t, N, NP, T, False, HAS_Z, True, False, True)
        for k in range(n_tiles):
            t0 = t_start + (n_tiles - 1 - k) * T
            cur = nxt
            nxt = _load_tile(u_row, dt_row, z_row, o_row, B_b, C_b, t0 - T, L, s_Bt, s_Ct, d_ok, offs_t,
                             N, NP, T, False, HAS_Z, True, False, True)
            t = t0 + offs_t
            m2 = d_ok[:, None] & (t < L)[None, :]
            dl, raw = _delta(cur[1], m2, bias, HAS_BIAS, SOFTPLUS)
            dsum += tl.sum(dl, axis=1)
            dy = cur[3].to(tl.float32)
            if HAS_Z:
                zt = cur[2].to(tl.float32)
                dy = dy * (zt * _sigmoid(zt))
            Cs = _scalars(cur[5], T * NP)
            dls = _split_t(dl, T)
            dys = _split_t(dy, T)
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
        scr_base = scr_ptr + pid_lin.to(tl.int64) * (KT * N * BLOCK_D) + tl.arange(0, BLOCK_D)
        dB_b = dB_ptr + b64 * L * NP
        dC_b = dC_ptr + b64 * L * NP
        g_row = (b64 * d_inner + d64[:, None]) * L                 # gradient outputs are contiguous
        idx_k = tl.arange(0, K)
        dA_acc = _zeros_state(BLOCK_D, N)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        n_chunks = (t_end - t_start + CK - 1) // CK
        for c in range(n_chunks):
            c_start = t_start + (n_chunks - 1 - c) * CK
            c_tiles = (tl.minimum(c_start + CK, t_end) - c_start + T - 1) // T
            h = _load_state(ck_ptr, (b64 * n_ck + c_start // CK) * N, d_inner, offs_d, d_ok, N)
            # phase A: forward through the chunk, parking the state at every tile start
            nxt = _load_tile(u_row, dt_row, z_row, o_row, B_b, C_b, c_start, L, s_Bt, s_Ct, d_ok, offs_t,
                             N, NP, T, True, False, False, True, False)
            for k in range(c_tiles):
                for n in tl.static_range(N):
                    tl.store(scr_base + (k * N + n) * BLOCK_D, h[n])
                t0 = c_start + k * T
                cur = nxt
                nxt = _load_tile(u_row, dt_row, z_row, o_row, B_b, C_b, t0 + T, L, s_Bt, s_Ct, d_ok, offs_t,
                                 N, NP, T, True, False, False, True, False)
                t = t0 + offs_t
                m2 = d_ok[:, None] & (t < L)[None, :]
                dl, raw = _delta(cur[1], m2, bias, HAS_BIAS, SOFTPLUS)
                u = cur[0].to(tl.float32)
                Bs = _scalars(cur[4], T * NP)
                h = _tile_steps(h, A2, _split_t(dl, T), _split_t(dl * u, T), Bs, N, NP, T, N_POLY)
            tl.debug_barrier()
            # phase B: the chunk's tiles in reverse (inputs and parked state of the next tile prefetched)
            nxt = _load_tile(u_row, dt_row, z_row, o_row, B_b, C_b, c_start + (c_tiles - 1) * T, L, s_Bt, s_Ct,
                             d_ok, offs_t, N, NP, T, True, HAS_Z, True, True, True)
            h_nxt = ()
            for n in tl.static_range(N):
                h_nxt = h_nxt + (tl.load(scr_base + ((c_tiles - 1) * N + n) * BLOCK_D),)
            for kk in range(c_tiles):
                k = c_tiles - 1 - kk
                t0 = c_start + k * T
                cur = nxt
                h = h_nxt
                nxt = _load_tile(u_row, dt_row, z_row, o_row, B_b, C_b, t0 - T, L, s_Bt, s_Ct, d_ok, offs_t,
                                 N, NP, T, True, HAS_Z, True, True, True)
                k_prev = tl.maximum(k - 1, 0)                          # at k = 0 a harmless reload of slot 0
                h_nxt = ()
                for n in tl.static_range(N):
                    h_nxt = h_nxt + (tl.load(scr_base + (k_prev * N + n) * BLOCK_D),)
                t = t0 + offs_t
                m2 = d_ok[:, None] & (t < L)[None, :]
                dl, raw = _delta(cur[1], m2, bias, HAS_BIAS, SOFTPLUS)
                u = cur[0].to(tl.float32)
                dout = cur[3].to(tl.float32)
                Bs = _scalars(cur[4], T * NP)
                Cs = _scalars(cur[5], T * NP)
                if HAS_Z:
                    zt = cur[2].to(tl.float32)
                    sz = _sigmoid(zt)
                    dy = dout * (zt * sz)
                else:
                    dy = dout
                dls = _split_t(dl, T)
                us = _split_t(u, T)
                dus = _split_t(dl * u, T)
                dys = _split_t(dy, T)
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
                # sums over this block's channels: (D, T*NP) -> (T*NP,), index i*NP + n
                dBv = tl.sum(_join_t(dB_cols, K), axis=0)
                dCv = tl.sum(_join_t(dC_cols, K), axis=0)
                k_ok = (t0 + idx_k // NP) < L
                tl.atomic_add(dB_b + t0 * NP + idx_k, dBv, mask=k_ok, sem="relaxed")
                tl.atomic_add(dC_b + t0 * NP + idx_k, dCv, mask=k_ok, sem="relaxed")
                du = _join_t(du_out, T)
                ddl = _join_t(ddl_out, T)
                if HAS_D:
                    du += Dv[:, None] * dy
                    dD_acc += tl.sum(dy * u, axis=1)
                if SOFTPLUS:
                    ddl = ddl * _sigmoid(raw)
                ddl = tl.where(m2, ddl, 0.0)
                db_acc += tl.sum(ddl, axis=1)
                g_off = g_row + t[None, :]
                tl.store(du_ptr + g_off, du.to(du_ptr.dtype.element_ty), mask=m2)
                tl.store(ddt_ptr + g_off, ddl.to(ddt_ptr.dtype.element_ty), mask=m2)
                if HAS_Z:
                    y = _join_t(ys, T)
                    if HAS_D:
                        y += Dv[:, None] * u
                    dz = dout * y * (sz * (1.0 + zt * (1.0 - sz)))
                    tl.store(dz_ptr + g_off, dz.to(dz_ptr.dtype.element_ty), mask=m2)
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


def _pick_config(b: int, d: int, L: int, dtype: torch.dtype, device: torch.device, backward: bool) -> dict:
    """Block shapes and the number of parallel segments. Overridable for tuning via _CONFIG_OVERRIDE."""
    block_d, num_warps = (32, 1)
    T = 2 if backward else 4          # backward keeps T steps of states and decays live: T = 4 spills registers
    warps = b * triton.cdiv(d, block_d) * num_warps
    sms = _num_sms(device)
    # The loop is latency-bound below ~6 warps per SM (measured on an H200: 8 x 1536 ran fastest with 4-6
    # segments, 1 x 4096 x 1M with 10, 8 x 4096 with 1). A segment pre-pass costs ~3/4 of a forward, so split only
    # when short of warps, aiming at ~12 per SM, and keep segments >= 4 chunks long.
    n_seg = 1 if warps >= 6 * sms else triton.cdiv(12 * sms, warps)
    n_seg = max(1, min(n_seg, triton.cdiv(L, 4 * CK_DEFAULT)))
    cfg = {"BLOCK_D": block_d, "T": T, "num_warps": num_warps, "n_seg": n_seg, "N_POLY": 2}
    cfg.update(_CONFIG_OVERRIDE.get("bwd" if backward else "fwd", {}))
    return cfg


_CONFIG_OVERRIDE: dict[str, dict] = {}


def _lastdim_contig(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    return x if x.stride(-1) == 1 else x.contiguous()


def _seg_len(L: int, n_seg: int, ck: int) -> tuple[int, int]:
    seg = triton.cdiv(triton.cdiv(L, n_seg), ck) * ck
    return seg, triton.cdiv(L, seg)


def _n_contig(x: torch.Tensor) -> torch.Tensor:
    """B / C (batch, d_state, L) as a view whose d_state axis is contiguous (memory (batch, L, d_state)): each time
    step's d_state values are one vectorised load. Free when B, C come as transposed views of x_proj output."""
    return x if x.stride(1) == 1 else x.transpose(1, 2).contiguous().transpose(1, 2)


def _forward(u, delta, A, B, C, D, z, delta_bias, h0, softplus: bool, save_ck: bool):
    """Launch the forward kernels. Returns y, final_state (b, d, n) fp32, checkpoints (b, n_ck, n, d) or None."""
    b, d, L = u.shape
    n = A.shape[1]
    NP = triton.next_power_of_2(n)
    dev = u.device
    cfg = _pick_config(b, d, L, u.dtype, dev, backward=False)
    BD, T, nw = cfg["BLOCK_D"], cfg["T"], cfg["num_warps"]
    ck_len = CK_DEFAULT
    seg, n_seg = _seg_len(L, cfg["n_seg"], ck_len)
    n_ck = triton.cdiv(L, ck_len)
    f32 = dict(device=dev, dtype=torch.float32)
    y = torch.empty((b, d, L), device=dev, dtype=u.dtype)
    hout = torch.empty((b, n_seg, n, d), **f32)
    ck = torch.empty((b, n_ck, n, d), **f32) if save_ck else hout
    dummy = hout
    h0p = h0.transpose(1, 2).contiguous() if h0 is not None else None          # (b, n, d)
    grid = (triton.cdiv(d, BD), b, n_seg)
    zz = z if z is not None else u
    common = dict(N=n, NP=NP, BLOCK_D=BD, T=T, HAS_D=D is not None, HAS_Z=z is not None,
                  HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, N_POLY=min(cfg["N_POLY"], n), num_warps=nw)
    strides = (u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(2),
               C.stride(0), C.stride(2), zz.stride(0), zz.stride(1), y.stride(0), y.stride(1))
    opt = (D if D is not None else dummy, zz, delta_bias if delta_bias is not None else dummy)
    if n_seg > 1:
        hloc = torch.empty((b, n_seg, n, d), **f32)
        dsum = torch.empty((b, n_seg, d), **f32)
        _fwd_kernel[grid](u, delta, A, B, C, *opt, dummy, y, hloc, dsum, dummy, L, d, seg, n_seg, 1, *strides,
                          CK=0, HAS_H0=False, LOCAL=True, **common)
        hstart = torch.empty((b, n_seg, n, d), **f32)
        fin = torch.empty((b, n, d), **f32)
        total = b * d * n
        _chain_kernel[(triton.cdiv(total, 512),)](hloc, dsum, A, h0p if h0p is not None else dummy, hstart, fin,
                                                  total, d, n_seg, N=n, BLOCK=512, HAS_INIT=h0p is not None,
                                                  REVERSE=False, num_warps=4)
        h0_main, has_h0 = hstart, True
    else:
        h0_main, has_h0 = (h0p if h0p is not None else dummy), h0p is not None
    _fwd_kernel[grid](u, delta, A, B, C, *opt, h0_main, y, hout, dummy, ck, L, d, seg, n_seg, n_ck, *strides,
                      CK=ck_len if save_ck else 0, HAS_H0=has_h0, LOCAL=False, **common)
    final = hout[:, -1].transpose(1, 2).contiguous()
    return y, final, (ck if save_ck else None)


def _backward(dout, dfinal, u, delta, A, B, C, D, z, delta_bias, softplus: bool, ck):
    """Launch the backward kernels. Returns du, ddelta, dz (input dtypes), dA, dB, dC, dD, dbias, dh0 (fp32)."""
    b, d, L = u.shape
    n = A.shape[1]
    NP = triton.next_power_of_2(n)
    dev = u.device
    cfg = _pick_config(b, d, L, u.dtype, dev, backward=True)
    BD, T, nw = cfg["BLOCK_D"], cfg["T"], cfg["num_warps"]
    ck_len = CK_DEFAULT
    seg, n_seg = _seg_len(L, cfg["n_seg"], ck_len)
    n_ck = ck.shape[1]
    n_db = triton.cdiv(d, BD)
    f32 = dict(device=dev, dtype=torch.float32)
    du = torch.empty((b, d, L), device=dev, dtype=u.dtype)
    ddelta = torch.empty((b, d, L), device=dev, dtype=delta.dtype)
    dz = torch.empty((b, d, L), device=dev, dtype=z.dtype) if z is not None else None
    dBt = torch.zeros((b, L, NP), **f32)
    dCt = torch.zeros((b, L, NP), **f32)
    dAp = torch.empty((b, n_seg, n, d), **f32)
    dDp = torch.empty((b, n_seg, d), **f32) if D is not None else None
    dbp = torch.empty((b, n_seg, d), **f32) if delta_bias is not None else None
    dh0 = torch.empty((b, n, d), **f32)
    dummy = dh0
    grid = (n_db, b, n_seg)
    zz = z if z is not None else u
    common = dict(N=n, NP=NP, BLOCK_D=BD, T=T, CK=ck_len, HAS_D=D is not None, HAS_Z=z is not None,
                  HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, N_POLY=min(cfg["N_POLY"], n), num_warps=nw)
    strides = (u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(2),
               C.stride(0), C.stride(2), zz.stride(0), zz.stride(1), dout.stride(0), dout.stride(1))
    pf = dfinal.float().transpose(1, 2).contiguous() if dfinal is not None else None     # (b, n, d)
    opt = (D if D is not None else dummy, zz, delta_bias if delta_bias is not None else dummy)
    if n_seg > 1:
        ploc = torch.empty((b, n_seg, n, d), **f32)
        dsum = torch.empty((b, n_seg, d), **f32)
        _bwd_kernel[grid](u, delta, A, B, C, *opt, dout, dummy, dummy, dummy,
                          dummy, dummy, dummy, dummy, dummy, dummy, dummy, dummy, dummy, ploc, dsum,
                          L, d, seg, n_seg, n_ck, *strides, HAS_PEND=False, LOCAL=True, **common)
        pend = torch.empty((b, n_seg, n, d), **f32)
        fin = torch.empty((b, n, d), **f32)
        total = b * d * n
        _chain_kernel[(triton.cdiv(total, 512),)](ploc, dsum, A, pf if pf is not None else dummy, pend, fin,
                                                  total, d, n_seg, N=n, BLOCK=512, HAS_INIT=pf is not None,
                                                  REVERSE=True, num_warps=4)
        has_pend = True
    else:
        pend, has_pend = (pf if pf is not None else dummy), pf is not None
    scr = torch.empty((n_db * b * n_seg, ck_len // T, n, BD), **f32)
    _bwd_kernel[grid](u, delta, A, B, C, *opt, dout, ck, pend, scr,
                      du, ddelta, dz if dz is not None else dummy, dBt, dCt, dAp,
                      dDp if dDp is not None else dummy, dbp if dbp is not None else dummy, dh0, dummy, dummy,
                      L, d, seg, n_seg, n_ck, *strides, HAS_PEND=has_pend, LOCAL=False, **common)
    dB = dBt[:, :, :n].transpose(1, 2)
    dC = dCt[:, :, :n].transpose(1, 2)
    dA = dAp.sum((0, 1)).t()
    dD = dDp.sum((0, 1)) if dDp is not None else None
    dbias = dbp.sum((0, 1)) if dbp is not None else None
    return du, ddelta, dz, dA, dB, dC, dD, dbias, dh0.transpose(1, 2)


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus):
        save = any(ctx.needs_input_grad)
        y, final, ck = _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, save)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ck)
            ctx.softplus = softplus
            ctx.in_dtypes = tuple(t.dtype if t is not None else None
                                  for t in (A, B, C, D, delta_bias, initial_state))
        ctx.mark_non_differentiable()
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        u, delta, A, B, C, D, z, delta_bias, ck = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        dy = _lastdim_contig(dy)
        du, ddelta, dz, dA, dB, dC, dD, dbias, dh0 = _backward(dy, dfinal, u, delta, A, B, C, D, z, delta_bias,
                                                               ctx.softplus, ck)
        tA, tB, tC, tD, tb, th = ctx.in_dtypes
        return (du, ddelta, dA.to(tA), dB.to(tB), dC.to(tC), dD.to(tD) if dD is not None else None, dz,
                dbias.to(tb) if dbias is not None else None, dh0.to(th) if th is not None else None, None)


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
    B, C = _n_contig(B), _n_contig(C)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    if initial_state is not None:
        initial_state = initial_state.float()
    y, final = _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus))
    if y.dtype != orig_dtype:
        y = y.to(orig_dtype)
    return (y, final) if return_final_state else y


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
