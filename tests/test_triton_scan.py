"""The Triton scan (forward, backward, segments, streaming) and step kernels against the fp64 reference.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels are imported), so the
shapes are tiny: one or two channel blocks, d_state 4 (16 once), tens of steps. The interpreter executes the same
kernel code as the GPU (block shapes, masks, segment chaining, chunked backward) but not the compiler's layouts:
benchmarks/scan_gpu.py repeats the checks on the device at full size.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from kernels import selective_scan, selective_state_update  # noqa: E402
from kernels.reference import selective_scan_reference  # noqa: E402

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ts():
    """kernels.triton_scan in interpreter mode (re-imported if an earlier test loaded it compiled)."""
    for name in ("kernels.triton_scan", "kernels.triton_step"):
        mod = sys.modules.get(name)
        if mod is not None:
            importlib.reload(mod)
    mod = importlib.import_module("kernels.triton_scan")
    assert type(mod._fwd_kernel).__name__ == "InterpretedFunction", "kernels must run under the interpreter here"
    saved = (dict(mod._CONFIG_OVERRIDE), mod.CK_DEFAULT)
    yield mod
    mod._CONFIG_OVERRIDE.clear()
    mod._CONFIG_OVERRIDE.update(saved[0])
    mod.CK_DEFAULT = saved[1]


def configure(ts, n_seg=1, ck=8, bwd_seg=None, G=4, T=None, TC=2, bc_pre=True, n_poly=1, fma_rcp=True, stages=None):
    """Small blocks and chunks so that tiny problems still cross every boundary the GPU sizes do. Forward: G lanes
    per channel (d_state split G ways; 8 channels per program at G = 4), T-step tiles (T divides ck), B / C loaded
    TC steps at a time, the first N_POLY states of each lane through the polynomial exp2, reciprocals in softplus
    and sigmoid on the FMA units (fma_rcp) or the special-function unit. stages: the one-lane kernel's (G = 1)
    loads, 0 = register prefetch one tile ahead, >= 2 = inside the loop for Triton's pipeliner."""
    ts.CK_DEFAULT = ck
    ts._CONFIG_OVERRIDE["fwd"] = {"n_seg": n_seg, "G": G, "T": T or max(4, G), "TC": TC, "BC_PRE": bc_pre,
                                  "N_POLY": n_poly, "FMA_RCP": fma_rcp, "num_warps": 1}
    if stages is not None:
        ts._CONFIG_OVERRIDE["fwd"]["STAGES"] = stages
    ts._CONFIG_OVERRIDE["bwd"] = {"n_seg": bwd_seg or n_seg, "BLOCK_D": 32, "num_warps": 1}


def make(b, d, n, L, dtype=torch.float32, seed=0):
    """Random inputs in Mamba's ranges (delta ~ softplus(-4..-1 + bias), A = -exp(.)), never zeros."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.rand(b, d, L, generator=g) * 3.0 - 4.0
    A = -torch.exp(torch.randn(d, n, generator=g) * 0.5) * torch.arange(1, n + 1)[None] * 0.5
    B = torch.randn(b, n, L, generator=g)
    C = torch.randn(b, n, L, generator=g)
    D = torch.randn(d, generator=g)
    z = torch.randn(b, d, L, generator=g)
    bias = torch.randn(d, generator=g) * 0.5 + 1.0
    h0 = torch.randn(b, d, n, generator=g)
    acts = {"u": u.to(dtype), "delta": delta.to(dtype), "z": z.to(dtype), "B": B.to(dtype), "C": C.to(dtype)}
    return {"A": A, "D": D, "delta_bias": bias, "initial_state": h0, **acts}


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten output?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_both(inp, softplus=True, final=True, use=ARGS, grads=False, seed=1):
    """Triton (on inp's dtype) and the reference (fp64) on the same inputs; optionally with gradients of a random
    linear function of y (and of the final state)."""
    kw = {k: inp[k] for k in use}
    kw64 = {k: v.double() for k, v in kw.items()}
    if grads:
        kw = {k: v.clone().requires_grad_() for k, v in kw.items()}
        kw64 = {k: v.clone().requires_grad_() for k, v in kw64.items()}
    out = selective_scan(**kw, delta_softplus=softplus, return_final_state=final, backend="triton")
    ref = selective_scan_reference(**kw64, delta_softplus=softplus, return_final_state=final)
    if not grads:
        return out, ref, None, None
    g = torch.Generator().manual_seed(seed)
    outs, refs = (out, ref) if final else ((out,), (ref,))
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    sum(((o.double() * w).sum() for o, w in zip(outs, weights))).backward()
    sum(((r * w).sum() for r, w in zip(refs, weights))).backward()
    return out, ref, {k: v.grad for k, v in kw.items()}, {k: v.grad for k, v in kw64.items()}


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("n_seg", [1, 3])
def test_forward_all_options(ts, n_seg, G):
    """Both forward kernels: one lane per channel (G = 1) and d_state split over 4 lanes."""
    configure(ts, n_seg=n_seg, G=G)
    inp = make(2, 32, 4, 45)                   # 45: not a multiple of the tile (4) or the chunk (8)
    (y, hT), (yr, hr), _, _ = run_both(inp)
    assert y.shape == yr.shape and y.dtype == torch.float32
    assert rel(y, yr) < 1e-5 and rel(hT, hr) < 1e-5


@pytest.mark.parametrize("stages,T", [(0, 4), (3, 8), (2, 4)])
@pytest.mark.parametrize("n_seg", [1, 3])
def test_forward_one_lane_load_stages(ts, stages, T, n_seg):
    """The one-lane forward (G = 1) with its loads prefetched in registers (stages 0) or left in the loop for the
    pipeliner: y, the final state and, through the backward, the checkpoints; L not a multiple of T or the chunk."""
    configure(ts, n_seg=n_seg, G=1, T=T, stages=stages)
    inp = make(2, 40, 4, 45, seed=30 + stages)
    (y, hT), (yr, hr), g, gr = run_both(inp, grads=True)
    assert rel(y, yr) < 1e-5 and rel(hT, hr) < 1e-5
    for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"):
        assert rel(g[k], gr[k]) < 1e-5, k
    configure(ts, G=1, T=T, stages=stages)
    inp = make(1, 32, 3, 19, seed=31)
    inp["delta"] = torch.rand_like(inp["delta"]) * 0.2 + 0.01          # positive step sizes without softplus
    y, yr, _, _ = run_both(inp, softplus=False, final=False, use=("u", "delta", "A", "B", "C"))
    assert rel(y, yr) < 1e-5


@pytest.mark.parametrize("G,T,TC,bc_pre,n_poly,nw,fma_rcp", [
    (1, 4, 4, True, 0, 1, False),        # one lane holds all states (32 channels per program)
    (2, 8, 2, False, 1, 1, True),
    (4, 8, 8, True, 0, 2, True),         # two warps: 16 channels per program
    (4, 4, 2, False, 1, 1, False),       # one step per lane per tile
])
def test_forward_state_split_layouts(ts, G, T, TC, bc_pre, n_poly, nw, fma_rcp):
    """The d_state split (G lanes per channel), tile and chunk sizes, against the reference: d_state 16 and 3
    (padded to 4), channels not a multiple of the block, L not a multiple of the tile, with and without segments."""
    for n, n_seg, seed in ((16, 1, 21), (3, 3, 22)):
        configure(ts, n_seg=n_seg, G=G, T=T, TC=TC, bc_pre=bc_pre, n_poly=n_poly, fma_rcp=fma_rcp)
        ts._CONFIG_OVERRIDE["fwd"]["num_warps"] = nw
        inp = make(2, 40, n, 29, seed=seed)
        (y, hT), (yr, hr), _, _ = run_both(inp)
        assert rel(y, yr) < 1e-5 and rel(hT, hr) < 1e-5, (n, n_seg)


@pytest.mark.parametrize("G", [2, 4])
def test_forward_state_split_unpadded_fp32_rows(ts, G):
    """The split forward's B / C rows when nothing needs padding (L a multiple of the tile, d_state a power of two)
    and B / C are fp32 already: they must still be copied into rows (.to() of an fp32 view would return the view
    itself, which the kernel would read as rows: wrong y); forward, final state and, through the checkpoints, the
    gradients against the reference; also with 16-bit u / delta / z beside fp32 B / C."""
    configure(ts, n_seg=1, G=G, T=8, TC=4)
    for n, seed in ((16, 40), (4, 41)):
        inp = make(2, 24, n, 32, seed=seed)
        (y, hT), (yr, hr), g, gr = run_both(inp, grads=True)
        assert rel(y, yr) < 1e-5 and rel(hT, hr) < 1e-5, n
        for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"):
            assert rel(g[k], gr[k]) < 1e-5, (n, k)
    inp = make(1, 16, 16, 16, seed=42)
    for k in ("u", "delta", "z"):
        inp[k] = inp[k].to(torch.bfloat16)
    (y, hT), (yr, hr), _, _ = run_both(inp)
    assert y.dtype == torch.bfloat16 and rel(y, yr) < 1e-2 and rel(hT, hr) < 1e-3


def test_inference_call_skips_autograd_with_the_same_result(ts, monkeypatch):
    """Without gradients (no_grad, or no input requiring one) the kernels run without the autograd Function around
    them: the outputs carry no graph; they agree with the differentiable call's (whose forward also writes the
    backward's checkpoints, so its segments may differ: equal to rounding, not bit for bit)."""
    configure(ts, n_seg=2, G=1, T=4)
    inp = make(2, 32, 4, 37, seed=50)
    kw = dict(D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"], delta_softplus=True,
              initial_state=inp["initial_state"], return_final_state=True)
    args = [inp[k] for k in ("u", "delta", "A", "B", "C")]
    leaf = args[0].clone().requires_grad_()

    def no_function(*a):
        raise AssertionError("the autograd Function ran for an inference call")

    with monkeypatch.context() as mp:
        mp.setattr(ts._SelectiveScanFn, "apply", no_function)
        y0, h0 = ts.selective_scan_triton(*args, **kw)
        with torch.no_grad():
            y1, h1 = ts.selective_scan_triton(leaf, *args[1:], **kw)
    assert y0.grad_fn is None and h0.grad_fn is None and y1.grad_fn is None
    y2, h2 = ts.selective_scan_triton(leaf, *args[1:], **kw)
    assert y2.grad_fn is not None
    assert torch.equal(y0, y1) and torch.equal(h0, h1)
    assert rel(y0, y2.detach()) < 1e-6 and rel(h0, h2.detach()) < 1e-6


@pytest.mark.parametrize("use,softplus", [
    (("u", "delta", "A", "B", "C"), False),
    (("u", "delta", "A", "B", "C", "D"), False),
    (("u", "delta", "A", "B", "C", "z"), True),
    (("u", "delta", "A", "B", "C", "delta_bias"), True),
])
def test_forward_option_subsets(ts, use, softplus):
    configure(ts)
    inp = make(1, 32, 4, 19, seed=3)
    if not softplus:
        inp["delta"] = torch.rand_like(inp["delta"]) * 0.2 + 0.01   # positive step sizes without softplus
    y, yr, _, _ = run_both(inp, softplus=softplus, final=False, use=use)
    assert rel(y, yr) < 1e-5


def test_forward_odd_sizes_and_d_state_16(ts):
    configure(ts, n_seg=2)
    inp = make(1, 40, 3, 23, seed=4)           # two channel blocks (one partial), d_state not a power of two
    (y, hT), (yr, hr), _, _ = run_both(inp)
    assert rel(y, yr) < 1e-5 and rel(hT, hr) < 1e-5
    inp = make(1, 32, 16, 9, seed=5)
    (y, hT), (yr, hr), _, _ = run_both(inp)
    assert rel(y, yr) < 1e-5 and rel(hT, hr) < 1e-5


def test_forward_bf16_inputs(ts):
    configure(ts, n_seg=2)
    inp = make(1, 32, 4, 30, dtype=torch.bfloat16, seed=6)
    (y, hT), (yr, hr), _, _ = run_both(inp)
    assert y.dtype == torch.bfloat16 and hT.dtype == torch.float32
    assert rel(y, yr) < 1e-2 and rel(hT, hr) < 1e-2


def test_chunked_streaming_is_exact(ts):
    """Scanning [0, L1) then [L1, L) from the carried state equals one scan of [0, L)."""
    configure(ts)
    inp = make(1, 32, 4, 27, seed=7)
    kw = {k: inp[k] for k in ARGS if k != "initial_state"}
    y, hT = selective_scan(**kw, delta_softplus=True, return_final_state=True, backend="triton")
    cut = 13
    first = {k: (v[..., :cut] if v.dim() == 3 else v) for k, v in kw.items()}
    second = {k: (v[..., cut:] if v.dim() == 3 else v) for k, v in kw.items()}
    y1, h1 = selective_scan(**first, delta_softplus=True, return_final_state=True, backend="triton")
    y2, h2 = selective_scan(**second, initial_state=h1, delta_softplus=True, return_final_state=True,
                            backend="triton")
    assert rel(torch.cat([y1, y2], -1), y) < 1e-6 and rel(h2, hT) < 1e-6


@pytest.mark.parametrize("n_seg,ck", [(1, 8), (2, 4)])
def test_backward_all_options(ts, n_seg, ck):
    configure(ts, n_seg=n_seg, ck=ck)
    inp = make(1, 32, 4, 21, seed=8)
    _, _, g, gr = run_both(inp, grads=True)
    for k in ARGS:
        assert rel(g[k], gr[k]) < 1e-5, k


@pytest.mark.parametrize("ck_bwd", [4, 16])
def test_backward_checkpoint_interval_from_config(ts, ck_bwd):
    """The backward config's CK, not CK_DEFAULT, sets the spacing at which the forward (with checkpoints) writes the
    state and the backward reads it: another spacing than CK_DEFAULT, with segments, still gives the reference."""
    configure(ts, n_seg=2, ck=8)
    ts._CONFIG_OVERRIDE["bwd"]["CK"] = ck_bwd
    inp = make(1, 32, 4, 37, seed=30 + ck_bwd)
    args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    _, _, ck = ts._forward(*args, True, True)
    assert ck.shape[1] == triton.cdiv(37, ck_bwd)
    _, _, g, gr = run_both(inp, grads=True)
    for k in ARGS:
        assert rel(g[k], gr[k]) < 1e-5, k


@pytest.mark.parametrize("n", [8, 16])
def test_backward_d_state_8_and_16(ts, n):
    """d_state 8 and 16: each warp's dB / dC sums end as one or two values per lane (reduce-scatter over 32 lanes);
    40 channels: a full and a partial channel block."""
    configure(ts, n_seg=2, ck=4)
    inp = make(1, 40, n, 11, seed=12 + n)
    _, _, g, gr = run_both(inp, grads=True)
    for k in ARGS:
        assert rel(g[k], gr[k]) < 1e-5, k


def test_backward_minimal_options(ts):
    configure(ts)
    inp = make(1, 32, 4, 14, seed=9)
    inp["delta"] = torch.rand_like(inp["delta"]) * 0.2 + 0.01
    use = ("u", "delta", "A", "B", "C")
    _, _, g, gr = run_both(inp, softplus=False, final=False, use=use, grads=True)
    for k in use:
        assert rel(g[k], gr[k]) < 1e-5, k


def test_backward_bf16_inputs(ts):
    configure(ts)
    inp = make(1, 32, 4, 13, dtype=torch.bfloat16, seed=10)
    _, _, g, gr = run_both(inp, grads=True)
    assert g["u"].dtype == torch.bfloat16 and g["A"].dtype == torch.float32
    assert g["B"].dtype == torch.bfloat16
    for k in ARGS:
        assert rel(g[k], gr[k]) < 1e-2, k


def test_gradients_come_in_the_inputs_layouts(ts):
    """dA in A's (d_inner, d_state) layout and 16-bit dB / dC in B's (batch, d_state, L), so that autograd does not
    copy them once more (torch.autograd.grad shows the backward's own tensors; a leaf's .grad would be re-laid)."""
    configure(ts)
    inp = make(1, 32, 4, 13, dtype=torch.bfloat16, seed=11)
    leaves = {k: inp[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C", "z")}
    y = selective_scan(**leaves, delta_softplus=True, backend="triton")
    gA, gB, gC = torch.autograd.grad(y.float().sum(), (leaves["A"], leaves["B"], leaves["C"]))
    assert gA.is_contiguous() and gB.is_contiguous() and gC.is_contiguous()
    assert gB.dtype == gC.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype,L,cfg", [
    (torch.bfloat16, 38, {"WB": 16, "WIDE_ST": True}),                       # 2-step words, groups of 8 steps
    (torch.bfloat16, 22, {"WB": 8, "WIDE_ST": False, "LA": 2}),   # groups of 4, stores per tile
    (torch.float32, 19, {"WB": 16, "WIDE_ST": True, "LA": 1}),    # groups of 4 fp32 steps, odd L
    (torch.bfloat16, 21, {"WB": 16, "WIDE_ST": True}),                       # odd L: no words, tile-wide loads
])
def test_backward_grouped_loads(ts, dtype, L, cfg):
    """The backward's per-element inputs read a group of W steps at a time (and gradients written so), L not a
    multiple of the group: bit-identical to tile-wide loads (W = T) and close to the fp64 reference."""
    configure(ts, n_seg=2, ck=16)
    inp = make(1, 40, 4, L, dtype=dtype, seed=40 + L)
    ts._CONFIG_OVERRIDE["bwd"].update({"WB": 1, "WIDE_ST": False})
    _, _, g0, gr = run_both(inp, grads=True)
    ts._CONFIG_OVERRIDE["bwd"].update(cfg)
    _, _, g1, _ = run_both(inp, grads=True)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for k in ARGS:
        assert torch.equal(g1[k], g0[k]), k
        assert rel(g1[k], gr[k]) < tol, k


def test_shuffle_layout_check(ts):
    """The check that guards the warp shuffles: they need the group's lanes on the lowest lane bits (forward: G lanes
    of a channel, dim 0; backward: 32 channels, one per lane). Wrong layouts, or no shuffle found, must fail it."""
    def ir(layout, shape="4x8"):
        return (f"#l = {layout}\n"
                f'%1 = tt.elementwise_inline_asm "shfl.sync.idx.b32 $0, $1, $2, $3, -1;" {{constraints = "=r,r,r,r", '
                f"packed_element = 1 : i32, pure = true}} %0 : tensor<{shape}xf32, #l> -> tensor<{shape}xf32, #l>\n")
    g_low = "#ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [4, 8], warpsPerCTA = [1, 1], order = [0, 1]}>"
    d_low = "#ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [4, 8], warpsPerCTA = [1, 1], order = [1, 0]}>"
    lin_ok = ("#ttg.linear<{register = [], lane = [[1, 0], [2, 0], [0, 1], [0, 2], [0, 4]], warp = [], "
              "block = []}>")
    lin_bad = ("#ttg.linear<{register = [], lane = [[0, 1], [0, 2], [0, 4], [1, 0], [2, 0]], warp = [], "
               "block = []}>")
    assert ts._shfl_layout_ok(ir(g_low), 4) and ts._shfl_layout_ok(ir(lin_ok), 4)
    assert not ts._shfl_layout_ok(ir(d_low), 4) and not ts._shfl_layout_ok(ir(lin_bad), 4)
    lanes = "#ttg.blocked<{sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [1], order = [0]}>"
    assert ts._shfl_layout_ok(ir(lanes, "32"), 32) and not ts._shfl_layout_ok(ir(g_low), 32)
    assert not ts._shfl_layout_ok(f"#l = {g_low}\n", 4)                 # no shuffle: not trusted


def test_shuffle_layout_check_reads_compiled_ir():
    """Compile the forward for sm_90 with the installed Triton (no GPU needed) and run the check on its real TTGIR:
    the regexes must find the shuffles and parse their layouts (whether this Triton passes decides speed, not
    correctness: a failing kernel is rerun without shuffles)."""
    code = """
import re, sys
sys.path.insert(0, ".")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.triton_scan as ts
fn = ts._fwd_split_kernel
consts = dict(N=16, NP=16, G=4, BLOCK_D=8, T=8, CK=0, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True,
              HAS_H0=False, LOCAL=False, N_POLY=0, TC=4, BC_PRE=True, FMA_RCP=True, SHFL=True)
sig = {n: ("constexpr" if n in consts else "*bf16" if n in ("u_ptr", "dt_ptr", "z_ptr", "y_ptr")
           else "*fp32" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
ir = k.asm["ttgir"]
used = set(re.findall(r'elementwise_inline_asm "shfl[^\\n]*-> tensor<[^,>]*, (#[\\w]+)>', ir))
defs = dict(re.findall(r"^(#[\\w]+) = (#ttg\\.\\w+<.*>)\\s*$", ir, re.M))
assert used and all(ts._lane_bases(defs[u]) for u in used), (used, list(defs))
print("layout ok" if ts._shfl_layout_ok(ir, 4) else "layout differs")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("compiling for sm_90 took too long")
    if r.returncode != 0 and ("ptxas" in r.stderr or "No module named" in r.stderr):
        pytest.skip("this Triton cannot compile for sm_90 here: " + r.stderr[-300:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] in ("layout ok", "layout differs")


@pytest.mark.parametrize("b,d,n", [(3, 40, 16), (2, 256, 16), (2, 128, 3)])
def test_step_kernel_matches_torch_step(ts, b, d, n):
    """The Triton one-step kernel against the torch step (the exact path), state in place: masked loads (d_inner
    not a multiple of the blocks, or d_state not a power of two) and the unmasked EVEN path (2, 256, 16)."""
    ts_step = importlib.import_module("kernels.triton_step")
    g = torch.Generator().manual_seed(11)
    state = torch.randn(b, d, n, generator=g)
    x, dt, z = (torch.randn(b, d, generator=g) for _ in range(3))
    A = -torch.exp(torch.randn(d, n, generator=g))
    B, C = torch.randn(b, n, generator=g), torch.randn(b, n, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    s_ref = state.clone()
    y_ref = selective_state_update(s_ref, x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)
    s_tri = state.clone()
    y = ts_step.selective_state_update_triton(s_tri, x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)
    assert rel(y, y_ref) < 1e-5 and rel(s_tri, s_ref) < 1e-5


def test_triton_backend_rejects_cpu_without_interpreter(ts, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inp = make(1, 32, 4, 5)
    with pytest.raises(RuntimeError, match="CUDA"):
        ts.selective_scan_triton(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"])


def test_wave_segments(ts):
    """Segment counts fill whole waves of resident programs: at least min_waves, the fullest last wave among up to
    twice that many, never more than n_max (H200 cases: 132 SMs, 8 backward / 16 forward programs per SM)."""
    ws = ts._wave_segments
    assert ws(384, 8 * 132, 3, 128) == 11              # 8 x 1536 backward: exactly 4 waves
    assert ws(48, 8 * 132, 3, 4096) == 66              # 1 x 1536 x 1M backward: exactly 3 waves
    assert ws(128, 8 * 132, 3, 4096) == 33             # 1 x 4096 x 1M backward: exactly 4 waves
    assert ws(384, 16 * 132, 2, 128) == 11             # 8 x 1536 forward: exactly 2 waves
    assert ws(384, 8 * 132, 3, 8) == 8                 # short sequence: capped by n_max
    assert ws(5000, 8 * 132, 3, 1) == 1
    for warps in (1, 7, 48, 100, 384, 700):
        for n_max in (1, 3, 40, 1000):
            n = ws(warps, 8 * 132, 3, n_max)
            assert 1 <= n <= n_max


def test_launch_cache_keys_and_argument_order(ts, monkeypatch):
    """_launch's cached path (GPU only, so checked here with a stand-in kernel): the first call of a key goes
    through kernel[grid](...); later calls launch the kept compiled kernel with every parameter in signature order
    (given positionals, then constexprs from the keywords or their defaults, launch options left out) on a 3-D grid;
    a change in what Triton specialises on (alignment, an int becoming 1 / not divisible by 16, dtype, a constexpr)
    is a new key."""
    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *a: calls.append(("cached", grid, a))

    def body(x_ptr, y_ptr, n, stride, BLOCK, FLAG=True, EV=""):                 # a kernel: constexprs last
        pass

    class Kernel:
        fn = staticmethod(body)

        def __getitem__(self, grid):
            def run(*a, **kw):
                calls.append(("triton", grid, a, kw))
                return Compiled()
            return run

    monkeypatch.setattr(ts, "_FAST_LAUNCH", True)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(ts, "_FAST_CACHE", {})
    k = Kernel()
    buf = torch.zeros(64)
    x, y = buf[:16], buf[16:32]
    ts._launch(k, (3,), (x, y, 32, 48), dict(BLOCK=8, num_warps=4))
    ts._launch(k, (5, 2), (y, x, 64, 16), dict(BLOCK=8, num_warps=4))          # same key: aligned, %16, fp32
    assert calls[0][0] == "triton" and calls[1] == ("cached", (5, 2, 1), (y, x, 64, 16, 8, True, ""))
    variants = [((buf[1:17], y, 32, 48), dict(BLOCK=8, num_warps=4)),          # x not 16-byte aligned
                ((x, y, 1, 48), dict(BLOCK=8, num_warps=4)),                   # n == 1
                ((x, y, 33, 48), dict(BLOCK=8, num_warps=4)),                  # n not a multiple of 16
                ((x.double(), y, 32, 48), dict(BLOCK=8, num_warps=4)),         # dtype
                ((x, y, 32, 48), dict(BLOCK=16, num_warps=4)),                 # constexpr
                ((x, y, 32, 48), dict(BLOCK=8, num_warps=8)),                  # launch option
                ((x, y, 1 << 31, 48), dict(BLOCK=8, num_warps=4))]             # 64-bit int
    for args, kw in variants:
        n = len(calls)
        ts._launch(k, (1,), args, kw)
        assert calls[n][0] == "triton", (args[2:], kw)
    monkeypatch.setenv("TRITON_INTERPRET", "1")                               # the interpreter never caches
    n = len(calls)
    ts._launch(k, (1,), (x, y, 32, 48), dict(BLOCK=8, num_warps=4))
    assert calls[n][0] == "triton"


def test_launch_cache_default(ts, monkeypatch):
    """The launch cache is on by default only with the Triton release it was checked with (3.6); the environment
    variable turns it on or off for any release, and a value other than 0 / 1 is an error naming it."""
    monkeypatch.delenv("RMAMBA_TRITON_FAST_LAUNCH", raising=False)
    for version, on in (("3.6.0", True), ("3.6.1+git", True), ("3.5.1", False), ("3.9.0", False),
                        ("3.60.0", False), ("4.6.0", False)):
        monkeypatch.setattr(triton, "__version__", version)
        assert ts._fast_launch_default() is on, version
        monkeypatch.setenv("RMAMBA_TRITON_FAST_LAUNCH", "0")
        assert ts._fast_launch_default() is False
        monkeypatch.setenv("RMAMBA_TRITON_FAST_LAUNCH", "1")
        assert ts._fast_launch_default() is True
        monkeypatch.delenv("RMAMBA_TRITON_FAST_LAUNCH")
    monkeypatch.setenv("RMAMBA_TRITON_FAST_LAUNCH", "yes")
    with pytest.raises(ValueError, match="RMAMBA_TRITON_FAST_LAUNCH"):
        ts._fast_launch_default()


def test_host_integer_helpers_match_triton():
    """kernels._host's cdiv / next_pow2 (the host code's replacements for Triton's constexpr functions) agree with
    Triton's on every value the kernels' host code can pass."""
    from kernels._host import cdiv, next_pow2

    for a in range(1, 3000):
        assert next_pow2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 7, 16, 32, 512):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert cdiv(0, 5) == 0 and next_pow2(1 << 40) == 1 << 40 and next_pow2((1 << 40) + 1) == 1 << 41


@pytest.mark.parametrize("use_h0", [True, False])
def test_chain_in_main_passes(ts, use_h0, monkeypatch):
    """CHAIN_IN: the main passes chain their start state (forward) / incoming carry (backward) themselves from the
    LOCAL results instead of _chain_kernel's output. Four segments (start states that fold 0-3 earlier segments),
    one-lane forward, with and without an initial state and a final-state gradient: y, the final state and every
    gradient against the reference, and against the same run through _chain_kernel."""
    use = ARGS if use_h0 else ARGS[:-1]
    inp = make(2, 40, 4, 61, seed=41 + use_h0)
    out = {}
    launched = []
    real = ts._launch

    def spy(kernel, grid, args, kw):
        launched.append(getattr(getattr(kernel, "fn", None), "__name__", str(kernel)))
        return real(kernel, grid, args, kw)

    monkeypatch.setattr(ts, "_launch", spy)
    for chain_in in (False, True):
        configure(ts, n_seg=4, ck=4, G=1, T=4)
        ts._CONFIG_OVERRIDE["fwd"]["CHAIN_IN"] = chain_in
        ts._CONFIG_OVERRIDE["bwd"]["CHAIN_IN"] = chain_in
        launched.clear()
        (y, h), (yr, hr), g, gr = run_both(inp, use=use, grads=True, final=True)
        assert ("_chain_kernel" in launched) != chain_in, launched
        assert rel(y, yr) < 1e-5 and rel(h, hr) < 1e-5
        for k in use:
            assert rel(g[k], gr[k]) < 1e-5, (chain_in, k)
        out[chain_in] = (y, h, g)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    for k in ("u", "delta", "z", "initial_state") if use_h0 else ("u", "delta", "z"):
        assert rel(out[True][2][k], out[False][2][k]) < 1e-6, k


def test_gradient_cast_helper():
    import kernels.triton_scan as tsm

    x = torch.randn(3, 4, 5).transpose(1, 2)
    assert tsm._as(None, torch.float32) is None and tsm._as(x, None) is None
    assert tsm._as(x, torch.float32) is x                        # same dtype: no copy, layout kept
    y = tsm._as(x, torch.bfloat16, torch.contiguous_format)
    assert y.dtype == torch.bfloat16 and y.is_contiguous() and torch.equal(y, x.to(torch.bfloat16))
    assert tsm._as(x, torch.bfloat16).stride() == x.stride()     # preserve_format by default
