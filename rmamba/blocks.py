"""Pre-norm residual blocks and the backbone stack: h -> h + mixer(RMSNorm(h)), n_layers times, final RMSNorm.

Backbone state = list of one `LayerState` per layer (see rmamba.mamba). Routing stats: list of one
`RoutingStats` per layer (empty for the dense backbone).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rmamba.config import RoMConfig
from rmamba.mamba import LayerState, MambaMixer, Mixer
from rmamba.rom import RoMMixer, RoutingStats, merge_routing_stats


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in fp32. (..., d) -> (..., d)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class Block(nn.Module):
    """h -> h + mixer(norm(h)); the mixer is dense Mamba (num_experts=0) or RoM."""

    def __init__(self, cfg: RoMConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer: Mixer = MambaMixer(cfg) if cfg.dense else RoMMixer(cfg)

    def forward(self, h: Tensor, state: LayerState | None = None
                ) -> tuple[Tensor, LayerState, RoutingStats | None]:
        """h (batch, L, d_model) -> (h, new state, stats)."""
        out, new_state, stats = self.mixer(self.norm(h), state)
        return h + out, new_state, stats

    def step(self, h: Tensor, state: LayerState) -> tuple[Tensor, RoutingStats | None]:
        """h (batch, d_model) -> (h, stats); state updated in place."""
        out, stats = self.mixer.step(self.norm(h), state)
        return h + out, stats


class Backbone(nn.Module):
    """The shared sequence model: n_layers blocks and a final RMSNorm. (batch, L, d_model) -> same."""

    def __init__(self, cfg: RoMConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.rescale_prenorm_residual:
            # As the reference model init: each residual branch's output projection / sqrt(n_layers), so the
            # residual stream's variance does not grow with depth at init.
            with torch.no_grad():
                for layer in self.layers:
                    m = layer.mixer
                    w = m.out_proj.weight if isinstance(m, MambaMixer) else m.w_out
                    w.div_(math.sqrt(cfg.n_layers))

    def allocate_state(self, batch: int, dtype: torch.dtype | None = None,
                       device: torch.device | None = None) -> list[LayerState]:
        """Zero state: per layer conv (batch, d_inner, d_conv-1), ssm (batch, d_inner, d_state) fp32."""
        return [layer.mixer.allocate_state(batch, dtype, device) for layer in self.layers]

    def forward(self, h: Tensor, state: list[LayerState] | None = None
                ) -> tuple[Tensor, list[LayerState], list[RoutingStats]]:
        """h (batch, L, d_model) -> (features (batch, L, d_model), new state, routing stats per layer)."""
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state: expected {len(self.layers)} layer states, got {len(state)}")
        new_state, stats = [], []
        for i, layer in enumerate(self.layers):
            h, s, st = layer(h, None if state is None else state[i])
            new_state.append(s)
            if st is not None:
                stats.append(st)
        return self.norm_f(h), new_state, stats

    def step(self, h: Tensor, state: list[LayerState]) -> tuple[Tensor, list[RoutingStats]]:
        """h (batch, d_model) -> (features (batch, d_model), routing stats per layer); state updated in place."""
        if len(state) != len(self.layers):
            raise ValueError(f"state: expected {len(self.layers)} layer states, got {len(state)}")
        stats = []
        for layer, s in zip(self.layers, state):
            h, st = layer.step(h, s)
            if st is not None:
                stats.append(st)
        return self.norm_f(h), stats

    def aux_loss(self, *per_call: list[RoutingStats]) -> Tensor:
        """Load-balance + z-loss (with the config's coefficients), summed over layers, with each layer's stats
        pooled over the given calls (per_call: one list of per-layer stats per forward call)."""
        losses = [merge_routing_stats(layer_stats).aux_loss(self.cfg.lb_coef, self.cfg.z_coef)
                  for layer_stats in zip(*per_call)]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.norm_f.weight.device)
