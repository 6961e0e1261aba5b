"""Model hyperparameters: one dataclass, validated at construction (errors name key, expected, found).

The `[model]` table of plant.toml maps onto `RoMConfig.from_dict`. num_experts=0 means the dense Mamba-1
baseline (ROM_SPEC section 1); num_experts >= 1 makes in_proj / out_proj mixtures of experts (section 2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class RoMConfig:
    # backbone size
    d_model: int = 64              # residual stream width
    n_layers: int = 2              # number of (norm -> mixer -> residual) blocks
    # Mamba-1 mixer (defaults of the reference implementation)
    d_state: int = 16              # SSM state size per channel
    d_conv: int = 4                # depthwise causal conv kernel
    expand: int = 2                # d_inner = expand * d_model
    dt_rank: int | str = "auto"    # "auto" = ceil(d_model / 16)
    dt_min: float = 1e-3           # dt initialised log-uniform in [dt_min, dt_max] ...
    dt_max: float = 1e-1
    dt_floor: float = 1e-4         # ... and floored at dt_floor
    dt_scale: float = 1.0          # dt_proj.weight ~ U(+-dt_scale * dt_rank^-0.5)
    conv_bias: bool = True
    # Routing Mamba (ROM_SPEC section 2); num_experts=0 -> dense Mamba
    num_experts: int = 8           # E experts for W_x, W_z, W_o
    top_k: int = 1                 # K experts per token, shared by the three projections
    gate_on_all: bool = False      # False: gate weight at out_proj only (DECISION); True: on W_x, W_z, W_o
    lb_coef: float = 1e-2          # Switch load-balancing loss coefficient
    z_coef: float = 1e-3           # router z-loss coefficient
    # the rest
    norm_eps: float = 1e-5         # RMSNorm epsilon
    rescale_prenorm_residual: bool = True  # out projections / sqrt(n_layers) at init (reference model init)
    min_scale: float = 1e-3        # floor of the forecast head's Gaussian scale (normalised units)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name))
        for name in ("d_model", "n_layers", "d_state", "d_conv", "expand"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if isinstance(self.dt_rank, str) and self.dt_rank != "auto":
            raise ValueError(f"model.dt_rank: expected 'auto' or an integer >= 1, got {self.dt_rank!r}")
        if isinstance(self.dt_rank, int) and self.dt_rank < 1:
            raise ValueError(f"model.dt_rank: expected 'auto' or an integer >= 1, got {self.dt_rank}")
        for name in ("dt_min", "dt_max", "dt_floor", "dt_scale", "norm_eps", "min_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name}: expected a number > 0, got {getattr(self, name)}")
        if self.dt_min > self.dt_max:
            raise ValueError(f"model.dt_min: expected <= dt_max ({self.dt_max}), got {self.dt_min}")
        for name in ("lb_coef", "z_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name}: expected a number >= 0, got {getattr(self, name)}")
        if self.num_experts < 0:
            raise ValueError(f"model.num_experts: expected 0 (dense Mamba) or >= 1, got {self.num_experts}")
        if self.top_k < 1:
            raise ValueError(f"model.top_k: expected an integer >= 1, got {self.top_k}")
        if self.num_experts > 0 and self.top_k > self.num_experts:
            raise ValueError(f"model.top_k: expected top_k <= num_experts ({self.num_experts}), got {self.top_k}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def dense(self) -> bool:
        """True for the plain Mamba mixer (num_experts == 0)."""
        return self.num_experts == 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoMConfig:
        """Build from a plain dict (e.g. the TOML [model] table); unknown keys are an error naming them."""
        if not isinstance(d, dict):
            raise TypeError(f"model: expected a table of hyperparameters, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"model.{unknown[0]}: unknown key; expected one of {', '.join(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Field name -> accepted Python types (bool is not accepted where an int/float is expected).
_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "int | str": (int, str),
}


def _check_type(name: str, value: Any) -> None:
    annotation = {f.name: f.type for f in fields(RoMConfig)}[name]
    accepted = _TYPES[annotation]
    if (isinstance(value, bool) and bool not in accepted) or not isinstance(value, accepted):
        expected = " or ".join(t.__name__ for t in accepted)
        raise TypeError(f"model.{name}: expected {expected}, got {type(value).__name__} ({value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"model.{name}: expected a finite number, got {value}")
