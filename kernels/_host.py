"""Host-side helpers of the kernels: integer arithmetic and the choice of a Triton or torch path.

triton.cdiv / triton.next_power_of_2 are constexpr functions in recent Triton: callable from host code, but each call
unwraps its arguments first (~4.5 us on this project's 2-core CPU, against ~0.1 us for the arithmetic), and the scan
calls them ~14 times per forward + backward. These are the plain integer versions.
"""

from __future__ import annotations

import os

import torch

OP_BACKENDS = ("torch", "triton")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def triton_available() -> bool:
    """True when the Triton backend can run here (a CUDA device, or TRITON_INTERPRET=1)."""
    try:
        from kernels import triton_scan  # noqa: F401  (every Triton module of kernels builds on it)
    except Exception:  # triton missing or the module not importable on this platform
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor, backend: str | None) -> bool:
    """Whether an operator with a Triton path and a torch path (kernels.conv, kernels.slots) runs the Triton one:
    backend None -> for CUDA tensors where Triton is available (otherwise the torch path, which is exact);
    "triton" -> always (CPU tensors need TRITON_INTERPRET=1); "torch" -> never."""
    if backend is None:
        return x.is_cuda and triton_available()
    if backend not in OP_BACKENDS:
        raise ValueError(f"backend: expected one of {OP_BACKENDS}, got {backend!r}")
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend == "triton"
