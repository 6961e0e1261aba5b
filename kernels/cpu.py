"""Placeholder until the chunked CPU backend lands: delegates to the reference (same math)."""

from kernels.reference import selective_scan_reference as selective_scan_cpu  # noqa: F401
