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
