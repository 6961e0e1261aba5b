"""`rmamba model-info`: total and active parameters per token, per component, of a plant's model config."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model-info", help="print total and active parameters per component of the [model] config",
        description="Read the [model] table of a plant TOML file and print, per component, the total "
                    "parameters and the ACTIVE parameters per token (K of E experts). Sensor counts come from "
                    "the file's [equipment_types] tables; --types adds types or overrides their counts. "
                    "Without any types only the backbone is counted.")
    p.add_argument("--config", required=True, type=Path, metavar="FILE", help="plant TOML file with a [model] table")
    p.add_argument("--types", default=None, metavar="T=N,...",
                   help="equipment types and sensor counts, e.g. pump=8,compressor=12")
    p.set_defaults(func=run)


def parse_types(text: str) -> dict[str, int]:
    """'pump=8,compressor=12' -> {'pump': 8, 'compressor': 12}; errors name the bad item."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, count = item.partition("=")
        if not sep or not name.strip() or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"--types: expected NAME=N with N >= 1 (e.g. pump=8,compressor=12), got {item!r}")
        out[name.strip()] = int(count)
    return out


def types_from_toml(doc: dict, path: Path) -> dict[str, int]:
    """Sensor count per [equipment_types.<name>] table (the length of its sensors list)."""
    types = doc.get("equipment_types", {})
    if not isinstance(types, dict):
        raise ValueError(f"{path}: equipment_types: expected tables [equipment_types.<name>], got {type(types)}")
    out = {}
    for name, table in types.items():
        sensors = table.get("sensors") if isinstance(table, dict) else None
        if not isinstance(sensors, list) or not sensors:
            raise ValueError(f"{path}: equipment_types.{name}.sensors: expected a non-empty list of sensors, "
                             f"got {sensors!r}")
        out[name] = len(sensors)
    return out


def run(args: argparse.Namespace) -> int:
    # Imported here so that `rmamba --help` and other commands do not pay for importing torch.
    from rmamba.config import RoMConfig
    from rmamba.params import count_parameters, format_table

    path: Path = args.config
    with path.open("rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    if "model" not in doc:
        raise ValueError(f"{path}: no [model] table (see docs/plant_config.md)")
    cfg = RoMConfig.from_dict(doc["model"])
    types = types_from_toml(doc, path)
    if args.types:
        types.update(parse_types(args.types))
    kind = "dense Mamba" if cfg.dense else f"RoM, top-{cfg.top_k} of {cfg.num_experts} experts"
    print(f"model: {kind}; d_model={cfg.d_model} n_layers={cfg.n_layers} d_inner={cfg.d_inner} "
          f"d_state={cfg.d_state} d_conv={cfg.d_conv} dt_rank={cfg.dt_rank_value}")
    print("equipment types: " + (", ".join(f"{t} ({n} sensors)" for t, n in types.items())
                                 if types else "none (backbone only)"))
    print(format_table(count_parameters(cfg, types or None)))
    return 0
