"""Triton kernels of kernels.route (top-1 routing), a tile of BT tokens x all E experts (padded to EP) per program.

Forward, two launches: ``_route_fwd_kernel`` takes each token's softmax, its expert (argmax) and gate (1 / the
softmax denominator: the chosen logit is the maximum), and per tile the expert histogram, the probability sums and
the sum of logsumexp^2; between them one torch cumsum adds the histograms up over the tiles, so that
``_route_place_kernel`` reads two rows of it per tile (the tiles before this one, all tiles): where this tile's tokens
of every expert start in the sorted order. It ranks its tokens within an expert by a cumulative sum (a stable
counting sort: the order torch's stable argsort gives), and writes each token's sorted position and the slot's token
and gate. Its first program also writes the counts, the grouped matmul's group ends and the two loss sums, adding the
tiles' partial sums in tile order (deterministic). Backward, one launch: the softmax is recomputed from the logits and
    d logits = p * (dP - <p, dP>) + 2 dz * lse * p,   dP[e] = d prob_sum[e] + [e == expert] * d gate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._host import cdiv, next_pow2
from kernels.triton_scan import _launch  # Triton's launcher costs tens of us of host time per call; see there

_TILE, _CH, _WARPS = 4096, 32, 4     # tokens x padded experts per program; tiles' loss partials summed CH at a time


@triton.jit
def _softmax_rows(logits_ptr, tt, ee, tm, em, E):
    """Rows tt of the logits: probabilities (BT, EP) (0 on padding), logsumexp (BT,), 1 / denominator, argmax."""
    lg = tl.load(logits_ptr + tt[:, None] * E + ee[None, :], mask=tm[:, None] & em[None, :], other=float("-inf"))
    m = tl.where(tm, tl.max(lg, axis=1), 0.0)
    ex = tl.exp(lg - m[:, None])
    s = tl.where(tm, tl.sum(ex, axis=1), 1.0)
    inv = 1.0 / s
    # NaN ranks above everything (as in torch.topk): Triton's argmax compares with > and ==, which NaN fails either
    # way, so the threads holding one row could disagree on its expert (and the histogram on the stored choice)
    return ex * inv[:, None], m + tl.log(s), inv, tl.argmax(tl.where(lg != lg, float("inf"), lg), axis=1)


@triton.jit
def _route_fwd_kernel(logits_ptr, top_ptr, gate_ptr, hist_ptr, psum_ptr, zpart_ptr, N, E, EP: tl.constexpr,
                      BT: tl.constexpr):
    pid = tl.program_id(0)
    tt = pid.to(tl.int64) * BT + tl.arange(0, BT)
    ee = tl.arange(0, EP)
    tm, em = tt < N, ee < E
    p, lse, gate, top = _softmax_rows(logits_ptr, tt, ee, tm, em, E)
    tl.store(top_ptr + tt, top.to(tl.int64), mask=tm)
    tl.store(gate_ptr + tt, gate, mask=tm)
    onehot = ((ee[None, :] == top[:, None]) & tm[:, None]).to(tl.int32)
    tl.store(hist_ptr + pid * EP + ee, tl.sum(onehot, axis=0))
    tl.store(psum_ptr + pid * EP + ee, tl.sum(tl.where(tm[:, None], p, 0.0), axis=0))
    tl.store(zpart_ptr + pid, tl.sum(tl.where(tm, lse * lse, 0.0), axis=0))


@triton.jit
def _route_place_kernel(top_ptr, gate_ptr, cum_ptr, psum_ptr, zpart_ptr, pos_ptr, tos_ptr, gos_ptr, counts_ptr,
                        offs_ptr, probsum_ptr, zsum_ptr, N, E, NB, EP: tl.constexpr, BT: tl.constexpr,
                        CH: tl.constexpr):
    pid = tl.program_id(0)
    ee = tl.arange(0, EP)
    em = ee < E
    total = tl.load(cum_ptr + (NB - 1) * EP + ee)                      # cum: the tiles' histograms summed over tiles
    before = tl.load(cum_ptr + tl.maximum(pid - 1, 0) * EP + ee) * (pid > 0).to(tl.int32)
    ends = tl.cumsum(total, axis=0)
    start = ends - total + before            # where this tile's first token of each expert goes
    if pid == 0:
        ps = tl.zeros((EP,), dtype=tl.float32)
        zs = tl.zeros((CH,), dtype=tl.float32)
        for b0 in range(0, NB, CH):
            bb = b0 + tl.arange(0, CH)
            ps += tl.sum(tl.load(psum_ptr + bb[:, None] * EP + ee[None, :], mask=(bb < NB)[:, None], other=0.0),
                         axis=0)
            zs += tl.load(zpart_ptr + bb, mask=bb < NB, other=0.0)
        tl.store(counts_ptr + ee, total.to(tl.int64), mask=em)
        tl.store(offs_ptr + ee, ends, mask=em)
        tl.store(probsum_ptr + ee, ps, mask=em)
        tl.store(zsum_ptr, tl.sum(zs, axis=0))
    tt = pid.to(tl.int64) * BT + tl.arange(0, BT)
    tm = tt < N
    top = tl.load(top_ptr + tt, mask=tm, other=0).to(tl.int32)
    onehot = ((ee[None, :] == top[:, None]) & tm[:, None]).to(tl.int32)
    rank = tl.cumsum(onehot, axis=0)         # tokens of each expert in this tile up to and including this one
    pos = tl.sum(tl.where(onehot == 1, start[None, :] + rank - 1, 0), axis=1).to(tl.int64)
    tl.store(pos_ptr + tt, pos, mask=tm)
    tl.store(tos_ptr + pos, tt, mask=tm)
    tl.store(gos_ptr + pos, tl.load(gate_ptr + tt, mask=tm, other=0.0), mask=tm)


@triton.jit
def _route_bwd_kernel(logits_ptr, top_ptr, pos_ptr, dgos_ptr, dps_ptr, dz_ptr, dlogits_ptr, N, E,
                      HAS_DG: tl.constexpr, HAS_DP: tl.constexpr, HAS_DZ: tl.constexpr, EP: tl.constexpr,
                      BT: tl.constexpr):
    tt = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    ee = tl.arange(0, EP)
    tm, em = tt < N, ee < E
    p, lse, _, _ = _softmax_rows(logits_ptr, tt, ee, tm, em, E)
    dp = tl.zeros((BT, EP), dtype=tl.float32)
    if HAS_DP:
        dp += tl.load(dps_ptr + ee, mask=em, other=0.0)[None, :]
    if HAS_DG:
        dg = tl.load(dgos_ptr + tl.load(pos_ptr + tt, mask=tm, other=0), mask=tm, other=0.0)
        top = tl.load(top_ptr + tt, mask=tm, other=0)
        dp += tl.where(ee[None, :] == top[:, None], dg[:, None], 0.0)
    dl = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    if HAS_DZ:
        dl += (2.0 * tl.load(dz_ptr)) * lse[:, None] * p
    tl.store(dlogits_ptr + tt[:, None] * E + ee[None, :], dl, mask=tm[:, None] & em[None, :])


def _tiles(N: int, E: int) -> tuple[int, int, int]:
    EP = max(2, next_pow2(E))
    BT = max(16, min(1024, _TILE // EP))
    return EP, BT, cdiv(N, BT)


class RouteTop1(torch.autograd.Function):
    """kernels.route.route_slots at k = 1 on the Triton kernels; outputs in the order of kernels.route.Routing."""

    @staticmethod
    def forward(ctx, logits):
        logits = logits.contiguous()
        N, E = logits.shape
        EP, BT, NB = _tiles(N, E)
        dev = logits.device
        i64, f32 = dict(device=dev, dtype=torch.int64), dict(device=dev, dtype=torch.float32)
        top, pos, tos = torch.empty(N, 1, **i64), torch.empty(N, **i64), torch.empty(N, **i64)
        gate, gos = torch.empty(N, **f32), torch.empty(N, **f32)
        hist = torch.empty(NB, EP, device=dev, dtype=torch.int32)
        psum, zpart = torch.empty(NB, EP, **f32), torch.empty(NB, **f32)
        counts, offs = torch.empty(E, **i64), torch.empty(E, device=dev, dtype=torch.int32)
        prob_sum, z_sum = torch.empty(E, **f32), torch.empty((), **f32)
        kw = dict(EP=EP, BT=BT, num_warps=_WARPS)
        _launch(_route_fwd_kernel, (NB,), (logits, top, gate, hist, psum, zpart, N, E), kw)
        cum = hist.cumsum(0, dtype=torch.int32)   # each tile's start per expert, read once by the placing kernel
        _launch(_route_place_kernel, (NB,), (top, gate, cum, psum, zpart, pos, tos, gos, counts, offs, prob_sum,
                                             z_sum, N, E, NB), dict(kw, CH=_CH))
        ctx.save_for_backward(logits, top, pos)
        ctx.mark_non_differentiable(tos, pos, counts, offs, top)
        ctx.set_materialize_grads(False)
        return gos, tos, pos, counts, offs, top, prob_sum, z_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_gos, _tos, _pos, _counts, _offs, _top, d_prob_sum, d_z_sum):
        logits, top, pos = ctx.saved_tensors
        N, E = logits.shape
        EP, BT, NB = _tiles(N, E)
        dl = torch.empty_like(logits)
        flags = dict(HAS_DG=d_gos is not None, HAS_DP=d_prob_sum is not None, HAS_DZ=d_z_sum is not None)
        args = tuple(t.contiguous() if t is not None else logits for t in (d_gos, d_prob_sum, d_z_sum))
        _launch(_route_bwd_kernel, (NB,), (logits, top, pos, args[0], args[1], args[2], dl, N, E),
                dict(flags, EP=EP, BT=BT, num_warps=_WARPS))
        return dl
