"""The Mamba-1 mixer (ROM_SPEC section 1) and its streaming state.

A mixer = input projection (h -> x, z) + `SelectiveSSM` (conv1d, x_proj, dt_proj, A_log, D, scan) + output
projection. `MambaMixer` uses dense projections; `rmamba.rom.RoMMixer` routes the same two projections
through experts and shares the `SelectiveSSM`. forward(), step() and allocate_state() sit together in
`Mixer`, so the dense and the routed mixer stream through the same code.

Streaming state of one layer (`LayerState`):
  conv: (batch, d_inner, d_conv - 1)  the last d_conv-1 conv inputs (activation dtype)
  ssm:  (batch, d_inner, d_state)     the scan state, fp32 whatever the activation dtype
A zero state is the same as no state (start of a sequence). forward() over a chunk returns a NEW state and
leaves the given one untouched (autograd-safe); step() updates the state IN PLACE (as the kernel does) and
is meant for inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from rmamba.config import RoMConfig

if TYPE_CHECKING:
    from rmamba.rom import RoutingStats


@dataclass
class LayerState:
    """Streaming state of one mixer: conv (batch, d_inner, d_conv-1), ssm (batch, d_inner, d_state) fp32."""

    conv: Tensor
    ssm: Tensor

    def detach(self) -> LayerState:
        return LayerState(self.conv.detach(), self.ssm.detach())

    def clone(self) -> LayerState:
        return LayerState(self.conv.clone(), self.ssm.clone())


class SelectiveSSM(nn.Module):
    """The part of a mixer shared by all experts: conv1d -> SiLU -> x_proj -> dt_proj -> scan, gated by z.

    Channel-first, the scan's layout: input x, z (batch, d_inner, L), any strides, the fastest with time contiguous
    (on a GPU both are then read in place, x by the conv kernel and z by the scan); output y (batch, d_inner, L)
    = scan(x) * SiLU(z), contiguous.
    """

    def __init__(self, d_inner: int, d_state: int = 16, d_conv: int = 4, dt_rank: int = 4, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dt_floor: float = 1e-4, dt_scale: float = 1.0, conv_bias: bool = True):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
        # Depthwise causal conv: we left-pad by hand (zeros or the carried window), so padding=0 here.
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)

        # dt_proj.weight ~ U(+-dt_rank^-0.5): keeps the initial delta close to its bias.
        std = dt_rank ** -0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        # dt_proj.bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] (floored), so that
        # softplus(dt_bias) is between dt_min and dt_max at init: channels start with a spread of time scales.
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

        # S4D-real init: A = -(1..d_state) per channel, stored as log in fp32; no weight decay on A_log, D.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (d_inner, d_state)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D._no_weight_decay = True

    def allocate_state(self, batch: int, dtype: torch.dtype | None = None,
                       device: torch.device | None = None) -> LayerState:
        """A zero state: conv (batch, d_inner, d_conv-1) in ``dtype``, ssm (batch, d_inner, d_state) fp32."""
        device = device or self.A_log.device
        dtype = dtype or self.conv1d.weight.dtype
        return LayerState(torch.zeros(batch, self.d_inner, self.d_conv - 1, dtype=dtype, device=device),
                          torch.zeros(batch, self.d_inner, self.d_state, dtype=torch.float32, device=device))

    def _check_state(self, state: LayerState, batch: int) -> None:
        for name, t, shape in (("state.conv", state.conv, (batch, self.d_inner, self.d_conv - 1)),
                               ("state.ssm", state.ssm, (batch, self.d_inner, self.d_state))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")

    def _ssm_params(self, xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """xc (b, d_inner, L), time contiguous -> dt (b, d_inner, L) before bias / softplus, B (b, d_state, L),
        C (b, d_state, L): xc and dt (and their gradients) stay in the scan's layout; B and C come out time-contiguous,
        and the Triton scan copies them once to d_state-contiguous (small: d_state values per token).

        Both projections are batched matmuls over the batch rows (weights broadcast, not copied per row); as
        nn.Linear on (b, L, d_inner) they would copy xc, dt and both gradients through a transpose (~4 passes over
        a (b, d_inner, L) tensor per forward + backward)."""
        b = xc.shape[0]
        xdbl = torch.bmm(self.x_proj.weight.expand(b, -1, -1), xc)          # (b, dt_rank + 2 * d_state, L)
        dt_low, B, C = xdbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = torch.bmm(self.dt_proj.weight.expand(b, -1, -1), dt_low)       # (b, d_inner, L)
        return dt, B, C  # bias + softplus happen inside the kernel (fp32)

    def _step_params(self, xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One step, xc (b, d_inner) -> dt (b, d_inner), B, C (b, d_state): token-major rows, one GEMM each."""
        dt_low, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt_low, self.dt_proj.weight), B, C

    def forward(self, x: Tensor, z: Tensor, state: LayerState | None = None) -> tuple[Tensor, LayerState]:
        """x, z: (batch, d_inner, L) -> y (batch, d_inner, L), new state (the given one is not modified)."""
        if state is not None:
            self._check_state(state, x.shape[0])
        window = None if state is None else state.conv                 # the last d_conv-1 inputs before x
        # conv1d + SiLU in one pass on a GPU (kernels.conv; torch's conv1d on the CPU), (b, d_inner, L)
        xc = kernels.causal_conv1d_silu(x, self.conv1d.weight[:, 0, :], self.conv1d.bias, window)
        new_conv = kernels.conv_window(x, window, self.d_conv - 1)
        dt, B, C = self._ssm_params(xc)  # (b, d_inner, L), (b, d_state, L) x2
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        y, ssm = kernels.selective_scan(
            xc, dt, A, B, C, D=self.D.float(),
            z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            initial_state=None if state is None else state.ssm, return_final_state=True,
            # on a GPU the scan's NaN / Inf checks would sync the device 8 times per call (H200, one layer of
            # d_model 1024, 8 x 2048 tokens, fwd + bwd: 9.25 -> 7.72 ms without them); the model's inputs are
            # checked at the forecaster's boundary and its results by the training loop and the detector
            check_finite=not xc.is_cuda)
        return y, LayerState(new_conv, ssm.float())

    def step(self, x: Tensor, z: Tensor, state: LayerState) -> Tensor:
        """One time step: x, z (batch, d_inner) -> y (batch, d_inner); ``state`` is updated in place."""
        self._check_state(state, x.shape[0])
        window = torch.cat([state.conv, x[:, :, None].to(state.conv.dtype)], dim=-1)  # (b, d_inner, d_conv)
        xc = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        xc = F.silu(xc).to(x.dtype)
        state.conv.copy_(window[:, :, 1:])
        dt, B, C = self._step_params(xc)
        A = -torch.exp(self.A_log.float())
        return kernels.selective_state_update(state.ssm, xc, dt, A, B, C, D=self.D.float(), z=z,
                                              dt_bias=self.dt_proj.bias.float(), dt_softplus=True,
                                              check_finite=not xc.is_cuda)    # as in forward


class Mixer(nn.Module):
    """Base of the dense and routed mixers: project in -> SelectiveSSM -> project out.

    Subclasses define project_in(h) -> (xz, routing) and project_out(y, routing) -> out, channel-first between
    the projections and the SSM (the scan's layout): h (batch, L, d_model), xz (batch, 2*d_inner, L) = [x; z] (any
    strides; time contiguous saves the SSM a transposing copy), y (batch, d_inner, L), out (batch, L, d_model).
    """

    ssm: SelectiveSSM
    d_model: int

    def project_in(self, h: Tensor) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def project_out(self, y: Tensor, routing: Any) -> Tensor:
        raise NotImplementedError

    def routing_stats(self, routing: Any, shape: tuple[int, int]) -> RoutingStats | None:
        """Monitoring statistics of one call over tokens of ``shape`` (batch, L); None for the dense mixer."""
        return None

    def allocate_state(self, batch: int, dtype: torch.dtype | None = None,
                       device: torch.device | None = None) -> LayerState:
        return self.ssm.allocate_state(batch, dtype, device)

    def forward(self, h: Tensor, state: LayerState | None = None
                ) -> tuple[Tensor, LayerState, RoutingStats | None]:
        """h (batch, L, d_model) -> (out (batch, L, d_model), new LayerState, RoutingStats or None)."""
        if h.dim() != 3 or h.shape[-1] != self.d_model:
            raise ValueError(f"h: expected shape (batch, L, d_model={self.d_model}), got {tuple(h.shape)}")
        xz, routing = self.project_in(h)
        x, z = xz.chunk(2, dim=1)
        y, new_state = self.ssm(x, z, state)
        return self.project_out(y, routing), new_state, self.routing_stats(routing, tuple(h.shape[:2]))

    def step(self, h: Tensor, state: LayerState) -> tuple[Tensor, RoutingStats | None]:
        """h (batch, d_model) -> (out (batch, d_model), RoutingStats or None); ``state`` updated in place."""
        if h.dim() != 2 or h.shape[-1] != self.d_model:
            raise ValueError(f"h: expected shape (batch, d_model={self.d_model}), got {tuple(h.shape)}")
        xz, routing = self.project_in(h[:, None])                # a sequence of one step
        x, z = xz[:, :, 0].chunk(2, dim=-1)
        y = self.ssm.step(x, z, state)
        return self.project_out(y[:, :, None], routing)[:, 0], self.routing_stats(routing, (h.shape[0], 1))


def make_ssm(cfg: RoMConfig) -> SelectiveSSM:
    return SelectiveSSM(cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.dt_rank_value, cfg.dt_min, cfg.dt_max,
                        cfg.dt_floor, cfg.dt_scale, cfg.conv_bias)


class MambaMixer(Mixer):
    """Dense Mamba-1 mixer: in_proj (d_model -> 2*d_inner, no bias), SelectiveSSM, out_proj (no bias)."""

    def __init__(self, cfg: RoMConfig):
        super().__init__()
        self.d_model, self.d_inner = cfg.d_model, cfg.d_inner
        self.in_proj = nn.Linear(cfg.d_model, 2 * cfg.d_inner, bias=False)  # rows [:d_inner] = W_x, rest = W_z
        self.ssm = make_ssm(cfg)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=False)

    def project_in(self, h: Tensor) -> tuple[Tensor, None]:
        """One GEMM W_in @ h^T over all tokens, whose (2*d_inner, batch * L) result is already channel-first."""
        b, L, _ = h.shape
        if L == 1:   # one step (streaming): token-major rows, the layout Mixer.step and SelectiveSSM.step read
            return F.linear(h, self.in_proj.weight).transpose(1, 2), None
        return torch.mm(self.in_proj.weight, h.reshape(b * L, -1).t()).view(-1, b, L).transpose(0, 1), None

    def project_out(self, y: Tensor, routing: None) -> Tensor:
        if y.shape[-1] == 1:    # one step: no layout to change
            return F.linear(y.transpose(1, 2), self.out_proj.weight)
        return _ProjectOutChannelFirst.apply(y, self.out_proj.weight)


class _ProjectOutChannelFirst(torch.autograd.Function):
    """y (batch, d_inner, L) -> y^T W^T (batch, L, d_model): one GEMM over all tokens on y laid out (d_inner, tokens)
    (a copy that keeps time contiguous, not a transpose), and a backward that hands the scan its gradient
    channel-first (as nn.Linear on y^T would not: the scan would transpose it again). Under CUDA autocast both
    passes run bf16 GEMMs, as nn.Linear would; the backward computes in the gradient's dtype (so CPU autocast, whose
    state custom_bwd does not restore, works too)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, y: Tensor, w: Tensor) -> Tensor:
        b, d, L = y.shape
        yt = y.permute(1, 0, 2).reshape(d, b * L)                     # (d_inner, tokens)
        out = torch.mm(yt.t(), w.t())                                  # (tokens, d_model)
        ctx.save_for_backward(yt, w)
        ctx.shape = (b, d, L)
        return out.view(b, L, -1)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:
        yt, w = ctx.saved_tensors
        b, d, L = ctx.shape
        g2 = g.reshape(b * L, -1)                                      # (tokens, d_model)
        w, yt = w.to(g2.dtype), yt.to(g2.dtype)
        dy = torch.mm(w.t(), g2.t()).view(d, b, L).permute(1, 0, 2)   # (b, d_inner, L), time contiguous
        dw = torch.mm(g2.t(), yt.t())                                  # (d_model, d_inner); cast back by autograd
        return dy, dw
