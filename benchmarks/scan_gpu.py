"""GPU benchmark of the selective scan and the one-step update (run on a CUDA machine; not a test).

    python benchmarks/scan_gpu.py --out DIR [--tune] [--quick] [--mamba-sdist .thirdparty/mamba_ssm-...tar.gz]
    python benchmarks/scan_gpu.py --render benchmarks/results/scan_gpu.json   # rewrite BENCHMARKS.md's section
    python benchmarks/scan_gpu.py --ab plan --out DIR [--shapes ...] [--budget-s S]   # same-call config A/B

Order of work: (1) start building mamba-ssm's CUDA selective_scan extension (sm_90 only) in the background from
the PyPI sdist, (2) measure the card's ceilings in this run: copy bandwidth (big device copy, read + write
counted), exp2 and fp32 FMA rates (Triton microkernels), (3) check every configuration before timing it: outputs
are poisoned (the allocator's memory filled with NaN first), inputs are fresh random, and the Triton scan must
match an independent fp64 reference (a chunked closed-form scan over sampled channels) and mamba-ssm within
ROM_SPEC 5's bounds (fp32 1e-5, bf16 1e-2, relative L2); a configuration that fails is not timed,
(4) time with CUDA events (warm-up, median and spread), (5) write JSON and a markdown section.

Floors (ROM_SPEC 5): bandwidth floor = bytes that must move / measured copy bandwidth (forward: u, delta, z read
and y written, 2 or 4 bytes each; forward+backward: + dout read and du, ddelta, dz written, and the forward
again inside the backward's recompute is not counted); compute floor = d_state exponentials per element at the
measured exp2 rate, lifted by doing the best share of them as FMA polynomials (both units busy, ~4 fp32 ops per
state). '% of floor' is against the larger (binding) of the two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import time
import types
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _markdown import write_section  # noqa: E402  (sibling module; benchmarks run as scripts)

MARK_START, MARK_END = "<!-- scan_gpu:start -->", "<!-- scan_gpu:end -->"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
EXP_POLY_FMAS = 10          # FMA-pipe instructions per polynomial exp2 (ours: clamp, 3 adds, 5 FMAs, shift-add)
FP32_OPS_PER_STATE = 4      # ROM_SPEC 5


# ------------------------------------------------------------------------------------------- mamba-ssm build
def start_mamba_build(sdist: Path, work: Path) -> subprocess.Popen | None:
    """Extract the sdist and build csrc/selective_scan for sm_90 in a child process (MAX_JOBS=16)."""
    if not sdist.exists():
        return None
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tf:
        tf.extractall(work, filter="data")
    src = next(work.glob("mamba_ssm-*"))
    build = work / "build"
    build.mkdir(exist_ok=True)
    code = f"""
import torch, sys
from torch.utils.cpp_extension import load
src = {str(src)!r} + "/csrc/selective_scan/"
names = ["selective_scan.cpp"] + ["selective_scan_fwd_%s.cu" % t for t in ("fp32", "fp16", "bf16")] + [
    "selective_scan_bwd_%s_%s.cu" % (t, k) for t in ("fp32", "fp16", "bf16") for k in ("real", "complex")]
flags = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
         "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
         "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
         "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
         "-gencode=arch=compute_90,code=sm_90"]
load(name="selective_scan_cuda", sources=[src + n for n in names], extra_cflags=["-O3", "-std=c++17"],
     extra_cuda_cflags=flags, extra_include_paths=[src], build_directory={str(build)!r}, verbose=True)
print("MAMBA_BUILD_OK", flush=True)
"""
    env = dict(os.environ, MAX_JOBS="16", TORCH_CUDA_ARCH_LIST="9.0")
    log = open(work / "build.log", "w")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env)


def load_mamba(work: Path, proc: subprocess.Popen | None, timeout: float) -> tuple[object, object, str]:
    """(selective_scan_cuda module or None, mamba's triton selective_state_update or None, note). With the
    extension built, ext.selective_scan_fn is mamba-ssm's autograd function around it (load_scan_fn)."""
    note = []
    ext = None
    if proc is None:
        note.append("mamba-ssm sdist not found: no CUDA baseline")
    else:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            note.append(f"mamba-ssm build exceeded {timeout:.0f} s")
        so = list((work / "build").glob("selective_scan_cuda*.so"))
        if so:
            import importlib.util
            spec = importlib.util.spec_from_file_location("selective_scan_cuda", so[0])
            ext = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(ext)
        else:
            tail = (work / "build.log").read_text()[-3000:] if (work / "build.log").exists() else ""
            note.append("mamba-ssm build failed: " + tail)
    step = None
    src = next(work.glob("mamba_ssm-*"), None)
    if src is not None:
        try:
            import importlib.util
            for pkg in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton"):
                sys.modules.setdefault(pkg, types.ModuleType(pkg))
            for name in ("softplus", "selective_state_update"):
                full = f"mamba_ssm.ops.triton.{name}"
                spec = importlib.util.spec_from_file_location(full, src / "mamba_ssm/ops/triton" / f"{name}.py")
                mod = importlib.util.module_from_spec(spec)
                sys.modules[full] = mod
                spec.loader.exec_module(mod)
            step = sys.modules["mamba_ssm.ops.triton.selective_state_update"].selective_state_update
        except Exception as e:  # report, continue without that baseline
            note.append(f"mamba-ssm triton step import failed: {e!r}")
        if ext is not None:
            try:
                ext.selective_scan_fn = load_scan_fn(src, ext)
            except Exception as e:  # report, continue with the raw extension only
                note.append(f"mamba-ssm selective_scan_fn import failed: {e!r}")
    return ext, step, "; ".join(note)


def load_scan_fn(src: Path, ext):
    """mamba-ssm's selective_scan_fn (ops/selective_scan_interface.py of the sdist: an autograd.Function around the
    extension's fwd / bwd) with the built extension as its `selective_scan_cuda`. Its module also imports a Triton
    layer norm this benchmark does not use (stubbed) and einops (stubbed by a one-pattern rearrange where the GPU
    image lacks it: selective_scan_fn only needs 'b dstate l -> b 1 dstate l')."""
    import importlib.util

    def load(full: str, rel: str):
        spec = importlib.util.spec_from_file_location(full, src / rel)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        spec.loader.exec_module(mod)
        return mod

    for pkg in ("mamba_ssm", "mamba_ssm.utils", "mamba_ssm.ops", "mamba_ssm.ops.triton"):
        sys.modules.setdefault(pkg, types.ModuleType(pkg))
    load("mamba_ssm.utils.torch", "mamba_ssm/utils/torch.py")
    ln = types.ModuleType("mamba_ssm.ops.triton.layer_norm")
    ln._layer_norm_fwd = None
    sys.modules.setdefault("mamba_ssm.ops.triton.layer_norm", ln)
    try:
        import einops  # noqa: F401
    except ImportError:
        def rearrange(t, pattern):
            if pattern.replace(" ", "") != "bdstatel->b1dstatel":
                raise ValueError(f"einops stand-in: only 'b dstate l -> b 1 dstate l' (what selective_scan_fn "
                                 f"uses) is supported, got {pattern!r}")
            return t.unsqueeze(1)

        ein = types.ModuleType("einops")
        ein.rearrange, ein.repeat = rearrange, None
        sys.modules["einops"] = ein
    sys.modules["selective_scan_cuda"] = ext
    return load("mamba_ssm.ops.selective_scan_interface", "mamba_ssm/ops/selective_scan_interface.py").selective_scan_fn


# -------------------------------------------------------------------------------------------- measurement

def event_ms(fn) -> float:
    """GPU time of one call of ``fn`` (ms), between two CUDA events."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def cuda_time(fn, *, min_reps=5, max_reps=50, target_s=0.6, warmup=2) -> dict:
    """Median / min / max / IQR of fn() in ms with CUDA events (one event pair per call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(min_reps, target_s / est)))
    times = []
    for _ in range(reps):
        times.append(event_ms(fn))
    return _summary(times)


def _summary(times: list[float]) -> dict:
    """Median, min, max and interquartile range (ms) of timings."""
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [times[0], times[len(times) // 2], times[-1]]
    return {"median_ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1],
            "iqr_ms": q[2] - q[0], "reps": len(times)}


def queued_time(fn, reps: int = 30, warmup: int = 3) -> dict:
    """Like cuda_time, but the calls are queued back to back (one event pair per call, one sync at the end), as a
    training loop runs them: the host prepares call i+1 while the GPU runs call i, so a call's launch latency on the
    host is hidden unless the host is the slower side. cuda_time syncs after every call and so also counts the
    time from the first event to the first kernel."""
    return _summary(queued_calls(fn, reps, warmup))


def queued_calls(fn, reps: int, warmup: int = 1) -> list[float]:
    """GPU time (ms) of each of `reps` calls of fn queued back to back (queued_time's raw timings)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in ev]


def host_time(fn, reps: int = 15) -> dict:
    """Host time of one call (ms): the GPU is first given ~30 ms of work (torch.cuda._sleep), so the host never
    waits for it and the wall time of fn() is what the host spends preparing and launching the call."""
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(60_000_000)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return _summary(times)


def graph_time(fn, calls=100) -> float:
    """Mean GPU time per call (ms) from replaying a CUDA graph of `calls` back-to-back calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / calls)
    return statistics.median(ts)


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + written (4 GiB source)."""
    x = torch.empty(1 << 30, dtype=torch.float32, device="cuda").uniform_()
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), min_reps=10, target_s=0.5)
    return 2 * 4 * (1 << 30) / (t["median_ms"] * 1e-3)


def unit_rates() -> dict:
    """exp2 (special-function unit) and fp32 FMA rates from Triton microkernels, in operations per second."""
    import triton
    import triton.language as tl

    @triton.jit
    def _exp_k(x_ptr, o_ptr, ITERS: tl.constexpr):
        offs = tl.program_id(0) * 256 + tl.arange(0, 256)
        x = tl.load(x_ptr + offs)
        a0, a1, a2, a3 = x * 0.1, x * 0.2, x * 0.3, x * 0.4
        a4, a5, a6, a7 = x * 0.5, x * 0.6, x * 0.7, x * 0.8
        for _ in range(ITERS):
            a0 = tl.exp2(-a0)
            a1 = tl.exp2(-a1)
            a2 = tl.exp2(-a2)
            a3 = tl.exp2(-a3)
            a4 = tl.exp2(-a4)
            a5 = tl.exp2(-a5)
            a6 = tl.exp2(-a6)
            a7 = tl.exp2(-a7)
        tl.store(o_ptr + offs, a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7)

    @triton.jit
    def _fma_k(x_ptr, o_ptr, ITERS: tl.constexpr):
        offs = tl.program_id(0) * 256 + tl.arange(0, 256)
        x = tl.load(x_ptr + offs)
        a0, a1, a2, a3 = x * 0.1, x * 0.2, x * 0.3, x * 0.4
        a4, a5, a6, a7 = x * 0.5, x * 0.6, x * 0.7, x * 0.8
        for _ in range(ITERS):
            a0 = a0 * 0.999 + 0.001
            a1 = a1 * 0.999 + 0.001
            a2 = a2 * 0.999 + 0.001
            a3 = a3 * 0.999 + 0.001
            a4 = a4 * 0.999 + 0.001
            a5 = a5 * 0.999 + 0.001
            a6 = a6 * 0.999 + 0.001
            a7 = a7 * 0.999 + 0.001
        tl.store(o_ptr + offs, a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7)

    n = 132 * 2048 * 8
    x = torch.rand(n, device="cuda")
    o = torch.empty_like(x)
    out = {}
    for name, k, iters in (("exp2_per_s", _exp_k, 512), ("fma_per_s", _fma_k, 4096)):
        t = cuda_time(lambda k=k, iters=iters: k[(n // 256,)](x, o, ITERS=iters, num_warps=8), min_reps=10)
        out[name] = n * 8 * iters / (t["median_ms"] * 1e-3)
    return out


def compute_floor_rate(n_state: int, rates: dict) -> tuple[float, float, float]:
    """(elements/s with exp2 alone, elements/s with the best exp2/polynomial split, best poly share)."""
    re, rf = rates["exp2_per_s"], rates["fma_per_s"]
    exp_only = re / n_state
    best, best_f = 0.0, 0.0
    for i in range(101):
        f = i / 100
        t = max(n_state * (1 - f) / re, (FP32_OPS_PER_STATE * n_state + n_state * f * EXP_POLY_FMAS) / rf)
        if 1 / t > best:
            best, best_f = 1 / t, f
    return exp_only, best, best_f


# -------------------------------------------------------------------------------------------------- oracle
def chunked_reference(u, delta, A, B, C, D, z, bias, chans, Q=128, group=64):
    """fp64 selective scan for the channels `chans` ((batch index, channel index) lists) by an independent
    method: closed-form decays within chunks of Q steps (exp of differences of cumulative delta*A), sequential
    between chunks. Returns y (len(chans), L) and the final state (len(chans), n)."""
    bi, di = chans
    L = u.shape[-1]
    n = A.shape[1]
    f = torch.float64
    dl = delta[bi, di].to(f) + bias[di].to(f)[:, None]
    dl = torch.nn.functional.softplus(dl)                                    # (P, L)
    uu = u[bi, di].to(f)
    Bs, Cs = B[bi].to(f), C[bi].to(f)                                        # (P, n, L)
    Af = A[di].to(f)                                                         # (P, n)
    pad = (-L) % Q
    if pad:
        dl = torch.nn.functional.pad(dl, (0, pad))
        uu = torch.nn.functional.pad(uu, (0, pad))
        Bs = torch.nn.functional.pad(Bs, (0, pad))
        Cs = torch.nn.functional.pad(Cs, (0, pad))
    P, Lp = dl.shape
    nc = Lp // Q
    dA = (dl[:, None, :] * Af[:, :, None]).view(P, n, nc, Q)                 # log decays
    bx = (dl * uu)[:, None, :] * Bs                                         # (P, n, Lp)
    bx = bx.view(P, n, nc, Q)
    cs = dA.cumsum(-1)                                                       # within-chunk cumulative log decay
    tri = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=u.device))
    h = torch.zeros(P, n, dtype=f, device=u.device)
    ys = []
    for c0 in range(0, nc, group):
        c1 = min(nc, c0 + group)
        csg = cs[:, :, c0:c1]                                                # (P, n, G, Q)
        M = (csg[..., :, None] - csg[..., None, :]).masked_fill(~tri, -math.inf).exp()   # (P, n, G, Q, Q)
        local = (M @ bx[:, :, c0:c1, :, None]).squeeze(-1)                   # zero-start states (P, n, G, Q)
        decay = csg.exp()                                                    # state carried in from chunk start
        hs = []
        for g in range(c1 - c0):
            hg = local[:, :, g] + decay[:, :, g] * h[:, :, None]
            h = hg[:, :, -1]
            hs.append(hg)
        hst = torch.stack(hs, 2).reshape(P, n, -1)
        ys.append((hst * Cs[:, :, c0 * Q:c1 * Q]).sum(1))
    y = torch.cat(ys, -1)[:, :L]               # padded steps have delta = 0 (decay 1, no input): h is exact
    y = y + D[di].to(f)[:, None] * u[bi, di].to(f)
    zz = z[bi, di].to(f)
    y = y * zz * torch.sigmoid(zz)
    return y, h


def _chunks(t: torch.Tensor, n: int = 1 << 26):
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), n):
        yield flat[i:i + n]


def all_finite(t: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(c).all()) for c in _chunks(t))


def rel(a, b) -> float:
    """||a - b|| / ||b|| in fp64, computed in slices (full-size fp64 copies would not fit); inf if a has NaN/Inf."""
    num = den = 0.0
    for ca, cb in zip(_chunks(a), _chunks(b)):
        ca, cb = ca.double(), cb.double()
        if not torch.isfinite(ca).all():
            return math.inf
        num += float(((ca - cb) ** 2).sum())
        den += float((cb ** 2).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)



def fwd_bwd(ts, leaves: dict, dout):
    """One forward + backward of our scan on ``leaves`` (u, delta, A, B, C, D, z, delta_bias; their .grad cleared
    first, as the timed loops need); returns y."""
    for v in leaves.values():
        v.grad = None
    y = ts.selective_scan_triton(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                                 z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=True)
    y.backward(dout)
    return y

def poison(nbytes: int) -> None:
    """Fill free allocator memory with NaN so that outputs the kernels fail to write stay NaN."""
    if not torch.cuda.is_available():
        return
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    n = int(min(nbytes, free * 0.9)) // 4
    if n > 0:
        x = torch.full((n,), float("nan"), device="cuda")
        del x


# -------------------------------------------------------------------------------------------------- config
def make_inputs(b, d, L, n, dtype, seed, dev="cuda"):
    g = torch.Generator(device=dev).manual_seed(seed)
    u = torch.randn(b, d, L, device=dev, generator=g).to(dtype)
    delta = (torch.rand(b, d, L, device=dev, generator=g) * 2.0 - 1.0).to(dtype) * 0.5
    z = torch.randn(b, d, L, device=dev, generator=g).to(dtype)
    # dt in [1e-3, 1e-1] through softplus(bias), as the reference initialisation; A = -exp(A_log), A_log=log(1..n)
    dt0 = torch.exp(torch.rand(d, device=dev, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    bias = dt0 + torch.log(-torch.expm1(-dt0))
    A = -torch.arange(1, n + 1, device=dev, dtype=torch.float32)[None].repeat(d, 1)
    A = A * torch.exp(torch.randn(d, n, device=dev, generator=g) * 0.1)
    B = torch.randn(b, n, L, device=dev, generator=g).to(dtype)
    C = torch.randn(b, n, L, device=dev, generator=g).to(dtype)
    D = torch.randn(d, device=dev, generator=g)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)


def run_config(b, d, L, dtype, ext, floors, args, results, n=16):
    from kernels import triton_scan as ts

    tag = f"b{b} d{d} L{L} {str(dtype).replace('torch.', '')}"
    el = b * d * L
    esz = torch.tensor([], dtype=dtype).element_size()
    free = torch.cuda.mem_get_info()[0]
    rec = {"batch": b, "d_inner": d, "L": L, "dtype": str(dtype).replace("torch.", ""), "elements": el,
           "d_state": n, "notes": []}
    if 4 * el * esz > 0.8 * free:
        rec["notes"].append("skipped: inputs and output do not fit the card's memory")
        results.append(rec)
        print(tag, "SKIP (memory)", flush=True)
        return
    torch.manual_seed(b * 7 + d + L)
    inp = make_inputs(b, d, L, n, dtype, seed=b * 1000003 + d * 101 + L)
    kw = dict(D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"], delta_softplus=True)
    u, delta, A, B, C = inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"]
    B4, C4 = B[:, None], C[:, None]
    sfn = getattr(ext, "selective_scan_fn", None)      # mamba-ssm's autograd function, where it loaded
    tol = TOL[dtype]

    # ---- checks: ours vs the fp64 chunked oracle on sampled channels, and vs mamba-ssm on everything
    poison(8 * el * esz)
    y, hT = ts.selective_scan_triton(u, delta, A, B, C, **kw, return_final_state=True)
    torch.cuda.synchronize()
    gen = torch.Generator().manual_seed(L + d)
    P = 8
    bi = torch.randint(0, b, (P,), generator=gen).cuda()
    di = torch.cat([torch.randint(0, d, (P - 1,), generator=gen), torch.tensor([d - 1])]).cuda()
    yr, hr = chunked_reference(u, delta, A, B, C, inp["D"], inp["z"], inp["delta_bias"], (bi, di))
    e_y = rel(y[bi, di], yr)
    e_h = rel(hT[bi, di], hr)
    finite = all_finite(y)
    rec["check_fwd_vs_fp64"] = {"y": e_y, "final_state": e_h, "all_written": finite}
    ok = finite and e_y < tol and e_h < tol
    if ext is not None:
        poison(8 * el * esz)
        mo = ext.fwd(u, delta, A, B4, C4, inp["D"], inp["z"], inp["delta_bias"], True)
        e_m = rel(y, mo[2])
        rec["check_fwd_vs_mamba"] = e_m
        ok = ok and e_m < tol
        del mo
    del y, hT
    rec["fwd_ok"] = ok
    print(tag, "fwd check", "OK" if ok else "FAIL", rec.get("check_fwd_vs_fp64"), rec.get("check_fwd_vs_mamba"),
          flush=True)
    bw, cfl = floors["copy_bw"], floors["compute_elems_per_s"]
    fwd_bytes = 4 * esz * el
    fb_bytes = 8 * esz * el
    if ok:
        t = cuda_time(lambda: ts.selective_scan_triton(u, delta, A, B, C, **kw))
        rec["triton_fwd"] = t
        t_bw, t_c = fwd_bytes / bw, el / cfl
        rec["floor_fwd_ms"] = {"bandwidth": t_bw * 1e3, "compute": t_c * 1e3,
                               "binding": "compute" if t_c > t_bw else "bandwidth"}
        rec["pct_floor_fwd"] = 100 * max(t_bw, t_c) * 1e3 / t["median_ms"]
        rec["gelem_s_fwd"] = el / t["median_ms"] / 1e6
    if ext is not None:
        rec["mamba_fwd"] = cuda_time(lambda: ext.fwd(u, delta, A, B4, C4, inp["D"], inp["z"], inp["delta_bias"], True))
        rec["gelem_s_mamba_fwd"] = el / rec["mamba_fwd"]["median_ms"] / 1e6
        if "triton_fwd" in rec:
            rec["speedup_fwd"] = rec["mamba_fwd"]["median_ms"] / rec["triton_fwd"]["median_ms"]
            _queued_pair(rec, "fwd", lambda: ts.selective_scan_triton(u, delta, A, B, C, **kw),
                         lambda: ext.fwd(u, delta, A, B4, C4, inp["D"], inp["z"], inp["delta_bias"], True))
        if sfn is not None and "triton_fwd" in rec:
            def mamba_fn():
                return sfn(u, delta, A, B, C, inp["D"], inp["z"], inp["delta_bias"], True)

            rec["check_fn_vs_ext"] = rel(mamba_fn(), ext.fwd(u, delta, A, B4, C4, inp["D"], inp["z"],
                                                             inp["delta_bias"], True)[2])
            if rec["check_fn_vs_ext"] < tol:
                rec["mamba_fn_fwd"] = cuda_time(mamba_fn)
                rec["speedup_fwd_fn"] = rec["mamba_fn_fwd"]["median_ms"] / rec["triton_fwd"]["median_ms"]
            else:
                rec["notes"].append(f"selective_scan_fn differs from the extension ({rec['check_fn_vs_ext']:.1e})")
    torch.cuda.empty_cache()

    # ---- forward + backward
    free = torch.cuda.mem_get_info()[0]
    if (8 * esz + 1) * el > 0.9 * free:
        rec["notes"].append("fwd+bwd skipped: does not fit the card's memory")
    elif not args.no_bwd:
        dout = torch.randn_like(u)
        # the inputs themselves become the leaves (no copies: the largest shapes barely fit)
        leaves = {k: v.requires_grad_() for k, v in
                  dict(u=u, delta=delta, A=A, B=B, C=C, D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"]).items()}

        def ours_fb():
            fwd_bwd(ts, leaves, dout)

        poison(8 * el * esz)
        ours_fb()
        torch.cuda.synchronize()
        grads = {k: v.grad for k, v in leaves.items()}
        okb = all(all_finite(g) for g in grads.values())
        if ext is not None:
            poison(4 * el * esz)
            with torch.no_grad():
                out, x, _ = ext.fwd(u, delta, A, B4, C4, inp["D"], inp["z"], inp["delta_bias"], True)
                mg = ext.bwd(u, delta, A, B4, C4, inp["D"], inp["z"], inp["delta_bias"], dout, x, out, None, True,
                             False)
            names = ["u", "delta", "A", "B", "C", "D", "delta_bias", "z"]
            errs = {}
            for k, gm in zip(names, mg[:7] + [mg[7]]):
                gm = gm[:, 0] if k in ("B", "C") else gm
                errs[k] = rel(grads[k], gm)
            rec["check_bwd_vs_mamba"] = errs
            # dA, dB, dC and the bias / D grads are long sums: fp32 accumulation order differs, allow 10x
            okb = okb and all(e < (tol if k in ("u", "delta", "z") else 10 * tol) for k, e in errs.items())
            del out, x, mg
        rec["bwd_ok"] = okb
        print(tag, "bwd check", "OK" if okb else "FAIL", rec.get("check_bwd_vs_mamba"), flush=True)
        del grads
        torch.cuda.empty_cache()
        if okb and ok:
            rec["triton_fwdbwd"] = cuda_time(ours_fb, min_reps=3)
            t_bw = fb_bytes / bw
            t_c = 2 * el / cfl           # forward + one recompute of the exponentials: the floor counts one
            rec["floor_fwdbwd_ms"] = {"bandwidth": t_bw * 1e3}
            rec["gelem_s_fwdbwd"] = el / rec["triton_fwdbwd"]["median_ms"] / 1e6
            _ = t_c
        if ext is not None:
            @torch.no_grad()
            def mamba_fb():
                out, x, _ = ext.fwd(u, delta, A, B4, C4, inp["D"], inp["z"], inp["delta_bias"], True)
                ext.bwd(u, delta, A, B4, C4, inp["D"], inp["z"], inp["delta_bias"], dout, x, out, None, True, False)
            rec["mamba_fwdbwd"] = cuda_time(mamba_fb, min_reps=3)
            if "triton_fwdbwd" in rec:
                rec["speedup_fwdbwd"] = rec["mamba_fwdbwd"]["median_ms"] / rec["triton_fwdbwd"]["median_ms"]
                _queued_pair(rec, "fwdbwd", ours_fb, mamba_fb)
        if sfn is not None and "triton_fwdbwd" in rec and "mamba_fn_fwd" in rec:
            def mamba_fn_fb():     # mamba-ssm's autograd function on the same leaves, as ours_fb runs
                for v in leaves.values():
                    v.grad = None
                sfn(*(leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), True).backward(dout)

            mamba_fn_fb()
            if all(all_finite(v.grad) for v in leaves.values()):
                rec["mamba_fn_fwdbwd"] = cuda_time(mamba_fn_fb, min_reps=3)
                rec["speedup_fwdbwd_fn"] = rec["mamba_fn_fwdbwd"]["median_ms"] / rec["triton_fwdbwd"]["median_ms"]
                _queued_pair(rec, "fwdbwd_fn", ours_fb, mamba_fn_fb, host=False)   # host: in fwdbwd_q
            else:
                rec["notes"].append("selective_scan_fn's gradients not finite: not timed")
        del leaves, dout
    results.append(rec)
    print(tag, {k: (round(v["median_ms"], 3) if isinstance(v, dict) and "median_ms" in v else v)
                for k, v in rec.items() if k.startswith(("triton_", "mamba_", "speedup", "pct_"))}, flush=True)


def _queued_pair(rec: dict, part: str, ours, theirs, host: bool = True) -> None:
    """Back-to-back timings of ours and mamba-ssm's (queued_time), interleaved in two rounds, into rec[part + "_q"];
    with host, also the host time of one of our calls."""
    reps = 20 if rec["elements"] * (2 if part == "fwd" else 8) < 4e9 else 6
    runs = {"triton": [], "mamba": []}
    for _ in range(2):
        runs["triton"].append(queued_time(ours, reps=reps))
        runs["mamba"].append(queued_time(theirs, reps=reps))
    q = {k: min(v, key=lambda t: t["median_ms"]) for k, v in runs.items()}
    rec[part + "_q"] = {**q, "speedup": q["mamba"]["median_ms"] / q["triton"]["median_ms"]}
    if host:
        rec[part + "_q"]["triton_host"] = host_time(ours)


SPLIT_FWD = {"G": 4, "T": 8, "TC": 4, "BC_PRE": True, "FMA_RCP": True, "N_POLY": 0}


def precompile_specs(tune: bool, lean: bool = False, shapes=None) -> list[dict]:
    """Kernel variants the run will need (dtype x options x L divisibility x tuning configs), one worker each.
    Shapes with d_inner * L >= 2^31 pass 64-bit strides, another specialisation of every kernel: compiled here
    on a (1, 4096, 2^19) problem (bf16 only: an fp32 one would need ~90 GB beside the run)."""
    specs = [{"dtype": "bfloat16", "opts": "all", "L": L, "fwd": SPLIT_FWD, "bwd": {}, "grad": True}
             for L in ((1024,) if lean else (1024, 517))]
    for dtype in ("bfloat16", "float32"):
        for opts in (("all", "h0") if lean else ("all", "h0", "none")):
            for L in (1024, 517):
                if lean and opts == "all" and L == 517:
                    continue
                specs.append({"dtype": dtype, "opts": opts, "L": L, "fwd": {}, "bwd": {}, "grad": True})
    if any(sh[1] * sh[2] >= 1 << 31 and sh[3] == torch.bfloat16 for sh in (shapes or [])):
        specs.append({"dtype": "bfloat16", "opts": "all", "L": 1 << 19, "b": 1, "d": 4096, "n_segs": [3],
                      "fwd": {}, "bwd": {}, "grad": True})
    if tune:
        for c in ({"G": 1, "BLOCK_D": 32, "T": 4, "N_POLY": 0}, {**SPLIT_FWD, "N_POLY": 1}):
            specs.append({"dtype": "bfloat16", "opts": "all", "L": 1024, "fwd": c, "bwd": {}, "grad": False})
        specs.append({"dtype": "bfloat16", "opts": "all", "L": 1024, "fwd": {}, "bwd": {"N_POLY": 0}, "grad": True})
    return specs


def precompile_worker(spec: dict) -> None:
    """Run tiny calls that compile the variants of `spec` into Triton's on-disk cache (shared with the parent)."""
    from kernels import triton_scan as ts

    dtype = getattr(torch, spec["dtype"])
    b, d = spec.get("b", 2), spec.get("d", 208)
    for n_seg in spec.get("n_segs", (1, 3)):
        # n_seg None: the segment counts given in spec["fwd"] / spec["bwd"] (e.g. --ab's resolved configs)
        ts._CONFIG_OVERRIDE["fwd"] = {**spec["fwd"], **({} if n_seg is None else {"n_seg": n_seg})}
        ts._CONFIG_OVERRIDE["bwd"] = {**spec["bwd"], **({} if n_seg is None else {"n_seg": n_seg})}
        inp = make_inputs(b, d, spec["L"], 16, dtype, seed=n_seg or 5)
        if spec["opts"] == "none":
            kw = dict(delta_softplus=False)
        else:
            kw = dict(D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"], delta_softplus=True)
            if spec["opts"] == "h0":
                kw["initial_state"] = torch.randn(b, d, 16, device="cuda")
        args = [inp[k] for k in ("u", "delta", "A", "B", "C")]
        ts.selective_scan_triton(*args, **kw, return_final_state=True)
        if spec["grad"]:
            leaves = [a.clone().requires_grad_() for a in args]
            kwl = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            y, h = ts.selective_scan_triton(*leaves, **kwl, return_final_state=True)
            (y.float().sum() + h.sum()).backward()
        del inp, args
    torch.cuda.synchronize()


def start_precompile(specs: list[dict]) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return [subprocess.Popen([sys.executable, __file__, "--precompile-worker", json.dumps(sp)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for sp in specs]


def small_checks(results_out: dict, lean: bool = False) -> bool:
    """Full-tensor checks against kernels.reference (fp64) at small shapes, every option combination."""
    from kernels import triton_scan as ts
    from kernels.reference import selective_scan_reference as ref

    ok_all = True
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for (b, d, L, n_seg) in ((2, 208, 512, 1), (2, 96, 517, 3), (1, 64, 1024, 7)):
            for opts in (("all",) if lean else ("all", "none")):
                for k in ("fwd", "bwd"):
                    ts._CONFIG_OVERRIDE[k] = {"n_seg": n_seg}
                if dtype == torch.bfloat16:             # the d_state-split forward (the rule picks it at 8 x 1536)
                    ts._CONFIG_OVERRIDE["fwd"].update(SPLIT_FWD)
                inp = make_inputs(b, d, L, 16, dtype, seed=L + d)
                if opts == "all":
                    kw = dict(D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"], delta_softplus=True,
                              initial_state=torch.randn(b, d, 16, device="cuda"))
                else:
                    kw = dict(delta_softplus=False)
                    inp["delta"] = (torch.rand_like(inp["delta"].float()) * 0.1).to(dtype)
                base = {k: inp[k] for k in ("u", "delta", "A", "B", "C")}
                leaves = {k: v.clone().requires_grad_() for k, v in {**base, **{
                    kk: vv for kk, vv in kw.items() if isinstance(vv, torch.Tensor)}}.items()}
                leaves64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
                flag = {"delta_softplus": kw["delta_softplus"]}
                poison(1 << 28)
                y, hT = ts.selective_scan_triton(**leaves, **flag, return_final_state=True)
                yr, hr = ref(**leaves64, **flag, return_final_state=True)
                gy, gh = torch.randn_like(yr), torch.randn_like(hr)
                ((y.double() * gy).sum() + (hT.double() * gh).sum()).backward()
                ((yr * gy).sum() + (hr * gh).sum()).backward()
                errs = {"y": rel(y, yr), "final": rel(hT, hr)}
                errs.update({"d" + k: rel(leaves[k].grad, leaves64[k].grad) for k in leaves})
                tol = TOL[dtype]
                ok = all(v < (tol if k in ("y", "final", "du", "ddelta", "dz") else 3 * tol) for k, v in errs.items())
                ok_all &= ok
                rows.append({"dtype": str(dtype), "shape": [b, d, L], "n_seg": n_seg, "opts": opts, "ok": ok,
                             "errors": errs})
                print("small check", dtype, (b, d, L), "seg", n_seg, opts, "OK" if ok else "FAIL",
                      {k: f"{v:.1e}" for k, v in errs.items()}, flush=True)
    ts._CONFIG_OVERRIDE.clear()
    results_out["small_checks"] = rows
    return ok_all


def _time_call(fn, *a, **k) -> tuple[float, float]:
    """(plain-launch median ms, CUDA-graph ms per call) of fn(*a, **k)."""
    return (cuda_time(lambda: fn(*a, **k), target_s=0.2)["median_ms"], graph_time(lambda: fn(*a, **k)))


def step_bench(mamba_step, out: dict) -> None:
    from kernels.step import selective_state_update
    from kernels.triton_step import selective_state_update_triton

    rows = []
    n = 16
    for d in (1536, 4096):
        for b in (1, 64, 1024):
            g = torch.Generator(device="cuda").manual_seed(b + d)
            state = torch.randn(b, d, n, device="cuda", generator=g)
            x, dt, z = (torch.randn(b, d, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
            A = -torch.rand(d, n, device="cuda", generator=g) - 0.5
            Bv, Cv = (torch.randn(b, n, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
            Dv, bias = torch.randn(d, device="cuda", generator=g), torch.randn(d, device="cuda", generator=g)
            kw = dict(D=Dv, z=z, dt_bias=bias, dt_softplus=True)
            s1, s2 = state.cpu(), state.clone()
            kw_cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            y_ref = selective_state_update(s1, x.cpu(), dt.cpu(), A.cpu(), Bv.cpu(), Cv.cpu(), **kw_cpu)
            y = selective_state_update_triton(s2, x, dt, A, Bv, Cv, **kw)
            e = max(rel(y.float().cpu(), y_ref.float()), rel(s2.cpu(), s1))
            row = {"batch": b, "d_inner": d, "check_vs_torch_step": e, "ok": e < 1e-2}
            row["triton_launch_ms"], row["triton_graph_ms"] = _time_call(
                selective_state_update_triton, state.clone(), x, dt, A, Bv, Cv, **kw)
            if mamba_step is not None:
                sm = state.clone()
                ym = mamba_step(sm, x, dt, A, Bv, Cv, **kw)
                row["check_vs_mamba"] = rel(y.float(), ym.float())
                row["mamba_launch_ms"], row["mamba_graph_ms"] = _time_call(
                    mamba_step, state.clone(), x, dt, A, Bv, Cv, **kw)
                row["speedup_graph"] = row["mamba_graph_ms"] / row["triton_graph_ms"]
                row["speedup_launch"] = row["mamba_launch_ms"] / row["triton_launch_ms"]
            row["bytes"] = 2 * b * d * n * 4 + 4 * b * d * 2
            rows.append(row)
            print("step", row, flush=True)
    out["step"] = rows


def tune(out: dict) -> None:
    """Time forward variants (N_POLY, block, warps, segments) and backward variants at representative shapes."""
    from kernels import triton_scan as ts

    rows = []
    shapes = [(8, 4096, 8192, torch.bfloat16), (8, 1536, 32768, torch.bfloat16), (1, 4096, 1 << 20, torch.bfloat16)]
    for (b, d, L, dtype) in shapes:
        inp = make_inputs(b, d, L, 16, dtype, seed=1)
        kw = dict(D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"], delta_softplus=True)
        args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"])
        base = ts._pick_config(b, d, L, dtype, inp["u"].device, backward=False)
        # the other forward kernel (one lane per channel vs d_state split), and the polynomial-exp2 share
        split = {**SPLIT_FWD, "n_seg": 1}
        cands = [{}, {"N_POLY": 1} if base.get("G", 1) > 1 else {"N_POLY": 0},
                 {"G": 1, "BLOCK_D": 32, "T": 4, "N_POLY": 2} if base.get("G", 1) > 1 else split]
        for ns in sorted({max(1, base["n_seg"] // 2), base["n_seg"] * 2} - {base["n_seg"]}):
            cands.append({"n_seg": ns})
        for c in cands:
            ts._CONFIG_OVERRIDE["fwd"] = c
            try:
                t = cuda_time(lambda: ts.selective_scan_triton(*args, **kw), target_s=0.3)["median_ms"]  # noqa: B023
            except Exception as e:
                t = None
                print("tune fail", c, repr(e)[:200])
            rows.append({"shape": [b, d, L], "kind": "fwd", "cfg": {**base, **c}, "ms": t})
            print("tune fwd", (b, d, L), {**base, **c}, t, flush=True)
        ts._CONFIG_OVERRIDE.clear()
        if L <= 32768:
            leaves = [a.clone().requires_grad_() for a in args]
            dout = torch.randn_like(inp["u"])
            bbase = ts._pick_config(b, d, L, dtype, inp["u"].device, backward=True)
            bcands = [{}, {"n_seg": max(1, bbase["n_seg"] // 2)}, {"n_seg": max(2, bbase["n_seg"] * 2)},
                      {"N_POLY": 0}, {"N_POLY": 1}]
            for c in bcands:
                ts._CONFIG_OVERRIDE["bwd"] = c

                def fb(leaves=leaves, kw=kw, dout=dout):
                    for v in leaves:
                        v.grad = None
                    ts.selective_scan_triton(*leaves, **kw).backward(dout)
                try:
                    t = cuda_time(fb, target_s=0.3, min_reps=3)["median_ms"]
                except Exception as e:
                    t = None
                    print("tune fail", c, repr(e)[:200])
                rows.append({"shape": [b, d, L], "kind": "fwd+bwd", "cfg": {**bbase, **c}, "ms": t})
                print("tune fwd+bwd", (b, d, L), {**bbase, **c}, t, flush=True)
            ts._CONFIG_OVERRIDE.clear()
        torch.cuda.empty_cache()
    out["tune"] = rows
    # apply the backward's N_POLY that won most often; forward results are reported only (which kernel and
    # settings win depends on the shape: _pick_config's rule)
    from collections import Counter
    votes = Counter()
    for shape in {tuple(r["shape"]) for r in rows if r["kind"] == "fwd+bwd"}:
        rs = [r for r in rows if r["kind"] == "fwd+bwd" and tuple(r["shape"]) == shape and r["ms"]]
        if rs:
            votes[min(rs, key=lambda r: r["ms"])["cfg"]["N_POLY"]] += 1
    if votes:
        ts._CONFIG_OVERRIDE["bwd"] = {"N_POLY": votes.most_common(1)[0][0]}
    out["applied_config"] = dict(ts._CONFIG_OVERRIDE)
    print("applied config", ts._CONFIG_OVERRIDE, flush=True)


def reference_and_compile(out: dict, with_compile: bool = True) -> None:
    """The PyTorch reference (a Python loop) and torch.compile of it, at small shapes only."""
    from kernels import triton_scan as ts
    from kernels.reference import selective_scan_reference as ref

    rows = []
    for (b, d, L) in ((8, 1536, 2048), (8, 1536, 128)):
        inp = make_inputs(b, d, L, 16, torch.float32, seed=3)
        kw = dict(D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"], delta_softplus=True)
        args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"])
        row = {"shape": [b, d, L], "dtype": "float32"}
        row["reference_ms"] = cuda_time(partial(ref, *args, **kw), min_reps=2, max_reps=5, warmup=1)["median_ms"]
        row["triton_ms"] = cuda_time(partial(ts.selective_scan_triton, *args, **kw))["median_ms"]
        if L <= 128 and with_compile:
            t0 = time.perf_counter()
            comp = torch.compile(ref)
            comp(*args, **kw)
            torch.cuda.synchronize()
            row["compile_s"] = time.perf_counter() - t0
            row["compiled_ms"] = cuda_time(partial(comp, *args, **kw), min_reps=3)["median_ms"]
        else:
            row["compiled_ms"] = None
            row["note"] = ("torch.compile unrolls the L-step Python loop: skipped above L=128" if L > 128
                           else "torch.compile not run (--no-compile)")
        rows.append(row)
        print("reference", row, flush=True)
    out["reference"] = rows


# ------------------------------------------------------------------------------------------------ config A/B

# Same-call config A/B: AB_PLAN holds the last plan run (all plans and their results: docs/notes/triton_scan_notes.md;
# write the next one here). Variants override _pick_config's "fwd" / "bwd" configs on top of each shape's defaults
# ("default" is always run first) and may turn the launch cache on ("launch": {"FAST": True}); "L" / "dtype" limit a
# variant to those shapes. "train" = forward with checkpoints + backward, "fwd" = inference; "queued" adds timings
# of calls queued back to back (where the host binds, fewer launches can win there and lose synced, or the reverse).
AB_PLAN = {  # ran in session 10, call 5: backward segments past the cap of 8 at L 2048 (not kept: 0.986-0.998x)
    "shapes": "8x1536x2048:bfloat16,8x1536x2048:float32",
    "profile": False,
    "queued": True,
    "train": {
        "b11": {"bwd": {"n_seg": 11}},     # 4 waves of the backward main pass instead of 2.9
        "b16": {"bwd": {"n_seg": 16}},     # 5.8 waves, 2 chunks per segment
    },
    "fwd": {},
}


def parse_shapes(text: str) -> list[tuple[int, int, int, torch.dtype]]:
    """'BxDxL:dtype,...' -> [(b, d, L, dtype), ...]."""
    shapes = []
    for item in text.split(","):
        dims, dt = item.strip().split(":")
        b_, d_, L_ = (int(v) for v in dims.split("x"))
        shapes.append((b_, d_, L_, getattr(torch, dt)))
    return shapes


def ab_variants(plan: dict, kind: str, L: int, dtype: torch.dtype) -> dict[str, dict]:
    """The plan's variants of `kind` that apply to this shape, as _CONFIG_OVERRIDE dicts, "default" first."""
    name = str(dtype).replace("torch.", "")
    out = {"default": {}}
    for key, v in plan.get(kind, {}).items():
        if L in v.get("L", [L]) and name in v.get("dtype", [name]):
            out[key] = {k: dict(v[k]) for k in ("fwd", "bwd", "launch") if k in v}
    return out


def _ab_set(override: dict) -> None:
    """Apply one variant: its "fwd" / "bwd" config overrides, and "launch": {"FAST": True / False} for the launch
    cache (without it: the kernels' default, ts._fast_launch_default())."""
    from kernels import triton_scan as ts

    ts._CONFIG_OVERRIDE.clear()
    ts._CONFIG_OVERRIDE.update({k: dict(v) for k, v in override.items() if k in ("fwd", "bwd")})
    ts._FAST_LAUNCH = bool(override.get("launch", {}).get("FAST", ts._fast_launch_default()))


def ab_precompile_specs(plan: dict, shapes) -> list[dict]:
    """One worker spec per distinct resolved (fwd, bwd) config: each variant's full configs at each shape, run by
    precompile_worker on a small problem (segment counts kept, so LOCAL passes compile where the shape has them)."""
    from kernels import triton_scan as ts

    specs, seen = [], set()
    for (b, d, L, dtype) in shapes:
        for kind in ("fwd", "train"):
            for ov in ab_variants(plan, kind, L, dtype).values():
                _ab_set(ov)
                fwd = ts._pick_config(b, d, L, dtype, torch.device("cuda"), backward=False)
                bwd = ts._pick_config(b, d, L, dtype, torch.device("cuda"), backward=True)
                fwd["n_seg"], bwd["n_seg"] = min(fwd["n_seg"], 3), min(bwd["n_seg"], 3)
                spec = {"dtype": str(dtype).replace("torch.", ""), "opts": "all", "L": 1024, "fwd": fwd,
                        "bwd": bwd, "grad": kind == "train", "n_segs": [None]}
                key = json.dumps(spec, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    specs.append(spec)
    _ab_set({})
    trained = {(sp["dtype"], json.dumps(sp["fwd"], sort_keys=True)) for sp in specs if sp["grad"]}
    # a training worker compiles the inference forward of its config too
    return [sp for sp in specs if sp["grad"] or (sp["dtype"], json.dumps(sp["fwd"], sort_keys=True)) not in trained]


def _ab_time(fns: dict, rounds: int, per: int, queued: bool = False) -> dict:
    """Median / min / max ms of each fn over `rounds` interleaved rounds of `per` calls (CUDA events, one sync per
    call, or with queued one sync per round: queued_calls; on the CPU, under the interpreter, one wall-clock call
    each: a smoke run, not a timing)."""
    cuda = torch.cuda.is_available()
    res = {k: [] for k in fns}
    for _ in range(rounds if cuda else 1):
        for k, (ov, fn) in fns.items():
            _ab_set(ov)
            if not cuda:
                t0 = time.perf_counter()
                fn()
                res[k].append((time.perf_counter() - t0) * 1e3)
                continue
            if queued:
                res[k] += queued_calls(fn, per)
                continue
            fn()
            torch.cuda.synchronize()
            for _ in range(per):
                res[k].append(event_ms(fn))
    _ab_set({})
    return {k: _summary(v) for k, v in res.items()}


def ab_shape(b, d, L, dtype, plan: dict, dev: str = "cuda") -> dict:
    """Check every variant (poisoned outputs, fresh inputs: inference y / final state vs the fp64 oracle on sampled
    channels and vs the default on everything; training y and all 8 gradients vs the default), then time the
    variants that passed in interleaved rounds: inference forward, forward with checkpoints, forward + backward."""
    from kernels import triton_scan as ts

    tag = f"{b}x{d}x{L}:{str(dtype).replace('torch.', '')}"
    inp = make_inputs(b, d, L, 16, dtype, seed=b * 1000003 + d * 101 + L + 7, dev=dev)
    kw = dict(D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"], delta_softplus=True)
    u, delta, A, B, C = (inp[k] for k in ("u", "delta", "A", "B", "C"))
    tol = TOL[dtype]
    tol_ab = 1e-3 if dtype == torch.bfloat16 else 1e-5       # vs the default: rounding-level differences only
    el, esz = b * d * L, u.element_size()
    rec = {"shape": tag, "checks": {}, "fwd": {}, "fwd_ck": {}, "train": {}}
    gen = torch.Generator().manual_seed(L + d)
    bi = torch.randint(0, b, (8,), generator=gen).to(dev)
    di = torch.cat([torch.randint(0, d, (7,), generator=gen), torch.tensor([d - 1])]).to(dev)
    yr, hr = chunked_reference(u, delta, A, B, C, inp["D"], inp["z"], inp["delta_bias"], (bi, di))
    fv, ok_f, base = ab_variants(plan, "fwd", L, dtype), {}, None
    # each variant runs once before its checked call, so that a launch-cache variant is checked on the cached
    # launch (its first call of a kernel goes through Triton's launcher)
    for name, ov in fv.items():
        _ab_set(ov)
        ts.selective_scan_triton(u, delta, A, B, C, **kw, return_final_state=True)
        poison(8 * el * esz)
        y, hT = ts.selective_scan_triton(u, delta, A, B, C, **kw, return_final_state=True)
        base = base or (y.clone(), hT.clone())
        e = {"oracle_y": rel(y[bi, di], yr), "oracle_h": rel(hT[bi, di], hr), "y": rel(y, base[0]),
             "h": rel(hT, base[1])}
        ok_f[name] = (all_finite(y) and e["oracle_y"] < tol and e["oracle_h"] < tol and e["y"] < tol_ab
                      and e["h"] < tol_ab)
        rec["checks"]["fwd " + name] = {**{k: float(f"{v:.2e}") for k, v in e.items()}, "ok": ok_f[name]}
        del y, hT
    del base
    tv, ok_t, base = ab_variants(plan, "train", L, dtype), {}, None
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in names}
    dout = torch.randn_like(u)

    def fb():
        return fwd_bwd(ts, leaves, dout)

    for name, ov in tv.items():
        _ab_set(ov)
        fb()
        poison(10 * el * esz)
        got = {"y": fb().detach(), **{k: leaves[k].grad.detach().clone() for k in names}}
        base = base or got
        e = {k: rel(got[k], base[k]) for k in got}
        ok_t[name] = all(all_finite(t) for t in got.values()) and all(
            v < (tol_ab if k in ("y", "u", "delta", "z") else 10 * tol_ab) for k, v in e.items())
        rec["checks"]["train " + name] = {**{k: float(f"{v:.1e}") for k, v in e.items()}, "ok": ok_t[name]}
        del got
    del base
    _ab_set({})
    print(tag, "checks", json.dumps(rec["checks"]), flush=True)
    rec["fwd"] = _ab_time({k: (ov, lambda: ts.selective_scan_triton(u, delta, A, B, C, **kw))
                           for k, ov in fv.items() if ok_f[k]}, rounds=6, per=5)
    with torch.no_grad():
        rec["fwd_ck"] = _ab_time({k: (ov, lambda: ts._forward(u, delta, A, B, C, inp["D"], inp["z"],
                                                               inp["delta_bias"], None, True, True))
                                  for k, ov in tv.items() if ok_t[k]}, rounds=4, per=5)
    rec["train"] = _ab_time({k: (ov, fb) for k, ov in tv.items() if ok_t[k]}, rounds=6, per=4)
    if plan.get("queued"):
        rec["fwd_q"] = _ab_time({k: (ov, lambda: ts.selective_scan_triton(u, delta, A, B, C, **kw))
                                 for k, ov in fv.items() if ok_f[k]}, rounds=4, per=10, queued=True)
        rec["train_q"] = _ab_time({k: (ov, fb) for k, ov in tv.items() if ok_t[k]}, rounds=4, per=8, queued=True)
    for part in ("fwd", "fwd_ck", "train", "fwd_q", "train_q"):
        if part not in rec:
            continue
        t0 = rec[part].get("default", {}).get("median_ms")
        for k, t in rec[part].items():
            sp = f"{t0 / t['median_ms']:.3f}x" if t0 else "-"
            print(f"{tag} {part:6s} {k:16s} {fmt_t(t)} {sp}", flush=True)
    if plan.get("profile") and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        fb()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fb()
            torch.cuda.synchronize()
        rows = sorted(((getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0), ev.count,
                        ev.key[:70]) for ev in prof.key_averages()), reverse=True)
        rec["profile_default_train_us"] = [r for r in rows if r[0] > 0][:12]
        for t, c, k in rec["profile_default_train_us"]:
            print(f"{tag} profile {t / 1e3:8.3f} ms x{c} {k}", flush=True)
    try:
        rec["registers"] = compiled_registers(ts)
    except Exception as e:          # diagnostics only: never lose the timings for it
        rec["registers"] = [f"unavailable: {e!r}"]
    for line in rec["registers"]:
        print(tag, "registers", line, flush=True)
    return rec


def compiled_registers(ts) -> list[str]:
    """Registers and spilled bytes of every compiled scan kernel so far (Triton's per-device kernel caches), one
    line each with the constexprs that tell the variants apart."""
    lines = []
    for kern in (ts._fwd_kernel, ts._fwd_split_kernel, ts._bwd_kernel, ts._chain_kernel):
        for cache in getattr(kern, "device_caches", {}).values():
            entries = cache[0] if isinstance(cache, tuple) else cache
            for ck in getattr(entries, "values", lambda: [])():
                names, consts = kern.arg_names, {}
                for k, v in (getattr(getattr(ck, "src", None), "constants", None) or {}).items():
                    k = names[k[0]] if isinstance(k, tuple) and len(k) == 1 else k
                    if k in ("LOCAL", "CHAIN_IN", "CK", "T", "G", "STAGES", "HAS_H0", "HAS_PEND"):
                        consts[k] = v
                lines.append(f"{kern.fn.__name__} regs {getattr(ck, 'n_regs', '?')} spills "
                             f"{getattr(ck, 'n_spills', '?')} {consts}")
    return sorted(set(lines))


def run_ab(plan: dict, out_dir: Path, budget_s: float) -> None:
    """--ab: precompile the plan's variants in parallel workers, then check and time them shape by shape."""
    t0 = time.perf_counter()
    shapes = parse_shapes(plan["shapes"])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        workers = start_precompile(ab_precompile_specs(plan, shapes))
        fails = [w.communicate()[1].decode()[-1500:] for w in workers]
        fails = [f for f, w in zip(fails, workers) if w.returncode != 0]
        print(f"precompiled {len(workers)} configs, {len(fails)} failed, {time.perf_counter() - t0:.0f}s", flush=True)
        for f in fails[:2]:
            print("PRECOMPILE FAILURE:", f, flush=True)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter smoke run)",
           "date": time.strftime("%Y-%m-%d %H:%M"), "plan": plan, "shapes": []}
    for sh in shapes:
        if time.perf_counter() - t0 > budget_s:
            print("time budget reached before", sh, flush=True)
            break
        res["shapes"].append(ab_shape(*sh, plan, dev=dev))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "ab.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"ab done {time.perf_counter() - t0:.0f}s", flush=True)


# -------------------------------------------------------------------------------------------------- report
def fmt_t(t):
    if not t:
        return "-"
    return f"{t['median_ms']:.3f} ({t['min_ms']:.3f}-{t['max_ms']:.3f})"


def render(res: dict) -> str:
    fl = res.get("floors", {})
    lines = [MARK_START, "## Selective scan on the GPU (benchmarks/scan_gpu.py)", "",
             f"Card: **{res.get('device')}**, torch {res.get('torch')}, triton {res.get('triton')}, "
             f"run {res.get('date')}. Measured in the same run: copy bandwidth {fl.get('copy_bw', 0) / 1e12:.2f} "
             f"TB/s (read + write), exp2 {fl.get('exp2_per_s', 0) / 1e12:.2f} T/s, fp32 FMA "
             f"{fl.get('fma_per_s', 0) / 1e12:.1f} T/s -> compute floor at d_state 16: "
             f"{fl.get('exp_only_elems_per_s', 0) / 1e9:.0f} G elem/s on exp2 alone, "
             f"{fl.get('compute_elems_per_s', 0) / 1e9:.0f} G elem/s with the best exp2/polynomial split.", "",
             "Times in ms: median (min-max) of CUDA-event timings after warm-up. Every row was checked before timing "
             "(poisoned outputs, fresh inputs; vs an fp64 oracle on sampled channels and vs mamba-ssm on all "
             "outputs). Forward with z, D, delta_bias, softplus; B, C per time step (batch, 16, L).", "",
             "| shape (b, d_inner, L) | dtype | Triton fwd | mamba-ssm fwd | speed-up | G elem/s | floor (binds) "
             "| % of floor | Triton fwd+bwd | mamba-ssm fwd+bwd | speed-up | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def ratio(v: float | None, fmt: str = "{:.2f}x") -> str:
        return fmt.format(v) if v else "-"  # not measured (skipped shape) -> "-", not 0

    for r in res.get("configs", []):
        fl_r = r.get("floor_fwd_ms", {})
        floor = (f"{max(fl_r['bandwidth'], fl_r['compute']):.3f} ({fl_r['binding']})" if fl_r else "-")
        lines.append(
            f"| {r['batch']}, {r['d_inner']}, {r['L']} | {r['dtype']} | {fmt_t(r.get('triton_fwd'))} | "
            f"{fmt_t(r.get('mamba_fwd'))} | {ratio(r.get('speedup_fwd'))} | {ratio(r.get('gelem_s_fwd'), '{:.0f}')} | "
            f"{floor} | {ratio(r.get('pct_floor_fwd'), '{:.0f}%')} | {fmt_t(r.get('triton_fwdbwd'))} | "
            f"{fmt_t(r.get('mamba_fwdbwd'))} | {ratio(r.get('speedup_fwdbwd'))} | "
            f"{'; '.join(r.get('notes', [])) or ('checks failed' if not r.get('fwd_ok', True) else '')} |")
    queued = [r for r in res.get("configs", []) if r.get("fwd_q") or r.get("fwdbwd_q")]
    if queued:
        lines += ["", "The same calls queued back to back (one CUDA-event pair per call, one sync at the end of a "
                  "round, as a training loop runs them: the host prepares the next call while the GPU runs this one, "
                  "so host launch latency shows only where the host is the slower side). Median of each round, the "
                  "better of two interleaved rounds per side, ms; 'host': the host time of one of our calls, measured "
                  "with the GPU kept busy (where it is near the queued time, the row is host-bound):", "",
                  "| shape (b, d_inner, L) | dtype | Triton fwd | host | mamba-ssm fwd | speed-up | Triton fwd+bwd "
                  "| host | mamba-ssm fwd+bwd | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in queued:
            cells = []
            for part in ("fwd_q", "fwdbwd_q"):
                q = r.get(part)
                cells += ([fmt_t(q["triton"]), fmt_t(q.get("triton_host")), fmt_t(q["mamba"]), ratio(q["speedup"])]
                          if q else ["-"] * 4)
            lines.append(f"| {r['batch']}, {r['d_inner']}, {r['L']} | {r['dtype']} | " + " | ".join(cells) + " |")
    with_fn = [r for r in res.get("configs", []) if r.get("mamba_fn_fwd")]
    if with_fn:
        lines += ["", "Against mamba-ssm's `selective_scan_fn` (its autograd function around the same CUDA kernels; "
                  "the tables above call the extension's fwd / bwd directly, without autograd or Python). Both sides "
                  "called alike: the forward on plain tensors, fwd+bwd on the same leaves with `.backward(dout)`. "
                  "Synced CUDA-event timings as in the first table, then queued as in the second (ms):", "",
                  "| shape (b, d_inner, L) | dtype | Triton fwd | selective_scan_fn fwd | speed-up | Triton fwd+bwd "
                  "| selective_scan_fn fwd+bwd | speed-up | queued: Triton fwd+bwd | queued: selective_scan_fn "
                  "| speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in with_fn:
            q = r.get("fwdbwd_fn_q") or {}
            lines.append(
                f"| {r['batch']}, {r['d_inner']}, {r['L']} | {r['dtype']} | {fmt_t(r.get('triton_fwd'))} | "
                f"{fmt_t(r.get('mamba_fn_fwd'))} | {ratio(r.get('speedup_fwd_fn'))} | "
                f"{fmt_t(r.get('triton_fwdbwd'))} | {fmt_t(r.get('mamba_fn_fwdbwd'))} | "
                f"{ratio(r.get('speedup_fwdbwd_fn'))} | {fmt_t(q.get('triton'))} | {fmt_t(q.get('mamba'))} | "
                f"{ratio(q.get('speedup'))} |")
    if res.get("step"):
        lines += ["", "One-step update (streaming), d_state 16, state fp32, activations bf16. GPU time per call (ms) "
                  "from CUDA-graph replay of 100 calls, and with plain launches:", "",
                  "| batch | d_inner | Triton (graph) | mamba-ssm Triton (graph) | speed-up | Triton (launch) "
                  "| mamba-ssm (launch) |", "|---|---|---|---|---|---|---|"]
        for r in res["step"]:
            lines.append(f"| {r['batch']} | {r['d_inner']} | {r['triton_graph_ms'] * 1e3:.1f} us | "
                         f"{(r.get('mamba_graph_ms') or 0) * 1e3:.1f} us | {r.get('speedup_graph', 0):.2f}x | "
                         f"{r['triton_launch_ms'] * 1e3:.1f} us | {(r.get('mamba_launch_ms') or 0) * 1e3:.1f} us |")
    if res.get("reference"):
        lines += ["", "PyTorch reference (sequential loop) and torch.compile of it, fp32, small shapes only:", ""]
        for r in res["reference"]:
            lines.append(f"- {tuple(r['shape'])}: reference {r['reference_ms']:.1f} ms, Triton {r['triton_ms']:.3f} ms"
                         + (f", torch.compile {r['compiled_ms']:.2f} ms (compile {r['compile_s']:.0f} s)"
                            if r.get("compiled_ms") else f" ({r.get('note', '')})"))
    if res.get("notes"):
        lines += ["", "Notes: " + " ".join(res["notes"])]
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def all_shapes() -> list[tuple[int, int, int, torch.dtype]]:
    """The issue's shapes in table order: (batch, d_inner, L, dtype)."""
    shapes = []
    for dtype in (torch.bfloat16, torch.float32):
        for d in (1536, 4096):
            for L in (2048, 8192, 32768, 131072):
                shapes.append((8, d, L, dtype))
        for d in (1536, 4096):
            shapes.append((1, d, 1 << 20, dtype))
    return shapes


def _shape_key(c: dict | tuple) -> tuple:
    """(batch, d_inner, L, dtype name) of a results row or of an all_shapes() tuple."""
    if isinstance(c, tuple):
        return (*c[:3], str(c[3]).replace("torch.", ""))
    return (c["batch"], c["d_inner"], c["L"], c["dtype"])


def merge_results(first: dict, second: dict) -> dict:
    """The first call's results with the second call's shapes added (in the benchmark's shape order); notes say
    which rows came from which call and what each measured of the card."""
    out = {**{k: v for k, v in second.items() if k not in first}, **first}  # e.g. the reference timings
    have = {_shape_key(c) for c in first["configs"]}
    added = [c for c in second["configs"] if _shape_key(c) not in have]
    order = {_shape_key(sh): i for i, sh in enumerate(all_shapes())}
    out["configs"] = sorted(first["configs"] + added, key=lambda c: order.get(_shape_key(c), len(order)))
    f2 = second["floors"]
    shapes = ", ".join(f"{c['batch']} x {c['d_inner']} x {c['L']} {c['dtype']}" for c in added)
    out["notes"] = [n for n in first.get("notes", []) if not n.startswith("time budget reached")] + [
        f"Rows {shapes} were measured in a second call on the same kind of card ({second['date']}, the first call "
        f"hit its time budget; copy {f2['copy_bw'] / 1e12:.2f} TB/s, compute floor "
        f"{f2['compute_elems_per_s'] / 1e9:.0f} G elem/s in that call)."] + second.get("notes", [])
    return out


def skip_input_checks() -> None:
    """The kernels' input validation syncs the GPU (a finiteness check): off for the benchmark processes (the checks
    here are ours). Set in main, not on import, so that importing this module (the tests do) changes nothing."""
    os.environ.setdefault("RMAMBA_SKIP_INPUT_CHECKS", "1")


def main() -> None:
    skip_input_checks()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--mamba-sdist", type=Path, default=ROOT / ".thirdparty" / "mamba_ssm-2.3.2.post1.tar.gz")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rmamba_bench"))
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--lean", action="store_true", help="core shapes, all-options checks only, no step benchmark")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--no-mamba", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference (~90 s)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="stop timing new shapes after this many seconds since the script started: setup counts "
                         "(the mamba-ssm build and the precompile take ~200-250 s on a fresh machine)")
    ap.add_argument("--render", type=Path, help="render a results JSON into BENCHMARKS.md and exit")
    ap.add_argument("--skip-done", type=Path, help="a results JSON of an earlier call on this card: skip the shapes "
                    "and the step benchmark it holds (a call that hit --budget-s is finished by a second call)")
    ap.add_argument("--merge", type=Path, help="with --render: add this second call's shapes to the table")
    ap.add_argument("--shapes", help="only these shapes, in this order: comma-separated BxDxL:dtype, e.g. "
                    "8x1536x32768:bfloat16,1x1536x1048576:float32")
    ap.add_argument("--ab", help="config A/B instead of the benchmark: 'plan' (AB_PLAN) or a JSON file of that form; "
                    "--shapes overrides its shapes; writes ab.json to --out")
    ap.add_argument("--precompile-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.precompile_worker:
        precompile_worker(json.loads(args.precompile_worker))
        return
    if args.render:
        res = json.loads(args.render.read_text())
        if args.merge:
            res = merge_results(res, json.loads(args.merge.read_text()))
        write_section(ROOT / "BENCHMARKS.md", "scan_gpu", render(res))
        return
    if args.ab:
        plan = dict(AB_PLAN) if args.ab == "plan" else json.loads(Path(args.ab).read_text())
        if args.shapes:
            plan["shapes"] = args.shapes
        run_ab(plan, args.out, args.budget_s)
        return
    done = json.loads(args.skip_done.read_text()) if args.skip_done else None
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    proc = None if args.no_mamba else start_mamba_build(args.mamba_sdist, args.work)
    shapes = all_shapes()
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    workers = start_precompile(precompile_specs(args.tune, args.lean, shapes))
    import triton

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M"), "notes": [], "configs": []}
    fl = {"copy_bw": copy_bandwidth(), **unit_rates()}
    fl["exp_only_elems_per_s"], fl["compute_elems_per_s"], fl["best_poly_share"] = compute_floor_rate(16, fl)
    res["floors"] = fl
    print("floors", fl, flush=True)
    fails = []
    for w in workers:
        _, err = w.communicate()
        if w.returncode != 0:
            fails.append(err.decode()[-1500:])
    print(f"precompiled {len(workers)} variant sets, {len(fails)} failed, {time.perf_counter() - t_start:.0f}s",
          flush=True)
    for f in fails[:2]:
        print("PRECOMPILE FAILURE:", f, flush=True)
    ok_small = small_checks(res, args.lean)
    print("small checks", "OK" if ok_small else "FAIL", f"{time.perf_counter() - t_start:.0f}s", flush=True)
    if args.tune:
        tune(res)
    ext, mstep, note = load_mamba(args.work, proc, timeout=max(30.0, 300 - (time.perf_counter() - t_start)))
    if note:
        res["notes"].append(note[:2000])
    print("mamba:", ext is not None, mstep is not None, note[:500], f"{time.perf_counter() - t_start:.0f}s", flush=True)

    def save():
        (args.out / "scan_gpu.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "BENCHMARKS_scan_gpu.md").write_text(render(res))

    save()
    if not args.lean and done is None:
        step_bench(mstep, res)
        save()
    if not ok_small:
        res["notes"].append("small-shape checks failed: nothing timed")
        save()
        return
    if args.lean:
        bf, f32 = torch.bfloat16, torch.float32
        shapes = [(8, 4096, 32768, bf), (8, 1536, 32768, bf), (8, 4096, 131072, bf), (1, 4096, 1 << 20, bf),
                  (1, 1536, 1 << 20, bf), (8, 4096, 2048, bf), (8, 4096, 32768, f32), (8, 1536, 32768, f32),
                  (8, 1536, 2048, bf)]
    if args.quick:
        shapes = [(8, 1536, 8192, torch.bfloat16), (8, 4096, 32768, torch.bfloat16), (1, 4096, 1 << 20, torch.bfloat16),
                  (8, 1536, 8192, torch.float32)]
    if done is not None:
        have = {_shape_key(c) for c in done["configs"]}
        shapes = [sh for sh in shapes if _shape_key(sh) not in have]
        print("shapes left from the earlier call:", shapes, flush=True)
    for (b, d, L, dtype) in shapes:
        if time.perf_counter() - t_start > args.budget_s:
            res["notes"].append(f"time budget reached: b{b} d{d} L{L} {dtype} and later shapes not run")
            continue
        try:
            run_config(b, d, L, dtype, None if args.no_mamba else ext, fl, args, res["configs"])
        except torch.cuda.OutOfMemoryError:
            res["configs"].append({"batch": b, "d_inner": d, "L": L, "dtype": str(dtype).replace("torch.", ""),
                                   "notes": ["out of memory"]})
            torch.cuda.empty_cache()
        save()
    if time.perf_counter() - t_start < args.budget_s and not args.lean:
        reference_and_compile(res, with_compile=not args.no_compile)
    save()
    print(render(res))


if __name__ == "__main__":
    main()
