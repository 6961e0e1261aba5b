"""One recurrent step of the selective scan in Triton, batched over many streams (equipment).

Same math and signature as kernels.step.selective_state_update (which dispatches here for CUDA tensors):
state (batch, d_inner, d_state) is advanced IN PLACE; x, dt, z: (batch, d_inner); A: (d_inner, d_state);
B, C: (batch, d_state); D, dt_bias: (d_inner,). Returns y (batch, d_inner) in x's dtype. Arithmetic in fp32.
The step is memory-bound (the state is read and written once); one program owns BLOCK_D channels of one row
(BLOCK_D and the warp count are autotuned per d_inner and batch size, see _STEP_CONFIGS).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels._host import cdiv, next_pow2
from kernels.triton_scan import LOG2E, _sigmoid, _softplus

# The step is a few microseconds: its time is latency (one round of loads, exp2, one round of stores), so the best
# split of channels over programs and warps depends on the batch and the card. Tuned once per (d_inner, batch
# bucket) on first use, timed with CUDA graphs (plain launches would time the launch, not the kernel); the state
# is updated in place, so the tuner restores it after each trial.
_STEP_CONFIGS = [triton.Config({"BLOCK_D": bd}, num_warps=nw) for bd in (16, 32, 64, 128) for nw in (1, 2, 4)]
_STEP_BD_MAX = 128      # every config's BLOCK_D divides it: d_inner % 128 == 0 makes every config's blocks whole


# At batch 1 the tuner's trials differ by less than its timing noise and it picked poorly (H200, session 6, graph
# replay with the unmasked loads: 1.78 us for its pick at d_inner 1536, 1.45 for BLOCK_D 32 / 4 warps, which is
# within 1% of the best config at d_inner 4096 too): batch 1 runs that config untuned.
_STEP_B1 = triton.Config({"BLOCK_D": 32}, num_warps=4)


def _step_prune(configs, nargs, **kwargs):
    return [_STEP_B1] if nargs["batch_bucket"] == 1 else configs


def _step_autotune(fn):
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter runs one fixed config (tests)
        return triton.heuristics({"BLOCK_D": lambda a: 32})(fn)
    return triton.autotune(_STEP_CONFIGS, key=["d_inner", "batch_bucket"], restore_value=["state_ptr"],
                           use_cuda_graph=True, prune_configs_by={"early_config_prune": _step_prune})(fn)


@triton.jit
def _ld(ptrs, mask, EVEN: tl.constexpr):
    """Load as fp32; EVEN: every address in bounds, so no mask (measurably faster for the tiny step)."""
    if EVEN:
        return tl.load(ptrs).to(tl.float32)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _st(ptrs, val, mask, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, val.to(ptrs.dtype.element_ty))
    else:
        tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=mask)


@_step_autotune
@triton.jit
def _step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    d_inner, batch_bucket, s_sb, s_sd, s_xb, s_tb, s_Bb, s_Cb, s_zb, s_yb,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    EVEN: tl.constexpr = False,
):
    # EVEN: d_inner % BLOCK_D == 0 and N == NP, so every access is in bounds and the loads / stores carry no masks
    # (H200, session 6, graph replay at batch 1: 1.45 vs 1.58 us per call at d_inner 1536, BLOCK_D 32 / 4 warps;
    # 1-4% at batch 64 / 1024).
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    d_ok = offs_d < d_inner
    n_ok = offs_n < N
    m = d_ok[:, None] & n_ok[None, :]
    s_ptrs = state_ptr + pid_b * s_sb + offs_d[:, None] * s_sd + offs_n[None, :]
    s = _ld(s_ptrs, m, EVEN)
    x = _ld(x_ptr + pid_b * s_xb + offs_d, d_ok, EVEN)
    dt = _ld(dt_ptr + pid_b * s_tb + offs_d, d_ok, EVEN)
    if HAS_BIAS:
        dt += _ld(bias_ptr + offs_d, d_ok, EVEN)
    A2 = _ld(A_ptr + offs_d[:, None] * N + offs_n[None, :], m, EVEN) * LOG2E
    Bv = _ld(B_ptr + pid_b * s_Bb + offs_n, n_ok, EVEN)
    Cv = _ld(C_ptr + pid_b * s_Cb + offs_n, n_ok, EVEN)
    if HAS_D:
        Dv = _ld(D_ptr + offs_d, d_ok, EVEN)
    if HAS_Z:
        z = _ld(z_ptr + pid_b * s_zb + offs_d, d_ok, EVEN)
    if SOFTPLUS:
        dt = _softplus(dt)
    s = s * tl.exp2(dt[:, None] * A2) + (dt * x)[:, None] * Bv[None, :]
    _st(s_ptrs, s, m, EVEN)
    y = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        y += Dv * x
    if HAS_Z:
        y = y * (z * _sigmoid(z))
    _st(y_ptr + pid_b * s_yb + offs_d, y, d_ok, EVEN)


def step_supported(state: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the Triton step takes these tensors (else the caller uses the exact torch path)."""
    return (state.dtype in (torch.float32, torch.bfloat16, torch.float16) and state.stride(2) == 1
            and x.dtype != torch.float64)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Advance ``state`` by one step in place and return y (batch, d_inner). Inputs are not validated here
    (kernels.step.selective_state_update validates, then dispatches)."""
    b, d, n = state.shape
    x, dt, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt, B, C))
    z = z if z is None or z.stride(-1) == 1 else z.contiguous()
    A = A.contiguous()
    y = torch.empty((b, d), device=x.device, dtype=x.dtype)
    dummy = y
    np2 = next_pow2(n)
    _step_kernel[lambda meta: (cdiv(d, meta["BLOCK_D"]), b)](
        state, x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, y,
        d, next_pow2(b), state.stride(0), state.stride(1), x.stride(0), dt.stride(0), B.stride(0),
        C.stride(0),
        z.stride(0) if z is not None else 0, y.stride(0),
        N=n, NP=np2, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), EVEN=d % _STEP_BD_MAX == 0 and n == np2)
    return y
