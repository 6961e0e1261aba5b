"""Benchmark: the chunked ``cpu`` selective scan against the sequential ``reference``, on this machine's CPU.

Model-like inputs (ROM_SPEC section 1): batch 1, d_inner 128, d_state 16, L 16384, fp32, with D, z and
delta_softplus; A = -exp(A_log) with A_log = log(1..d_state); delta_bias = inverse softplus of a
log-uniform dt in [1e-3, 1e-1]. Checks that outputs and gradients agree, then times forward and
forward+backward (median of repeats) and writes the table, with the hardware, to BENCHMARKS.md between
``<!-- scan_cpu:start -->`` and ``<!-- scan_cpu:end -->`` (other benchmarks own the rest of the file).

    .venv/bin/python benchmarks/scan_cpu.py [--length 16384] [--repeats 9] [--ref-repeats 2] [--no-write]
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import selective_scan  # noqa: E402
from kernels.cpu import plan  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import write_section  # noqa: E402  (sibling module; benchmarks run as scripts)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def model_like_inputs(batch: int, d_inner: int, d_state: int, length: int, seed: int = 0) -> dict:
    """Scan arguments shaped and scaled as the Mamba mixer produces them (fp32)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(d_inner, generator=g) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
    dt = dt.clamp_min(1e-4)
    return dict(
        u=torch.nn.functional.silu(torch.randn(batch, d_inner, length, generator=g)),
        delta=0.1 * torch.randn(batch, d_inner, length, generator=g),  # dt_proj(dt_low) before the bias
        A=-torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1),
        B=torch.randn(batch, d_state, length, generator=g),
        C=torch.randn(batch, d_state, length, generator=g),
        D=torch.ones(d_inner),
        z=torch.randn(batch, d_inner, length, generator=g),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),  # inverse softplus: softplus(delta_bias) = dt
        delta_softplus=True,
    )


def run(backend: str, args: dict, backward: bool) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    """One timed call: (seconds, y, gradients of sum(y * w) + sum(state) w.r.t. the tensor arguments)."""
    leaves = {k: v.detach().clone().requires_grad_(backward) for k, v in args.items() if isinstance(v, torch.Tensor)}
    kw = dict(args, **leaves)
    w = torch.linspace(-1.0, 1.0, args["u"].shape[-1])
    t0 = time.perf_counter()
    y, state = selective_scan(**kw, return_final_state=True, backend=backend)
    if backward:
        ((y * w).sum() + state.sum()).backward()
    seconds = time.perf_counter() - t0
    return seconds, y.detach(), {k: v.grad for k, v in leaves.items() if backward}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the scale-relative error the tests bound by 1e-5)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def hardware() -> str:
    """CPU model, cores, torch version and threads, as one line."""
    model = platform.processor() or "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, {cores} cores available, torch {torch.__version__}, "
            f"torch.get_num_threads()={torch.get_num_threads()}, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-inner", type=int, default=128)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=9, help="timed runs of the cpu backend (median reported)")
    p.add_argument("--ref-repeats", type=int, default=2, help="timed forward runs of the slow reference")
    p.add_argument("--ref-bwd-repeats", type=int, default=1,
                   help="timed forward+backward runs of the reference (minutes each at L=16K: its autograd graph "
                        "of per-step slices costs O(L^2))")
    p.add_argument("--output", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--keep-heap", action="store_true",
                   help="raise glibc's trim and mmap thresholds first, so that freed buffers are reused without new "
                        "page faults (what MALLOC_TRIM_THRESHOLD_/MALLOC_MMAP_THRESHOLD_ do for a whole process)")
    a = p.parse_args(argv)
    heap = "glibc malloc defaults"
    if a.keep_heap:
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(M_MMAP_THRESHOLD, 1 << 30):
            heap = "glibc malloc with trim and mmap thresholds at 1 GiB (--keep-heap)"

    args = model_like_inputs(a.batch, a.d_inner, a.d_state, a.length)
    load0 = os.getloadavg()[0]
    results: dict[tuple[str, str], list[float]] = {}
    checks: list[str] = []
    for mode, backward in (("forward", False), ("forward+backward", True)):
        ref = [run("reference", args, backward) for _ in range(a.ref_bwd_repeats if backward else a.ref_repeats)]
        _, y_ref, g_ref = ref[0]
        _, y_cpu, g_cpu = run("cpu", args, backward)  # warm-up (allocator, thread pool), checked before timing
        errs = {"y": max_rel_err(y_cpu, y_ref), **{f"d{k}": max_rel_err(g_cpu[k], g_ref[k]) for k in g_ref}}
        worst = max(errs, key=errs.get)
        checks.append(f"{mode}: max scale-relative error {errs[worst]:.1e} (worst: {worst})")
        if errs[worst] > 1e-4:
            raise SystemExit(f"cpu and reference disagree ({mode}): {errs}")
        results[("reference", mode)] = [r[0] for r in ref]
        results[("cpu", mode)] = [run("cpu", args, backward)[0] for _ in range(a.repeats)]
    load1 = os.getloadavg()[0]

    T, G = plan(a.batch, a.d_inner, a.d_state, a.length)
    elements = a.batch * a.d_inner * a.length
    lines = [
        "## Selective scan on CPU: `cpu` (chunked) vs `reference` (sequential)",
        "",
        f"Shape: batch {a.batch}, d_inner {a.d_inner}, d_state {a.d_state}, L {a.length}, fp32, with D, z, "
        f"delta_bias and softplus (model-like inputs). Chunk {T} steps, {G} chunks per block.",
        f"Hardware: {hardware()}. Allocator: {heap}.",
        f"Load average (1 min) before / after: {load0:.2f} / {load1:.2f} (the machine is shared; times are "
        "wall-clock medians).",
        f"Agreement checked before timing: {'; '.join(checks)}.",
        "",
        "| pass | reference (s) | cpu (ms) | cpu min (ms) | cpu M elements/s | speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in ("forward", "forward+backward"):
        ref_s = statistics.median(results[("reference", mode)])
        cpu_s = statistics.median(results[("cpu", mode)])
        lines.append(f"| {mode} | {ref_s:.2f} | {cpu_s * 1e3:.1f} | {min(results[('cpu', mode)]) * 1e3:.1f} | "
                     f"{elements / cpu_s / 1e6:.0f} | {ref_s / cpu_s:.1f}x |")
    lines += ["", f"Repeats: cpu {a.repeats} (after one warm-up), reference {a.ref_repeats} (forward) / "
              f"{a.ref_bwd_repeats} (forward+backward). "
              f"Run: `.venv/bin/python benchmarks/scan_cpu.py{' --keep-heap' if a.keep_heap else ''}`."]
    body = "\n".join(lines)
    print(body)
    if not a.no_write:
        write_section(a.output, "scan_cpu", body)
        print(f"\nwrote the scan_cpu section of {a.output}")


if __name__ == "__main__":
    main()
