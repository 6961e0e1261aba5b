"""The model: Mamba / Routing-Mamba mixers, backbone, forecaster, streaming state (imports torch, kernels).

    config.py      RoMConfig: every hyperparameter, validated
    mamba.py       SelectiveSSM (shared conv/x_proj/dt_proj/A_log/D/scan), MambaMixer, LayerState
    rom.py         RoMMixer (routed in_proj/out_proj), expert_matmul, RoutingStats
    blocks.py      RMSNorm, pre-norm Block, Backbone
    forecaster.py  RoMForecaster: per-type adapters/heads, Gaussian next-step NLL, ForecasterState
    params.py      total / active parameters per component
"""

from rmamba.blocks import Backbone, Block, RMSNorm
from rmamba.config import RoMConfig
from rmamba.forecaster import ForecasterState, ForecastOutput, RoMForecaster, gaussian_nll
from rmamba.mamba import LayerState, MambaMixer, SelectiveSSM
from rmamba.params import ParamRow, count_parameters, format_table, parameter_table
from rmamba.rom import RoMMixer, RoutingStats, expert_matmul, merge_routing_stats

__all__ = [
    "Backbone", "Block", "RMSNorm", "RoMConfig", "ForecasterState", "ForecastOutput", "RoMForecaster",
    "gaussian_nll", "LayerState", "MambaMixer", "SelectiveSSM", "ParamRow", "count_parameters", "format_table",
    "parameter_table", "RoMMixer", "RoutingStats", "expert_matmul", "merge_routing_stats",
]
