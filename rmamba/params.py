"""Parameter accounting: total and ACTIVE parameters per token, per component (ROM_SPEC section 2).

Active per token counts what one token of one equipment type touches: K of the E experts of each layer, one
row of the type embedding, and the adapter and head of the largest equipment type (the worst case).
Models are built on the meta device, so counting a 10B-parameter config costs no memory.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from rmamba.config import RoMConfig

COMPONENTS = (
    "input adapters",
    "type embedding",
    "router",
    "routed experts (W_x, W_z, W_o)",
    "dense projections (in_proj, out_proj)",
    "shared mixer (conv1d, x_proj, dt_proj, A_log, D)",
    "norms",
    "output heads",
)


@dataclass
class ParamRow:
    component: str
    total: int
    active: int


def _component(name: str) -> tuple[str, str | None]:
    """Parameter name -> (component, group); per-type parts group by type (only one type is active)."""
    parts = name.split(".")
    if parts[0] == "adapters":
        return "input adapters", parts[1]
    if parts[0] == "heads":
        return "output heads", parts[1]
    if parts[0] == "type_embedding":
        return "type embedding", None
    if "router" in parts:
        return "router", None
    if parts[-1] in ("w_in", "w_out"):
        return "routed experts (W_x, W_z, W_o)", None
    if "in_proj" in parts or "out_proj" in parts:
        return "dense projections (in_proj, out_proj)", None
    if "ssm" in parts:
        return "shared mixer (conv1d, x_proj, dt_proj, A_log, D)", None
    if parts[-2].startswith("norm"):
        return "norms", None
    raise ValueError(f"parameter {name!r}: no component known for it (update rmamba.params)")


def parameter_table(model: nn.Module, cfg: RoMConfig) -> list[ParamRow]:
    """Rows of (component, total, active per token) for a RoMForecaster or a Backbone; 'total' row last."""
    totals: dict[str, dict[str | None, int]] = defaultdict(lambda: defaultdict(int))
    for name, p in model.named_parameters():
        comp, group = _component(name)
        totals[comp][group] += p.numel()
    rows = []
    for comp in COMPONENTS:
        if comp not in totals:
            continue
        groups = totals[comp]
        total = sum(groups.values())
        if comp == "routed experts (W_x, W_z, W_o)":
            active = total // cfg.num_experts * cfg.top_k
        elif comp == "type embedding":
            active = cfg.d_model
        else:
            active = max(groups.values())  # per-type parts: one type; others: a single group (None)
        rows.append(ParamRow(comp, total, active))
    rows.append(ParamRow("total", sum(r.total for r in rows), sum(r.active for r in rows)))
    return rows


def count_parameters(cfg: RoMConfig, equipment_types: Mapping[str, int] | None = None) -> list[ParamRow]:
    """Parameter table of the forecaster for ``equipment_types`` (or of the bare backbone when None)."""
    from rmamba.blocks import Backbone
    from rmamba.forecaster import RoMForecaster

    with torch.device("meta"):
        model = RoMForecaster(cfg, equipment_types) if equipment_types else Backbone(cfg)
    return parameter_table(model, cfg)


def format_table(rows: list[ParamRow]) -> str:
    """A plain-text table: component | total | active per token."""
    width = max(len(r.component) for r in rows)
    lines = [f"{'component':<{width}}  {'total':>14}  {'active/token':>14}", "-" * (width + 32)]
    for r in rows:
        if r.component == "total":
            lines.append("-" * (width + 32))
        lines.append(f"{r.component:<{width}}  {r.total:>14,}  {r.active:>14,}")
    return "\n".join(lines)
