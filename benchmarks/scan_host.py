"""Where the host time of one selective-scan call goes (GPU machine; a diagnosis tool, not a test).

    python benchmarks/scan_host.py --out DIR [--shapes 8x1536x2048:bfloat16,...]

At short sequences one forward + backward of the Triton scan can need more host time (Python, torch ops, kernel
launches) than the GPU needs for its kernels. Per shape this prints and writes (DIR/scan_host.json):
- host time of one call (wall time with the GPU kept busy first, so the host never waits: scan_gpu.host_time) for
  the inference forward and the forward + backward; the same with every Triton launch replaced by a no-op (what is
  left is the Python glue and the torch ops) and with the launch cache (_FAST_LAUNCH);
- GPU time of one synced call and of calls queued back to back (scan_gpu.cuda_time / queued_time);
- a cProfile of 20 forward + backward calls with the GPU kept busy (top functions by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan_gpu import ROOT, cuda_time, fwd_bwd, host_time, make_inputs, parse_shapes, queued_time, skip_input_checks  # noqa: E402

sys.path.insert(0, str(ROOT))


def _stub_launch(kernel, grid, args, kw):
    return None


def profile_shape(b: int, d: int, L: int, dtype: torch.dtype) -> dict:
    from kernels import triton_scan as ts

    tag = f"{b}x{d}x{L}:{str(dtype).replace('torch.', '')}"
    inp = make_inputs(b, d, L, 16, dtype, seed=L + 11)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in names}
    dout = torch.randn_like(inp["u"])
    kw = dict(D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"], delta_softplus=True)

    def fb():
        fwd_bwd(ts, leaves, dout)

    def fwd():
        ts.selective_scan_triton(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], **kw)

    fast = ts._FAST_LAUNCH
    ts._FAST_LAUNCH = False                     # Triton's own launcher first; the launch cache's rows below
    fb()
    fwd()
    torch.cuda.synchronize()
    rec = {"shape": tag, "fwd_cfg": ts._pick_config(b, d, L, dtype, inp["u"].device, False),
           "bwd_cfg": ts._pick_config(b, d, L, dtype, inp["u"].device, True)}
    rec["host_fwd"], rec["host_fb"] = host_time(fwd), host_time(fb)
    rec["cuda_fb"], rec["queued_fb"] = cuda_time(fb), queued_time(fb)
    orig = ts._launch
    ts._launch = _stub_launch
    try:
        rec["host_fwd_no_launch"], rec["host_fb_no_launch"] = host_time(fwd), host_time(fb)
    finally:
        ts._launch = orig
    ts._FAST_LAUNCH = True
    try:
        fb()
        fwd()
        rec["host_fwd_fast"], rec["host_fb_fast"] = host_time(fwd), host_time(fb)
        rec["queued_fb_fast"] = queued_time(fb)
    finally:
        ts._FAST_LAUNCH = fast
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)           # ~0.5 s of GPU work: the profiled calls never wait for the GPU
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        fb()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    rec["cprofile_fb_20_calls"] = s.getvalue()
    for k, v in rec.items():
        if isinstance(v, dict) and "median_ms" in v:
            print(f"{tag} {k:22s} median {v['median_ms']:.3f} ms (min {v['min_ms']:.3f})", flush=True)
    print(rec["cprofile_fb_20_calls"], flush=True)
    return rec


def main() -> None:
    skip_input_checks()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="8x1536x2048:bfloat16,8x1536x2048:float32,8x1536x8192:bfloat16")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    for sh in parse_shapes(args.shapes):
        res["shapes"].append(profile_shape(*sh))
        (args.out / "scan_host.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
