"""benchmarks/rom_layer.py on the CPU at a tiny size: every variant is timed in interleaved rounds, the rows carry
the numbers the table needs, and the table renders (also from the first version's results, without rounds)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import rom_layer  # noqa: E402


def test_rounds_time_every_variant_and_the_table_renders():
    torch.set_num_threads(1)
    args = argparse.Namespace(device="cpu", d_model=16, batch=1, length=8, repeats=2, rounds=3)
    res = rom_layer.run(args)
    names = [r["name"] for r in res["rows"]]
    assert names[0] == "dense" and "rom E=8 K=1" in names and len(names) == 6
    for r in res["rows"]:
        assert len(r["round_medians"]) == 3 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["host_median_ms"] > 0 and "step" not in r
        assert len(r["queued_rounds"]) == 3 and r["queued_ms"] > 0
    text = rom_layer.render(res)
    assert "3 interleaved rounds x 2 timings" in text and "| host ms | queued ms | vs dense | device syncs |" in text
    assert "x from an idle device" in text and "x queued" in text
    assert all(r["syncs"] is None for r in res["rows"])            # counted on a GPU only
    assert "Target: RoM (E=8, K=1) forward + backward within 1.3x the dense layer" in text
    old = {**res, "rows": [{k: v for k, v in r.items() if k not in ("host_median_ms", "queued_ms")}
                           for r in res["rows"]]}
    del old["rounds"]
    assert "Median (min-max) of 2 timings" in rom_layer.render(old)


def test_host_profile_lists_the_ops_of_the_dense_and_rom_steps(capsys):
    """--profile-ops N: one profiled step each of the dense and the RoM E=8 K=1 layer, with their aten op counts and
    the N ops of most host time; the other rows carry none."""
    torch.set_num_threads(1)
    args = argparse.Namespace(device="cpu", d_model=16, batch=1, length=8, repeats=1, rounds=1, profile_ops=4)
    res = rom_layer.run(args)
    prof = {r["name"]: r.get("host_profile") for r in res["rows"]}
    assert set(k for k, v in prof.items() if v) == {"dense", "rom E=8 K=1"}
    for p in (prof["dense"], prof["rom E=8 K=1"]):
        assert p["aten_ops"] > 0 and 0 < p["aten_self_us"] and p["wall_us"] > 0 and len(p["top"]) == 4
        assert all(r["calls"] >= 1 and r["self_us"] >= 0 for r in p["top"])
    assert prof["rom E=8 K=1"]["aten_ops"] > prof["dense"]["aten_ops"]      # the router, the slot moves, the experts
    assert "aten ops" in capsys.readouterr().out
