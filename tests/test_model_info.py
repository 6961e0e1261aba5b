"""`rmamba model-info` end to end through the real CLI entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.cli import main
from rmamba.config import RoMConfig
from rmamba.params import count_parameters

PLANT = """
[plant]
name = "demo-plant"

[equipment_types.pump]
[[equipment_types.pump.sensors]]
name = "flow"
[[equipment_types.pump.sensors]]
name = "pressure"

[model]
d_model = 32
n_layers = 2
num_experts = 8
top_k = 2
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "plant.toml"
    p.write_text(text)
    return p


def test_model_info_prints_total_and_active_per_component(tmp_path, capsys):
    path = write(tmp_path, PLANT)
    assert main(["model-info", "--config", str(path), "--types", "compressor=12"]) == 0
    out = capsys.readouterr().out
    assert "top-2 of 8 experts" in out and "pump (2 sensors), compressor (12 sensors)" in out
    rows = count_parameters(RoMConfig(d_model=32, n_layers=2, num_experts=8, top_k=2), {"pump": 2, "compressor": 12})
    for r in rows:
        line = next(ln for ln in out.splitlines() if ln.startswith(r.component))
        assert line.split()[-2:] == [f"{r.total:,}", f"{r.active:,}"], line
    experts = next(r for r in rows if r.component.startswith("routed experts"))
    assert experts.active * 4 == experts.total


def test_model_info_without_types_counts_the_backbone(tmp_path, capsys):
    path = write(tmp_path, "[model]\nd_model = 16\nnum_experts = 0\n")
    assert main(["model-info", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "dense Mamba" in out and "backbone only" in out and "input adapters" not in out


def test_model_info_errors_name_the_key(tmp_path, capsys):
    path = write(tmp_path, PLANT.replace("top_k = 2", "top_k = 9"))
    assert main(["model-info", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.top_k" in err and "num_experts (8)" in err and "got 9" in err
    assert main(["model-info", "--config", str(write(tmp_path, "[plant]\nname = 'x'\n"))]) == 2
    assert "no [model] table" in capsys.readouterr().err
    assert main(["model-info", "--config", str(write(tmp_path, PLANT)), "--types", "pump=x"]) == 2
    assert "--types" in capsys.readouterr().err


def test_model_info_help():
    out = subprocess.run([sys.executable, "-m", "app.cli", "model-info", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0 and "--config FILE" in out.stdout and "--types" in out.stdout
