"""pipelines.evaluate and `rmamba evaluate`: end to end on a tiny synthetic plant, the metrics.json schema,
thresholds that never see test labels, per-series scaling from training rows only, parameter matching."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from pipelines.evaluate import (
    BASE_KEYS,
    CLASSICAL,
    METHODS,
    SKAB_KEYS,
    EvalConfig,
    EvalData,
    EvalSeries,
    MethodRun,
    attribution_hits,
    fit_and_score,
    match_dense,
    skab_data,
    summarise,
    synthetic_data,
)
from pipelines.generate import ANOMALY_KINDS
from pipelines.skab import SKAB_SENSORS
from rmamba import RoMConfig, count_parameters

TINY = {"d_model": 8, "steps": 2, "window": 64, "batch_size": 2, "steps_per_epoch": 2, "warmup_steps": 1}


def check_schema(metrics: dict, keys: tuple[str, ...], methods: tuple[str, ...], n_series: int) -> None:
    assert set(metrics["methods"]) == set(methods)
    assert 0 < metrics["prevalence"]["macro"] < 1 and len(metrics["prevalence"]["series"]) == n_series
    for name, e in metrics["methods"].items():
        for k in keys:
            assert isinstance(e[k], float), (name, k)
            assert isinstance(e["std"][k], float) and len(e["per_seed"][k]) == len(e["seeds"])
        assert len(e["series"]) == n_series
        assert all(set(keys) | {"threshold"} <= set(row) for row in e["series"].values())
        assert set(e["pooled"]) == {"f1", "far", "mar"}
        if name in CLASSICAL:
            assert "params" not in e and "nll_test" not in e
        else:
            assert e["params"]["total"] >= e["params"]["active"] > 0
            assert np.isfinite(e["nll_test"]["mean"]) and np.isfinite(e["nll_test_normal"]["mean"])


def test_cli_quick_synthetic_end_to_end(tmp_path, capsys):
    out = tmp_path / "eval"
    db = tmp_path / "mlflow.db"
    code = main(["evaluate", "--dataset", "synthetic", "--quick", "--seeds", "1", "--days", "3", "--steps", "2",
                 "--window", "64", "--batch-size", "2", "--d-model", "8", "--path", str(tmp_path / "plant"),
                 "--out", str(out), "--tracking-uri", f"sqlite:///{db}"])
    assert code == 0
    assert (tmp_path / "plant" / "labels.csv").exists()  # the plant was generated as logs too
    metrics = json.loads((out / "metrics.json").read_text())
    check_schema(metrics, BASE_KEYS, METHODS, n_series=7)
    assert "far" not in metrics["methods"]["rom"]  # FAR / MAR are SKAB's
    rom, dense_active, dense_total = (metrics["methods"][m]["params"] for m in ("rom", "dense_active", "dense_total"))
    assert rom["num_experts"] == 8 and rom["top_k"] == 1 and dense_active["num_experts"] == 0
    assert abs(dense_active["active"] / rom["active"] - 1) < 0.1
    assert abs(dense_total["total"] / rom["total"] - 1) < 0.1
    kinds = metrics["methods"]["pca"]["per_kind"]
    assert set(kinds) <= set(ANOMALY_KINDS) and len(kinds) >= 5
    assert all(0 <= d["event_recall"]["mean"] <= 1 for d in kinds.values())
    # sensor blame: the neural models only (classical baselines give no per-sensor attribution)
    assert set(metrics["methods"]["rom"]["attribution"]) == {"events", "hit_at_3", "top1"}
    assert "attribution" not in metrics["methods"]["pca"]
    for m in METHODS:
        png = out / f"scores_{m}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    md = (out / "metrics.md").read_text()
    assert "| RoM (E=8, K=1) |" in md and "| PCA T^2+Q |" in md and "Per anomaly kind" in md
    assert "Which sensors the alerts blame" in md
    printed = capsys.readouterr().out
    assert "logged to MLflow" in printed and db.exists()


def test_thresholds_and_scores_never_see_test_labels():
    data = synthetic_data(days=3)
    cfg = EvalConfig(seeds=(0,), methods=("rom", "pca", "iforest", "random"), **TINY)
    before = fit_and_score(data, cfg)
    rng = np.random.default_rng(0)
    shuffled = replace(data, series=[])
    for s in data.series:
        order = rng.permutation(len(s.labels))
        shuffled.series.append(replace(s, labels=s.labels[order], kinds=s.kinds[order], events=()))
    after = fit_and_score(shuffled, cfg)
    for m in cfg.methods:
        assert before[m][0].thresholds == after[m][0].thresholds, m
        for a, b in zip(before[m][0].scores, after[m][0].scores):
            np.testing.assert_array_equal(a, b)
    # the labels did change what is measured: the check above is not vacuous
    assert summarise(data, before, cfg)["methods"]["pca"]["vus_pr"] != \
        summarise(shuffled, after, cfg)["methods"]["pca"]["vus_pr"]


def test_attribution_hits_ranks_sensors_over_each_events_flagged_points():
    # 5 sensors; events: rows 2-4 involve sensor 1, rows 6-8 involve sensors 0 and 2, row 9 involves sensor 2
    labels = np.zeros(10, dtype=np.int8)
    labels[2:10] = 1
    s = EvalSeries("u", "pump", [f"s{i}" for i in range(5)], np.zeros((5, 5)), np.zeros((10, 5)), labels,
                   events=((2, 4, "spike", (1,)), (6, 8, "drift", (0, 2)), (9, 9, "stuck", (2,))))
    data = EvalData("synthetic", [s], kind_names=("spike", "drift", "stuck"))
    score = np.zeros(10)
    score[[3, 4, 7]] = 5.0  # flagged: two points of the first event, one of the second, none of the third
    attr = np.zeros((10, 5), dtype=np.float32)
    attr[:, 2] = 100.0       # large on unflagged rows only: must not count
    attr[[3, 4, 7], 2] = 0.0
    attr[3] = [0, 3, 0, 1, 2]  # first event: sensor 1 leads over both flagged rows
    attr[4] = [0, 2, 0, 1, 0]
    attr[7] = [1, 9, 0, 8, 7]  # second event: ranks 1, 3, 4 -> neither 0 nor 2 in the top 3
    run = MethodRun("rom", 0, [score], [1.0], attributions=[attr])
    assert attribution_hits(data, run) == {"events": 2.0, "hit_at_3": 0.5, "top1": 0.5}
    none = MethodRun("rom", 0, [np.zeros(10)], [1.0], attributions=[attr])
    out = attribution_hits(data, none)
    assert out["events"] == 0.0 and np.isnan(out["hit_at_3"]) and np.isnan(out["top1"])


def write_skab(root: Path, n_files: int = 2, rows: int = 700) -> None:
    rng = np.random.default_rng(0)
    header = "datetime;" + ";".join(SKAB_SENSORS)
    (root / "valve1").mkdir(parents=True)
    (root / "anomaly-free").mkdir()

    def lines(x: np.ndarray, labels: np.ndarray | None) -> list[str]:
        out = []
        for i, row in enumerate(x):
            ts = f"2020-03-09 {10 + i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}"
            cells = ";".join(f"{v:.4f}" for v in row)
            out.append(f"{ts};{cells}" + ("" if labels is None else f";{labels[i]:.1f};0.0"))
        return out

    base = np.array([0.03, 0.04, 1.5, 0.1, 80.0, 26.0, 230.0, 32.0])
    for k in range(n_files):
        x = base + rng.normal(size=(rows, 8)) * np.array([0.001, 0.001, 0.3, 0.25, 0.5, 0.04, 10, 0.4])
        y = np.zeros(rows, dtype=int)
        y[500:560] = 1
        x[500:560, 2] += 3.0
        text = [header + ";anomaly;changepoint", *lines(x, y)]
        (root / "valve1" / f"{k}.csv").write_text("\n".join(text) + "\n")
    free = base * 1.5 + rng.normal(size=(900, 8))
    (root / "anomaly-free" / "anomaly-free.csv").write_text("\n".join([header, *lines(free, None)]) + "\n")


def test_skab_protocol_scales_by_training_rows_only_and_reports_far_mar(tmp_path):
    write_skab(tmp_path / "skab")
    data = skab_data(tmp_path / "skab")
    s = data.series[0]
    assert s.train.shape == (400, 8) and s.test.shape == (300, 8) and s.labels.sum() == 60
    # normalised by its own training rows: the training part is centred with unit-order spread
    assert np.abs(np.median(s.train, axis=0)).max() < 1e-9 and np.all(s.train.std(0) <= 1.0 + 1e-9)
    # changing test rows does not change how the training rows were scaled
    path = tmp_path / "skab" / "valve1" / "0.csv"
    text = path.read_text().splitlines()
    text[-1] = ";".join([text[-1].split(";")[0], *["9999"] * 8, "1.0", "0.0"])
    path.write_text("\n".join(text) + "\n")
    np.testing.assert_array_equal(skab_data(tmp_path / "skab").series[0].train, s.train)

    cfg = EvalConfig(seeds=(0, 1), methods=CLASSICAL)
    metrics = summarise(data, fit_and_score(data, cfg), cfg)
    check_schema(metrics, SKAB_KEYS, CLASSICAL, n_series=2)
    assert metrics["methods"]["pca"]["vus_pr"] > metrics["methods"]["random"]["vus_pr"]
    assert metrics["methods"]["iforest"]["per_seed"]["vus_pr"][0] != metrics["methods"]["iforest"]["per_seed"][
        "vus_pr"][1]  # seeds reach the seeded methods


@pytest.mark.parametrize("expand", [1, 2])
@pytest.mark.parametrize("which", ["active", "total"])
def test_dense_baselines_match_rom_parameters(which, expand):
    types = {"pump": 8, "compressor": 12, "conveyor": 6}
    rom = RoMConfig(d_model=32, n_layers=2, expand=expand, num_experts=8, top_k=1)
    dense = match_dense(rom, types, which)
    assert dense.num_experts == 0 and dense.n_layers == rom.n_layers and dense.expand == expand
    rom_n = getattr(count_parameters(rom, types)[-1], which)
    dense_n = getattr(count_parameters(dense, types)[-1], which)
    assert abs(dense_n / rom_n - 1) < 0.05


def test_cli_expand_reaches_rom_and_dense_configs(tmp_path):
    out = tmp_path / "eval"
    code = main(["evaluate", "--dataset", "synthetic", "--quick", "--seeds", "1", "--days", "3", "--steps", "2",
                 "--window", "64", "--batch-size", "2", "--d-model", "8", "--expand", "1",
                 "--methods", "rom,dense_active,dense_total", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["meta"]["config"]["expand"] == 1
    assert {m: e["params"]["expand"] for m, e in metrics["methods"].items()} == {
        "rom": 1, "dense_active": 1, "dense_total": 1}
    assert EvalConfig().rom_config().expand == 2  # the default is unchanged
    with pytest.raises(SystemExit):
        main(["evaluate", "--dataset", "synthetic", "--expand", "0"])


def _config_of(monkeypatch, *extra: str) -> EvalConfig:
    """The EvalConfig that `rmamba evaluate --dataset synthetic --quick --days 1 *extra` builds (the evaluation itself
    is stopped before it starts)."""
    import pipelines.evaluate as ev

    seen = {}

    def fake_evaluate(data, cfg, progress=None):
        seen["cfg"] = cfg
        raise RuntimeError("stop here")

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    with pytest.raises(RuntimeError, match="stop here"):
        main(["evaluate", "--dataset", "synthetic", "--quick", "--days", "1", *extra])
    return seen["cfg"]


def test_cli_lr_reaches_the_training_config(monkeypatch):
    """`--lr` sets every neural model's learning rate (EvalConfig.lr, handed to the training loop); a value that is
    not a finite number > 0 is refused by the parser, naming what it expected."""
    assert _config_of(monkeypatch, "--lr", "1e-2").lr == 1e-2 and EvalConfig().lr == 3e-3
    for bad in ("0", "-1e-3", "nan", "inf", "fast"):
        with pytest.raises(SystemExit):
            main(["evaluate", "--dataset", "synthetic", "--lr", bad])


def test_cli_gate_on_all_reaches_the_rom_model_only(monkeypatch):
    """`--gate-on-all` (ROM_SPEC 2's ablation: the gate weights W_x and W_z too) reaches the RoM config, the parameter
    report and the table's label; the dense baselines have no gate and report none; off by default."""
    import pipelines.evaluate as ev

    cfg = _config_of(monkeypatch, "--gate-on-all")
    assert cfg.gate_on_all and cfg.rom_config().gate_on_all and not EvalConfig().rom_config().gate_on_all
    types = {"pump": 8}
    report = ev.param_report(ev.model_configs(cfg, types), types)
    assert report["rom"]["gate_on_all"] is True and report["dense_total"]["gate_on_all"] is None
    metrics = {"methods": {m: {"params": p} for m, p in report.items()}}
    assert ev._label("rom", metrics) == "RoM (E=8, K=1), gate on W_x, W_z, W_o"
    assert ev._label("dense_active", metrics) == "dense Mamba, = active"
