"""Benchmark: one RoM layer against a dense Mamba layer of the same ACTIVE width, forward + backward.

A layer is the residual block (RMSNorm -> mixer -> residual) of rmamba.blocks at d_model 1024 (d_inner 2048,
d_state 16), on our scan kernels (Triton on CUDA), under bf16 autocast on CUDA (fp32 on the CPU). The RoM layer
with K=1 touches one expert's W_x, W_z, W_o per token, as many weights as the dense layer, plus the router: the
target (issue 5) is RoM (E=8, K=1) forward + backward within 1.3x the dense layer's time. Further rows show that
the time follows K and not E (E = 1, 8, 32 at K=1; K = 2 at E=8), and what the GPU path (grouped matmul, Triton slot
moves, the fused conv) buys over the plain torch path (a loop over the experts, slot moves by index_select and
copies, torch's conv1d). On a GPU every row (the dense layer's too: its conv) is first checked against that torch
path on the same weights and inputs.

    python benchmarks/rom_layer.py --device cuda --out rom-layer.json    # on the GPU machine
    python benchmarks/rom_layer.py --render rom-layer.json              # here: write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _markdown import write_section  # noqa: E402  (sibling module; benchmarks run as scripts)

import kernels  # noqa: E402
import kernels.conv as conv  # noqa: E402
import kernels.route as route  # noqa: E402
import kernels.slots as slots  # noqa: E402
import rmamba.rom as rom  # noqa: E402
from rmamba.blocks import Block  # noqa: E402
from rmamba.config import RoMConfig  # noqa: E402


def make_layer(d_model: int, experts: int, top_k: int, device: torch.device, seed: int = 0) -> Block:
    torch.manual_seed(seed)
    cfg = RoMConfig(d_model=d_model, n_layers=1, num_experts=experts, top_k=min(top_k, max(experts, 1)))
    return Block(cfg).to(device)


def fwd_bwd(layer: Block, h: torch.Tensor, w: torch.Tensor, amp: bool) -> torch.Tensor:
    """One forward + backward; returns the output (detached)."""
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
    with ctx:
        out, _, stats = layer(h)
        loss = (out.float() * w).sum()
        if stats is not None:
            loss = loss + stats.aux_loss(1e-2, 1e-3)
    loss.backward()
    return out.detach()


def time_ms(fn, device: torch.device, repeats: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Per call: the time of one fn() from an idle device to its end (CUDA events on a GPU), and the host time
    until fn() returned (where the two are close, the host is the slower side). Returns (times, host_times), ms."""
    for _ in range(warmup):
        fn()
    times, host = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            start.record()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            host.append(times[-1])
    return times, host


def time_queued_ms(fn, device: torch.device, repeats: int) -> float:
    """Per call, ms: ``repeats`` calls queued back to back as a training loop runs them (one CUDA-event pair around
    all of them, one sync at the end), so the host prepares the next call while the GPU runs this one and the time
    is the slower side's. On the CPU the same as the synced time."""
    if device.type != "cuda":
        return statistics.median(time_ms(fn, device, repeats, warmup=0)[0])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def count_syncs(fn, device: torch.device) -> int | None:
    """Device syncs in one fn() on a GPU (each one stops the host from running ahead of the device), counted with
    torch's sync debug mode ("called a synchronizing CUDA operation" warnings); None on the CPU. fn runs twice in
    that mode and the second call is counted: the first variant counted once showed a sync inside torch itself
    (session 13, the dense layer at torch/__init__.py), likely the mode's own first use; both counts are printed."""
    if device.type != "cuda":
        return None
    import warnings

    counts = []
    for _ in range(2):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]
        print(f"  device syncs (call {len(counts) + 1}): {len(sites)} {', '.join(sites)}", flush=True)
        counts.append(len(sites))
    return counts[-1]


def host_profile(fn, device: torch.device, top: int) -> dict:
    """Where one fn() spends host time, by torch op (torch.profiler, CPU activity only, after one warm call): the
    number of aten ops and their summed self CPU time, the step's host wall time, and the ``top`` ops by self CPU time
    (name, calls, self us). What the ops leave unexplained of the wall time is Python and kernel launches outside
    torch (Triton's launcher)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall_us = (time.perf_counter() - t0) * 1e6
    if device.type == "cuda":
        torch.cuda.synchronize()
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"wall_us": wall_us, "aten_ops": sum(e.count for e in aten),
            "aten_self_us": sum(e.self_cpu_time_total for e in aten),
            "top": [{"op": e.key, "calls": e.count, "self_us": e.self_cpu_time_total} for e in rows]}


@contextmanager
def torch_path():
    """The layer on plain torch ops where it has a GPU kernel of its own besides the scan: the routed projections
    as a loop over the experts (F.linear), the routing (kernels.route) by softmax, top-k and a stable argsort, the slot
    moves of kernels.slots by index_select and copies, the conv + SiLU by torch's conv1d (the reference the GPU path
    is checked against)."""
    torch_slots = {name: functools.partial(getattr(slots, name), backend="torch")
                   for name in ("combine_slots_cf", "gather_slots_cf", "combine_slots_weighted",
                                "combine_slots_weighted_backward")}
    with mock.patch.object(rom, "grouped_mm_available", lambda *a: False), \
            mock.patch.object(rom, "route_slots", functools.partial(route.route_slots, backend="torch")), \
            mock.patch.object(kernels, "causal_conv1d_silu", functools.partial(conv.causal_conv1d_silu,
                                                                              backend="torch")), \
            mock.patch.multiple(rom, **torch_slots):
        yield


def _path(grouped: bool | None):
    """The routed projections' path for a variant: the automatic choice (None) or the torch path (False)."""
    return torch_path() if grouped is False else nullcontext()


def check_against_torch(layer: Block, h: torch.Tensor, w: torch.Tensor, amp: bool) -> float:
    """max |auto - torch path| / max |torch path| of the layer output (and the input gradient), same weights and
    inputs (auto: on a GPU the grouped matmul where the card has it, the Triton slot moves and the Triton conv)."""
    errs = []
    results = []
    for ctx in (nullcontext, torch_path):
        layer.zero_grad(set_to_none=True)
        hh = h.detach().clone().requires_grad_()
        with ctx():
            out = fwd_bwd(layer, hh, w, amp)
        results.append((out.float(), hh.grad.float()))
    for a, b in zip(results[0], results[1]):
        if not torch.isfinite(a).all():
            raise SystemExit("grouped path produced non-finite values")
        errs.append(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return max(errs)


def run(args: argparse.Namespace) -> dict:
    """Check every RoM variant, then time all variants in interleaved rounds (each round runs every variant
    ``repeats`` times, in the same order), so that a drift of the card's clocks or of the host touches all alike."""
    device = torch.device(args.device)
    amp = device.type == "cuda"
    variants = [("dense", 0, 1, None)]
    for e, k in ((8, 1), (1, 1), (32, 1), (8, 2)):
        variants.append((f"rom E={e} K={k}", e, k, None))
    variants.append(("rom E=8 K=1, torch path", 8, 1, False))
    g = torch.Generator(device="cpu").manual_seed(1)
    h = torch.randn(args.batch, args.length, args.d_model, generator=g).to(device)
    w = torch.randn(args.batch, args.length, args.d_model, generator=g).to(device)
    runs = []
    for name, e, k, grouped in variants:
        layer = make_layer(args.d_model, e, k, device)
        check = None
        auto = False
        if e > 0:  # what the automatic choice picks inside the forward (under the same autocast)
            with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
                auto = rom.grouped_mm_available(h, layer.mixer.w_in)
        if device.type == "cuda" and grouped is not False:      # every GPU variant but the torch path itself
            check = check_against_torch(layer, h, w, amp)
            if check > 3e-2:
                raise SystemExit(f"{name}: the GPU path and the torch path disagree ({check:.2e})")
        hh = h.detach().clone().requires_grad_()

        def step(layer: Block = layer, hh: torch.Tensor = hh) -> None:
            layer.zero_grad(set_to_none=True)
            hh.grad = None
            fwd_bwd(layer, hh, w, amp)

        with _path(grouped):
            step()                              # warm (first calls compile and allocate)
            syncs = count_syncs(step, device)
        row = {"name": name, "experts": e, "top_k": k, "params": sum(p.numel() for p in layer.parameters()),
               "grouped_check": check, "grouped": auto if grouped is None else grouped, "syncs": syncs,
               "round_medians": [], "queued_rounds": []}
        runs.append((row, step, grouped, [], []))
    for _ in range(args.rounds):
        for row, step, grouped, times, host in runs:
            with _path(grouped):
                t, hs = time_ms(step, device, args.repeats)
                row["queued_rounds"].append(time_queued_ms(step, device, args.repeats))
            times += t
            host += hs
            row["round_medians"].append(statistics.median(t))
    if getattr(args, "profile_ops", 0):
        for row, step, grouped, _, _ in runs:
            if row["name"] in ("dense", "rom E=8 K=1"):
                with _path(grouped):
                    row["host_profile"] = prof = host_profile(step, device, args.profile_ops)
                print(f"{row['name']}: host {prof['wall_us']:.0f} us per step, {prof['aten_ops']} aten ops, "
                      f"{prof['aten_self_us']:.0f} us of their self time", flush=True)
                for r in prof["top"]:
                    print(f"  {r['self_us']:9.0f} us x{r['calls']:4d} {r['op']}", flush=True)
    rows = []
    for row, _, _, times, host in runs:
        rows.append({**row, "median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                     "host_median_ms": statistics.median(host), "queued_ms": statistics.median(row["queued_rounds"])})
        print(f"{row['name']:28s} {statistics.median(times):9.3f} ms  host {statistics.median(host):8.3f} ms  "
              f"queued {rows[-1]['queued_ms']:8.3f} ms  (params {row['params']:,})", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {"device": name, "torch": torch.__version__, "batch": args.batch, "length": args.length,
            "d_model": args.d_model, "dtype": "bf16 autocast" if amp else "fp32", "repeats": args.repeats,
            "rounds": args.rounds, "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _timing_text(res: dict) -> str:
    if "rounds" not in res:         # results of the first version (one block of timings per variant)
        return f"Median (min-max) of {res['repeats']} timings after warm-up (CUDA events on a GPU)."
    return (f"Median (min-max) of {res['rounds']} interleaved rounds x {res['repeats']} timings per variant after "
            "warm-up (CUDA events on a GPU; every variant once per round, so clock drift touches all alike); "
            "'host': median host time until the call returned (near the fwd+bwd time: the host is the slower side); "
            f"'queued': per call, the median over rounds of {res['repeats']} calls queued back to back with one sync "
            "at the end (as a training loop runs them: the time of the slower side, host or GPU); "
            "'device syncs': read-backs that made the host wait for the GPU in one call (torch's sync debug mode).")


def _check_text(res: dict) -> str:
    if any(r["experts"] == 0 and r.get("grouped_check") is not None for r in res["rows"]):
        return ("On a GPU every row but the torch path's own (the dense layer's too: its conv) was first checked "
                "against the torch path (a loop over the experts, routing by torch's top-k and argsort, slot moves by "
                "index_select, torch's conv1d; same weights and inputs).")
    return ("Every RoM row with the grouped path was first checked against the torch path (a loop over the experts, "
            "slot moves by index_select; same weights and inputs).")


def render(res: dict) -> str:
    dense = next(r for r in res["rows"] if r["name"] == "dense")["median_ms"]
    lines = [
        "## A RoM layer vs a dense Mamba layer of the same active width (benchmarks/rom_layer.py)",
        "",
        f"Card: **{res['device']}**, torch {res['torch']}, {res['when']}. Layer = RMSNorm -> mixer -> residual, "
        f"d_model {res['d_model']}, d_inner {2 * res['d_model']}, d_state 16; batch {res['batch']} x L "
        f"{res['length']}; {res['dtype']}; forward + backward (loss = weighted sum of the output + routing "
        f"auxiliary losses). {_timing_text(res)} "
        f"{_check_text(res)}",
        "",
        "| layer | total params | fwd+bwd ms | vs dense | host ms | queued ms | vs dense | device syncs "
        "| routed projections | vs torch path: max rel. diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    dense_q = next(r for r in res["rows"] if r["name"] == "dense").get("queued_ms")
    for r in res["rows"]:
        path = "dense GEMMs" if r["experts"] == 0 else ("torch._grouped_mm (bf16)" if r["grouped"] else
                                                       "loop over experts (F.linear)")
        chk = f"{r['grouped_check']:.1e}" if r.get("grouped_check") is not None else "-"
        host = f"{r['host_median_ms']:.3f}" if "host_median_ms" in r else "-"
        syncs = "-" if r.get("syncs") is None else str(r["syncs"])
        queued = (f"{r['queued_ms']:.3f} | {r['queued_ms'] / dense_q:.2f}x" if dense_q and "queued_ms" in r
                  else "- | -")
        lines.append(f"| {r['name']} | {r['params']:,} | {r['median_ms']:.3f} ({r['min_ms']:.3f}-{r['max_ms']:.3f})"
                     f" | {r['median_ms'] / dense:.2f}x | {host} | {queued} | {syncs} | {path} | {chk} |")
    rom8 = next(r for r in res["rows"] if r["name"] == "rom E=8 K=1")
    ratio = rom8["median_ms"] / dense
    lines += ["", f"Target: RoM (E=8, K=1) forward + backward within 1.3x the dense layer: {ratio:.3f}x from an idle "
              f"device, {'met' if ratio <= 1.3 else 'NOT met'}"]
    if dense_q and "queued_ms" in rom8:
        q = rom8["queued_ms"] / dense_q
        lines[-1] += f"; {q:.3f}x queued, {'met' if q <= 1.3 else 'NOT met'}"
    lines[-1] += "."
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10, help="timings per variant and round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all variants")
    p.add_argument("--profile-ops", type=int, default=0, metavar="N",
                   help="after timing, profile one step of the dense and the RoM E=8 K=1 layer on the host and list "
                        "the N torch ops with the most self CPU time (kept in the JSON as host_profile)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--render", type=Path, help="only write BENCHMARKS.md from a saved JSON")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    res = json.loads(a.render.read_text()) if a.render else run(a)
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    body = render(res)
    print(body)
    if not a.no_write and (a.render or res["device"] != "CPU"):
        write_section(ROOT / "BENCHMARKS.md", "rom_layer", body)


if __name__ == "__main__":
    main()
