"""From mixer to anomaly detector (ROM_SPEC section 3): one shared backbone, per-equipment-type adapters/heads.

Per call, a batch of one equipment type with n sensors (values in normalised units):
  values, mask (batch, L, n); mask 1 = observed. Missing values are zero-filled and the mask is concatenated,
  so the adapter Linear(2n, d_model) sees which sensors are missing. An equipment-type embedding is added.
  The backbone (RoM, or dense Mamba when num_experts=0) runs over time; the type's head Linear(d_model, 2n)
  forecasts step t+1 at every t as an independent Gaussian per sensor: mean, and
  scale = softplus(raw) + min_scale (a softplus link: smoother than exp for the NLL's gradient).
  Anomaly score at t = sum over sensors of nll[:, t] = -log N(x_t | forecast made at t-1), counted only where
  x_t is observed; nll per sensor is the attribution ("which sensor made this alert").

Streaming: `ForecasterState` carries the backbone state and the last forecast, so the first step of a chunk is
scored against the forecast made at the end of the previous chunk: full, chunked and step-by-step runs give
the same outputs. Without a state the first step has no forecast and is not scored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rmamba.blocks import Backbone
from rmamba.config import RoMConfig
from rmamba.mamba import LayerState
from rmamba.rom import RoutingStats


@dataclass
class ForecasterState:
    """Streaming state of one equipment type's batch: backbone `layers` (one LayerState per layer) and the
    last forecast `mean`, `scale` (batch, n_sensors), None before the first step."""

    equipment_type: str
    layers: list[LayerState]
    mean: Tensor | None = None
    scale: Tensor | None = None

    def detach(self) -> ForecasterState:
        """Cut the autograd graph (truncated backprop through time across chunks)."""
        return ForecasterState(self.equipment_type, [s.detach() for s in self.layers],
                               None if self.mean is None else self.mean.detach(),
                               None if self.scale is None else self.scale.detach())


@dataclass
class ForecastOutput:
    """Outputs over a chunk; all (batch, L, n_sensors) except routing (per layer), aux_loss () and features."""

    mean: Tensor                 # forecast of x_{t+1} made at t
    scale: Tensor                # its Gaussian standard deviation
    nll: Tensor                  # -log N(x_t | forecast made at t-1); 0 where not scored (attribution)
    scored: Tensor               # bool: x_t observed and a forecast for it exists
    routing: list[RoutingStats]  # one per layer (empty for the dense backbone)
    aux_coefs: tuple[float, float]  # the config's (lb_coef, z_coef)
    features: Tensor | None = None  # (batch, L, d_model) the heads' input: the backbone's summary of the past

    @property
    def aux_loss(self) -> Tensor:
        """Load-balance + z-loss of this call alone, with the config's coefficients; computed when asked (scoring
        never does; training pools the routing of a step's calls instead, RoMForecaster.aux_loss)."""
        if not self.routing:
            return self.mean.new_zeros((), dtype=torch.float32)
        return torch.stack([r.aux_loss(*self.aux_coefs) for r in self.routing]).sum()

    @property
    def score(self) -> Tensor:
        """(batch, L) anomaly score: nll summed over the observed sensors."""
        return self.nll.sum(-1)

    def forecast_loss(self) -> Tensor:
        """Mean NLL over scored (observed) targets; missing targets are ignored."""
        return self.nll.sum() / self.scored.sum().clamp_min(1)

    def loss(self) -> Tensor:
        return self.forecast_loss() + self.aux_loss


def gaussian_nll(x: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
    """Elementwise -log N(x | mean, scale^2); all shapes equal."""
    return 0.5 * math.log(2 * math.pi) + torch.log(scale) + 0.5 * ((x - mean) / scale) ** 2


class RoMForecaster(nn.Module):
    """Next-step distributional forecaster over several equipment types sharing one backbone."""

    def __init__(self, cfg: RoMConfig, equipment_types: Mapping[str, int]):
        super().__init__()
        if not equipment_types:
            raise ValueError("equipment_types: expected at least one {type: n_sensors}, got none")
        for name, n in equipment_types.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"equipment_types: expected names without '.', got {name!r}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"equipment_types.{name}: expected a sensor count >= 1, got {n!r}")
        self.cfg = cfg
        self.equipment_types = dict(equipment_types)
        self.type_index = {name: i for i, name in enumerate(self.equipment_types)}
        d = cfg.d_model
        self.adapters = nn.ModuleDict({t: nn.Linear(2 * n, d) for t, n in self.equipment_types.items()})
        self.type_embedding = nn.Embedding(len(self.equipment_types), d)
        nn.init.normal_(self.type_embedding.weight, std=0.02)
        self.backbone = Backbone(cfg)
        self.heads = nn.ModuleDict({t: nn.Linear(d, 2 * n) for t, n in self.equipment_types.items()})

    # -- boundary checks -----------------------------------------------------------------------------------
    def _check(self, values: Tensor, mask: Tensor | None, equipment_type: str, ndim: int,
               state: ForecasterState | None) -> tuple[Tensor, Tensor]:
        """Validate; returns (values zero-filled where missing, mask as float), same shape as values."""
        if equipment_type not in self.equipment_types:
            raise ValueError(f"equipment_type: unknown type {equipment_type!r}; known types: "
                             f"{', '.join(sorted(self.equipment_types))}")
        n = self.equipment_types[equipment_type]
        dims = "(batch, L, n_sensors)" if ndim == 3 else "(batch, n_sensors)"
        if not isinstance(values, Tensor) or not values.is_floating_point():
            raise TypeError(f"values: expected a float tensor {dims}, got {type(values).__name__}"
                            f"{'' if not isinstance(values, Tensor) else ' of ' + str(values.dtype)}")
        if values.dim() != ndim or values.shape[-1] != n:
            raise ValueError(f"values: expected shape {dims} with n_sensors={n} for equipment type "
                             f"{equipment_type!r}, got {tuple(values.shape)}")
        if mask is None:
            mask = torch.isfinite(values)
        elif tuple(mask.shape) != tuple(values.shape):
            raise ValueError(f"mask: expected the shape of values {tuple(values.shape)}, got {tuple(mask.shape)}")
        observed = mask.bool()
        if (observed & ~torch.isfinite(values)).any():       # one read-back; no boolean-mask gather
            raise ValueError("values: NaN or Inf where mask says observed (mark missing values with mask=0)")
        if state is not None:
            if state.equipment_type != equipment_type:
                raise ValueError(f"state: carries equipment type {state.equipment_type!r}, "
                                 f"got a call for {equipment_type!r}")
            if state.layers and state.layers[0].ssm.shape[0] != values.shape[0]:
                raise ValueError(f"state: batch {state.layers[0].ssm.shape[0]} does not match values' batch "
                                 f"{values.shape[0]}")
        dtype = self.adapters[equipment_type].weight.dtype
        v = torch.where(observed, values, torch.zeros((), dtype=values.dtype, device=values.device))
        return v.to(dtype), observed.to(dtype)

    # -- pieces shared by forward() and step() -------------------------------------------------------------
    def _embed(self, v: Tensor, m: Tensor, equipment_type: str) -> Tensor:
        """v, m (..., n) -> h (..., d_model)."""
        idx = torch.tensor(self.type_index[equipment_type], device=v.device)
        return self.adapters[equipment_type](torch.cat([v, m], dim=-1)) + self.type_embedding(idx)

    def _head(self, feat: Tensor, equipment_type: str) -> tuple[Tensor, Tensor]:
        """feat (..., d_model) -> mean, scale (..., n)."""
        mean, raw = self.heads[equipment_type](feat).chunk(2, dim=-1)
        return mean, F.softplus(raw) + self.cfg.min_scale

    def _score(self, v: Tensor, m: Tensor, mean: Tensor, scale: Tensor,
               state: ForecasterState | None) -> tuple[Tensor, Tensor]:
        """v, m, mean, scale (batch, L, n) -> nll, scored (batch, L, n): x_t against the forecast from t-1."""
        b, L, n = v.shape
        if state is not None and state.mean is not None:
            prev_mean = torch.cat([state.mean[:, None].to(mean.dtype), mean[:, :-1]], dim=1)
            prev_scale = torch.cat([state.scale[:, None].to(scale.dtype), scale[:, :-1]], dim=1)
            has_prev = torch.ones(L, dtype=torch.bool, device=v.device)
        else:
            prev_mean = torch.cat([torch.zeros_like(mean[:, :1]), mean[:, :-1]], dim=1)
            prev_scale = torch.cat([torch.ones_like(scale[:, :1]), scale[:, :-1]], dim=1)
            has_prev = torch.arange(L, device=v.device) > 0
        scored = m.bool() & has_prev[None, :, None]
        nll = torch.where(scored, gaussian_nll(v, prev_mean, prev_scale), torch.zeros((), dtype=v.dtype,
                                                                                     device=v.device))
        return nll, scored

    # -- public API ----------------------------------------------------------------------------------------
    @property
    def _aux_coefs(self) -> tuple[float, float]:
        return self.backbone.cfg.lb_coef, self.backbone.cfg.z_coef

    def aux_loss(self, *routings: list[RoutingStats]) -> Tensor:
        """Routing aux loss with each layer's statistics pooled over several calls (e.g. one per equipment
        type in a training step): balance is asked of the union, so experts may specialise by type."""
        return self.backbone.aux_loss(*routings)

    def allocate_state(self, batch: int, equipment_type: str, device: torch.device | None = None
                       ) -> ForecasterState:
        """Zero state for a batch of ``equipment_type`` (same as passing state=None)."""
        if equipment_type not in self.equipment_types:
            raise ValueError(f"equipment_type: unknown type {equipment_type!r}; known types: "
                             f"{', '.join(sorted(self.equipment_types))}")
        return ForecasterState(equipment_type, self.backbone.allocate_state(batch, device=device))

    def forward(self, values: Tensor, mask: Tensor | None, equipment_type: str,
                state: ForecasterState | None = None) -> tuple[ForecastOutput, ForecasterState]:
        """values, mask (batch, L, n_sensors) (mask None: observed = finite values) -> (outputs, new state)."""
        v, m = self._check(values, mask, equipment_type, 3, state)
        h = self._embed(v, m, equipment_type)                                   # (b, L, d_model)
        feat, layers, routing = self.backbone(h, None if state is None else state.layers)
        mean, scale = self._head(feat, equipment_type)                          # (b, L, n)
        nll, scored = self._score(v, m, mean, scale, state)
        out = ForecastOutput(mean, scale, nll, scored, routing, self._aux_coefs, feat)
        return out, ForecasterState(equipment_type, layers, mean[:, -1], scale[:, -1])

    @torch.no_grad()
    def step(self, values: Tensor, mask: Tensor | None, equipment_type: str,
             state: ForecasterState | None = None) -> tuple[ForecastOutput, ForecasterState]:
        """One time step: values, mask (batch, n_sensors) -> (outputs with L=1, state updated in place)."""
        v, m = self._check(values, mask, equipment_type, 2, state)
        if state is None:
            state = self.allocate_state(v.shape[0], equipment_type, device=v.device)
        h = self._embed(v, m, equipment_type)                                   # (b, d_model)
        feat, routing = self.backbone.step(h, state.layers)
        mean, scale = self._head(feat[:, None], equipment_type)                 # (b, 1, n)
        nll, scored = self._score(v[:, None], m[:, None], mean, scale, state)
        state.mean, state.scale = mean[:, 0], scale[:, 0]
        return ForecastOutput(mean, scale, nll, scored, routing, self._aux_coefs, feat[:, None]), state
