"""Integer helpers for the kernels' host code.

triton.cdiv / triton.next_power_of_2 are constexpr functions in recent Triton: callable from host code, but each call
unwraps its arguments first (~4.5 us on this project's 2-core CPU, against ~0.1 us for the arithmetic), and the scan
calls them ~14 times per forward + backward. These are the plain integer versions.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
