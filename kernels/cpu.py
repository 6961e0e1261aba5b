"""Vectorised, chunked selective scan for CPU tensors (exact: same math as the reference, to float rounding).

Shapes (ROM_SPEC section 1): u, delta, z: (batch, d_inner, L); A: (d_inner, d_state);
B, C: (batch, d_state, L); D, delta_bias: (d_inner,); state: (batch, d_inner, d_state).

Scheme. Time is cut into chunks of T steps; G consecutive chunks form a block, and blocks are processed
one after the other, each from the state the previous one ended in (so memory is bounded by the block,
not by L). Inside a block, with everything laid out (chunk, step, batch, d_state, d_inner):
1. decays a_t = exp(delta_t A) and inputs x_t = delta_t B_t u_t for every (step, chunk) at once;
2. one loop over the T steps, vectorised over the G chunks, gives each chunk's states from a zero start
   (the first chunk from the block's true start), h_t = a_t h_{t-1} + x_t, together with the running
   decay products P_t = a_1 ... a_t;
3. a loop over the G chunks carries the true start states: s_{k+1} = h_T + P_T s_k;
4. the true states are h_t + P_t s_k, and y_t = <h_t, C_t>.
Every exponent is delta_t A of a single step, and every longer decay is a product of such factors: there is
no log-space difference and no division, so no exp(+large) and no overflow for any L or any size of
delta*A (strong decays underflow to 0, exactly as in the reference loop).

Backward (a custom autograd.Function) keeps only the block start states, recomputes each block's states,
runs the adjoint recursion g_t = C_t dy_t + a_{t+1} g_{t+1} chunked the same way in reverse, and reads every
gradient off (states, adjoints). CHUNK_SIZE and BLOCK_ELEMENTS were chosen by measurement
(benchmarks/scan_cpu.py; see BENCHMARKS.md).
"""

from __future__ import annotations

import math
import threading

import torch

from kernels.reference import compute_dtype, finish_output, prepare_delta

CHUNK_SIZE = 32          # T: steps per chunk (length of the sequential inner loop)
BLOCK_ELEMENTS = 1 << 19  # target number of states (batch * d_inner * d_state * T * G) per block (2 MiB in fp32)
LOG2E = 1.4426950408889634
_ATEN_GRAIN = 32768  # at::internal::GRAIN_SIZE: smaller elementwise ops run on the calling thread


def plan(batch: int, d_inner: int, d_state: int, length: int) -> tuple[int, int]:
    """(T, G): steps per chunk and chunks per block, so that a block holds about BLOCK_ELEMENTS states.

    Small (batch * d_inner * d_state): chunks of CHUNK_SIZE steps, several side by side in each step op, but
    few enough that a step op (states and products of G chunks) stays under ATen's parallel grain: the step
    loop then opens no OpenMP region per step, which costs little on an idle machine and avoids a collapse
    on a loaded one (every region waits for a descheduled thread). Large: one chunk per block, shortened so
    that the block's buffers stay within the budget.
    """
    per_step = batch * d_inner * d_state
    T = max(1, min(CHUNK_SIZE, length, BLOCK_ELEMENTS // per_step))
    G = BLOCK_ELEMENTS // (T * per_step)
    if 2 * per_step < _ATEN_GRAIN:
        G = min(G, (_ATEN_GRAIN - 1) // (2 * per_step))
    return T, max(1, min(G, math.ceil(length / T)))


def _time_major(x: torch.Tensor, length: int) -> torch.Tensor:
    """(b, c, L) -> a new contiguous (length, b, c), zero-padded at the end (zero delta, u, B, C leave the state
    alone)."""
    return _to_time_major(x, x.new_empty(length, *x.shape[:2]))


def _to_time_major(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(b, c, L) -> rows [0, L) of a (length, b, c) buffer (converted to its dtype); rows past L are zeroed."""
    L = x.shape[2]
    for i in range(x.shape[0]):  # one 2-D transpose per batch row: much faster than a 3-D permuted copy
        out[:L, i].copy_(x[i].t())
    out[L:].zero_()
    return out


def _channel_major(x: torch.Tensor, L: int) -> torch.Tensor:
    """(length, b, c) -> contiguous (b, c, L), dropping the padding."""
    length, b, c = x.shape
    out = x.new_empty(b, c, L)
    for i in range(b):
        out[i].copy_(x[:L, i].t())
    return out


def _block(x: torch.Tensor, s: int, e: int, T: int) -> torch.Tensor:
    """Rows [s, e) of a time-major (length, b, c) tensor as a (g, T, b, c) view: chunk, step, batch, channel."""
    return x[s:e].view((e - s) // T, T, *x.shape[1:])


class _Workspace:
    """Buffers of one block (g chunks of T steps) and their per-step views, made once and reused by every block.

    dA (g, T, b, n, d): decays; HP (2, g, T, b, n, d): states and running decay products, stepped together;
    GR (same, backward only): adjoints and reverse decay products. The views are kept because building them
    in the step loops costs as much as the arithmetic at these sizes.
    """

    def __init__(self, T: int, g: int, b: int, n: int, d: int, like: torch.Tensor, backward: bool) -> None:
        self.T, self.g = T, g
        self.dA = like.new_empty(g, T, b, n, d)
        self.HP = like.new_empty(2, g, T, b, n, d)
        self.X = like.new_zeros(2, g, T, b, n, d)  # inputs x_t in X[0]; X[1] stays zero (the P part starts at 0)
        self.X_t = self.X.unbind(2)
        self.hs = like.new_empty(g + 1, b, n, d)
        self.dA_t, self.HP_t, self.H_t = self.dA.unbind(1), self.HP.unbind(2), self.HP[0].unbind(1)
        self.hs_k = self.hs.unbind(0)
        self.H_end, self.P_end = self.HP[0, :, T - 1].unbind(0), self.HP[1, :, T - 1].unbind(0)
        self.H_00, self.dA_00, self.H_rows = self.HP[0, 0, 0], self.dA[0, 0], self.HP[0].view(-1, n, d)
        self.P_0, self.dA_0, self.P_rest = self.HP[1, :, 0], self.dA[:, 0], self.HP[1, :, 1:]
        self.H_late, self.P_late, self.hs_late = self.HP[0, 1:], self.HP[1, 1:], self.hs[1:g].unsqueeze(1)
        if backward:
            self.GR = like.new_empty(2, g, T, b, n, d)
            self.lams = like.new_empty(g, b, n, d)
            self.GR_t, self.G_t = self.GR.unbind(2), self.GR[0].unbind(1)
            self.lam_k, self.dA_first = self.lams.unbind(0), self.dA[:, 0].unbind(0)
            self.G_first, self.R_first = self.GR[0, :, 0].unbind(0), self.GR[1, :, 0].unbind(0)


def _block_states(ws: _Workspace, dlb: torch.Tensor, ub: torch.Tensor, Bb: torch.Tensor, At2: torch.Tensor,
                  h_start: torch.Tensor) -> torch.Tensor:
    """Decays, true states and running decay products of one block, into the workspace.

    dlb, ub: (g, T, b, d); Bb: (g, T, b, n); At2: (n, d) = A^T log2(e); h_start: (b, n, d), the state before
    the block. Fills ws.dA with exp(delta A), ws.HP[0] with the states and ws.HP[1] with the running
    products P_t = a_1 ... a_t of each chunk. Returns the chunk start states ws.hs (g + 1, b, n, d); the last
    one is the state at the end of the block.
    """
    T, g = ws.T, ws.g
    dA, X = ws.dA, ws.X
    # exp(delta A) as exp2(delta * A log2(e)): torch's CPU exp2 is ~2.5x faster than its exp; the extra
    # rounding (of A log2(e), once per channel) costs ~1e-7 relative per decay
    torch.mul(dlb.unsqueeze(3), At2, out=dA).exp2_()
    torch.mul((dlb * ub).unsqueeze(3), Bb.unsqueeze(4), out=X[0])
    ws.hs_k[0].copy_(h_start)
    dA_t, X_t = ws.dA_t, ws.X_t
    if g == 1:
        H_t = ws.H_t
        torch.addcmul(X[0, 0, 0], ws.dA_00, h_start, out=ws.H_00)
        for t in range(1, T):
            torch.addcmul(X_t[t][0], dA_t[t], H_t[t - 1], out=H_t[t])
        ws.hs_k[1].copy_(ws.H_end[0])
        return ws.hs
    HP_t = ws.HP_t
    HP_t[0].copy_(X_t[0])  # states start at x_1, products at 0 (then a_1)
    ws.P_0.copy_(ws.dA_0)
    ws.H_00.addcmul_(ws.dA_00, h_start)  # the first chunk starts from the true state: it needs no correction
    for t in range(1, T):  # h_t = a_t h_{t-1} + x_t and P_t = a_t P_{t-1}: one op, all chunks at once
        torch.addcmul(X_t[t], dA_t[t], HP_t[t - 1], out=HP_t[t])
    hs_k, H_end, P_end = ws.hs_k, ws.H_end, ws.P_end
    hs_k[1].copy_(H_end[0])
    for k in range(1, g):  # carry the true start state across the chunks of the block
        torch.addcmul(H_end[k], P_end[k], hs_k[k], out=hs_k[k + 1])
    ws.H_late.addcmul_(ws.P_late, ws.hs_late)
    return ws.hs


def _block_adjoints(ws: _Workspace, gyb: torch.Tensor, Cb: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Adjoints g_t = dL/dh_t of one block, into ws.GR[0]; ws.dA must hold the block's decays.

    gyb: (g, T, b, d); Cb: (g, T, b, n); lam: (b, n, d), the adjoint at the end of the block (from later
    blocks and the final state's gradient). g_t = C_t dy_t + a_{t+1} g_{t+1}, chunked like the states: from
    a zero end per chunk with reverse products R_t = a_{t+1} ... a_T (in ws.GR[1]), then corrected.
    Returns the adjoint before the block, a_1 g_1 (b, n, d).
    """
    T, g = ws.T, ws.g
    Gb, R = ws.GR[0], ws.GR[1]
    torch.mul(gyb.unsqueeze(3), Cb.unsqueeze(4), out=Gb)
    Gb[g - 1, T - 1].add_(lam)  # the last chunk ends at the true adjoint: it needs no correction
    dA_t = ws.dA_t
    if g == 1:
        G_t = ws.G_t
        for t in range(T - 2, -1, -1):
            G_t[t].addcmul_(dA_t[t + 1], G_t[t + 1])
        return ws.dA[0, 0] * Gb[0, 0]
    R[:, : T - 1].zero_()
    R[:, T - 1].fill_(1.0)
    GR_t = ws.GR_t
    for t in range(T - 2, -1, -1):
        GR_t[t].addcmul_(dA_t[t + 1], GR_t[t + 1])
    lam_k, G_first, R_first, dA_first = ws.lam_k, ws.G_first, ws.R_first, ws.dA_first
    torch.mul(dA_first[g - 1], G_first[g - 1], out=lam_k[g - 2])  # adjoint arriving at the end of each chunk
    for k in range(g - 2, 0, -1):
        torch.mul(dA_first[k], torch.addcmul(G_first[k], R_first[k], lam_k[k]), out=lam_k[k - 1])
    Gb[: g - 1].addcmul_(R[: g - 1], ws.lams[: g - 1].unsqueeze(1))
    return ws.dA[0, 0] * Gb[0, 0]


def _forward_blocks(u_: torch.Tensor, dl_: torch.Tensor, B_: torch.Tensor, C_: torch.Tensor, At2: torch.Tensor,
                    h0: torch.Tensor, y_: torch.Tensor, T: int, G: int, starts: list | None = None) -> torch.Tensor:
    """The forward scan over time-major inputs (Lp, b, .), block after block: writes y_ (Lp, b, d) and returns the
    final state (b, n, d). h0: (b, d, n). ``starts`` (when given) receives each block's start state, which is what
    the backward pass keeps."""
    Lp, b, d = u_.shape
    n = At2.shape[0]
    h = h0.transpose(1, 2).contiguous()
    ws = None
    for s in range(0, Lp, G * T):
        e = min(Lp, s + G * T)
        if ws is None or ws.g != (e - s) // T:
            ws = _Workspace(T, (e - s) // T, b, n, d, u_, backward=False)
        if starts is not None:
            starts.append(h)
        hs = _block_states(ws, _block(dl_, s, e, T), _block(u_, s, e, T), _block(B_, s, e, T), At2, h)
        torch.bmm(C_[s:e].view(-1, 1, n), ws.H_rows, out=y_[s:e].view(-1, 1, d))
        if starts is None:
            h.copy_(hs[-1])
        else:
            h = hs[-1].clone()  # each kept start state is its own tensor
    return h


class _ChunkedScan(torch.autograd.Function):
    """y = scan(u, dl, A, B, C, h0) without D, z or the delta transform; all tensors in the compute dtype.

    u, dl: (b, d, L); A: (d, n); B, C: (b, n, L); h0: (b, d, n). Returns y (b, d, L), final state (b, d, n).
    """

    @staticmethod
    def forward(ctx, u, dl, A, B, C, h0):
        b, d, L = u.shape
        n = A.shape[1]
        T, G = plan(b, d, n, L)
        Lp = math.ceil(L / T) * T
        u_, dl_, B_, C_ = (_time_major(x, Lp) for x in (u, dl, B, C))
        At = A.t().contiguous()
        At2 = At * LOG2E
        y = u.new_empty(Lp, b, d)
        starts = []
        h = _forward_blocks(u_, dl_, B_, C_, At2, h0, y, T, G, starts)
        ctx.save_for_backward(u_, dl_, At, B_, C_, torch.stack(starts))
        ctx.plan = (T, G, L)
        return _channel_major(y, L), h.transpose(1, 2).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh):
        u_, dl_, At, B_, C_, starts = ctx.saved_tensors
        T, G, L = ctx.plan
        Lp, b, d = u_.shape
        n = At.shape[0]
        gy_ = _time_major(gy, Lp)
        du, ddl, dB, dC = (torch.empty_like(x) for x in (u_, dl_, B_, C_))
        dAt = torch.zeros_like(At)
        At2 = At * LOG2E
        lam = gh.transpose(1, 2).contiguous()  # adjoint at the end of the current block, (b, n, d)
        full = None
        for i in range(starts.shape[0] - 1, -1, -1):
            s = i * G * T
            e = min(Lp, s + G * T)
            g = (e - s) // T
            if g == G:
                full = full or _Workspace(T, G, b, n, d, u_, backward=True)
                ws = full
            else:
                ws = _Workspace(T, g, b, n, d, u_, backward=True)
            dlb, ub, Bb, Cb, gyb = (_block(x, s, e, T) for x in (dl_, u_, B_, C_, gy_))
            hs = _block_states(ws, dlb, ub, Bb, At2, starts[i])
            lam = _block_adjoints(ws, gyb, Cb, lam)
            dA, H, Gb = ws.dA, ws.HP[0], ws.GR[0]
            # Q_t = g_t a_t h_{t-1}: the gradient with respect to (delta_t A)
            Q = torch.mul(Gb, dA, out=ws.HP[1])
            Q[:, 1:].mul_(H[:, :-1])
            Q[:, 0].mul_(hs[:g])
            torch.sum(torch.mul(Q, At, out=ws.GR[1]), 3, out=_block(ddl, s, e, T))
            dAt += Q.mul_(dlb.unsqueeze(3)).sum((0, 1, 2))
            # x_t = delta_t u_t B_t
            sGB = torch.bmm(Bb.reshape(-1, 1, n), Gb.view(-1, n, d)).view(g, T, b, d)
            _block(ddl, s, e, T).addcmul_(ub, sGB)
            torch.mul(sGB, dlb, out=_block(du, s, e, T))
            torch.sum(torch.mul(Gb, (dlb * ub).unsqueeze(3), out=dA), 4, out=_block(dB, s, e, T))
            torch.sum(torch.mul(H, gyb.unsqueeze(3), out=Q), 4, out=_block(dC, s, e, T))
        return (_channel_major(du, L), _channel_major(ddl, L), dAt.t(), _channel_major(dB, L), _channel_major(dC, L),
                lam.transpose(1, 2))


class _Buffers(threading.local):
    """Scratch tensors of the inference path, kept between calls (one set per thread).

    A fresh multi-MB tensor costs a page fault per 4 KiB page on first touch (~16K faults, a third of the
    forward time at L=16K); reusing the same buffers for calls of the same shape costs none. Only the set of
    the latest shape is kept, and none above MAX_CACHED_BYTES, so memory stays bounded.
    """

    MAX_CACHED_BYTES = 256 << 20

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, key: tuple, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if key == self.key:
            return self.tensors
        tensors = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}
        if sum(t.numel() * t.element_size() for t in tensors.values()) <= self.MAX_CACHED_BYTES:
            self.key, self.tensors = key, tensors
        else:  # too large to keep: used for this call only
            self.key, self.tensors = None, {}
        return tensors


_BUFFERS = _Buffers()


def _scan_inference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, dtype):
    """The forward pass when no gradient is wanted: y (b, d, L) in u's dtype and the final state (b, d, n).

    Same blocks and arithmetic as ``_ChunkedScan.forward``, with the delta transform, D skip and z gate done
    in place in time-major scratch buffers that persist between calls (``_Buffers``), and nothing kept for a
    backward pass: the only fresh allocation of size L is the output.
    """
    b, d, L = u.shape
    n = A.shape[1]
    T, G = plan(b, d, n, L)
    Lp = math.ceil(L / T) * T
    shapes = {"u": (Lp, b, d), "dl": (Lp, b, d), "y": (Lp, b, d), "B": (Lp, b, n), "C": (Lp, b, n)}
    if z is not None:
        shapes["z"] = (Lp, b, d)
    buf = _BUFFERS.get((b, d, n, Lp, dtype, z is not None), shapes, dtype)
    u_, dl_, B_, C_ = (_to_time_major(x, buf[k]) for x, k in ((u, "u"), (delta, "dl"), (B, "B"), (C, "C")))
    y_ = buf["y"]
    if delta_bias is not None:
        dl_[:L].add_(delta_bias.to(dtype))
    if delta_softplus:
        torch._C._nn.softplus(dl_[:L], 1, 20, out=dl_[:L])
    At2 = A.to(dtype).t().contiguous() * LOG2E
    h = _forward_blocks(u_, dl_, B_, C_, At2, h0, y_, T, G)  # (b, n, d)
    yv = y_[:L]
    if D is not None:
        yv.addcmul_(u_[:L], D.to(dtype))
    if z is not None:
        zv = _to_time_major(z, buf["z"])[:L]
        yv.mul_(torch.nn.functional.silu(zv, inplace=True))
    y = torch.empty(b, d, L, dtype=u.dtype)
    for i in range(b):
        y[i].copy_(yv[:, i].t())
    return y, h.transpose(1, 2).contiguous()


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_final_state=False):
    """Chunked selective scan; same arguments and results as ``selective_scan_reference``.

    Returns y (batch, d_inner, L) in u's dtype, and the final state (batch, d_inner, d_state) in the
    compute dtype (fp32, fp64 for fp64 inputs) when ``return_final_state``. Without autograd (no input
    requires grad, or grad mode is off) it takes the inference path, which keeps nothing for backward.
    """
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    b, d, _ = u.shape
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))):
        h0 = (initial_state.to(dtype) if initial_state is not None
              else torch.zeros(b, d, A.shape[1], dtype=dtype, device=u.device))
        y, state = _scan_inference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, dtype)
        return (y, state) if return_final_state else y
    dl = prepare_delta(delta, delta_bias, delta_softplus, dtype)
    h0 = (initial_state.to(dtype) if initial_state is not None
          else torch.zeros(b, d, A.shape[1], dtype=dtype, device=u.device))
    y, state = _ChunkedScan.apply(u.to(dtype).contiguous(), dl.contiguous(), A.to(dtype), B.to(dtype).contiguous(),
                                  C.to(dtype).contiguous(), h0)
    y = finish_output(y, u, D, z, u.dtype)
    return (y, state) if return_final_state else y
