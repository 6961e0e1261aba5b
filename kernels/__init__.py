"""Scan operators behind one dispatching entry point (imports torch, and triton only when present); the mixer's
fused causal conv1d + SiLU (kernels.conv), RoM's routing (kernels.route) and slot moves (kernels.slots) beside them.

Backends: ``reference`` (sequential fp32 loop, the oracle), ``cpu`` (vectorised, chunked; exact),
``triton`` (GPU; also runs on CPU tensors under TRITON_INTERPRET=1). Selection: the ``backend=``
argument, else the RMAMBA_SCAN_BACKEND variable, else CUDA tensors -> triton when available, else cpu.
RMAMBA_TRITON_FAST_LAUNCH=0 / 1 turns the Triton backend's launch cache off / on (default: on with Triton 3.6,
the release it was checked with on a GPU; off with any other).
"""

from __future__ import annotations

import os

import torch

from kernels._host import triton_available
from kernels._validate import check_scan_args
from kernels.conv import causal_conv1d_silu, conv_window
from kernels.reference import selective_scan_reference
from kernels.step import selective_state_update

BACKENDS = ("reference", "cpu", "triton")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend name to use for tensors on ``device``."""
    name = backend or os.environ.get("RMAMBA_SCAN_BACKEND") or None
    if name is None:
        return "triton" if device.type == "cuda" and triton_available() else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, backend: str | None = None,
                   check_finite: bool = True):
    """Selective scan (Mamba-1). Returns y (batch, d_inner, L), or (y, final_state) when asked.

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
    D, delta_bias: (d_inner,); initial_state / final_state: (batch, d_inner, d_state), fp32.
    check_finite: raise a ValueError naming the argument that holds NaN or Inf. On a GPU each checked tensor
    costs a device sync (the host waits for the GPU), so callers whose inputs are their own activations, already
    checked upstream (the model on a GPU), may turn it off and check their results instead.
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, check_finite=check_finite)
    name = resolve_backend(backend, u.device)
    if name == "reference":
        fn = selective_scan_reference
    elif name == "cpu":
        from kernels.cpu import selective_scan_cpu as fn
    else:
        from kernels.triton_scan import selective_scan_triton as fn
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              initial_state=initial_state, return_final_state=return_final_state)


__all__ = ["selective_scan", "selective_state_update", "selective_scan_reference", "resolve_backend",
           "triton_available", "causal_conv1d_silu", "conv_window", "BACKENDS"]
