"""Routing Mamba (ROM_SPEC section 2): the mixer's in_proj (W_x, W_z) and out_proj (W_o) as E experts.

One router per layer, p_t = softmax(h_t W_r); its top-K decision I_t and gate weights g_t are shared by
all three routed projections:
    x_t = sum_{i in I_t} h_t W_x,i ;  z_t = sum_{i in I_t} h_t W_z,i ;  out_t = sum_{i in I_t} g_t,i y_t W_o,i
(gate_on_all=True also weights x_t and z_t by g). g is the raw softmax probability for K=1 (Switch) and
renormalised over the chosen K for K>1, so the router always gets gradient. conv1d, x_proj, dt_proj, A_log
and D (the `SelectiveSSM`) are shared: one state trajectory per channel.

Dispatch is dropless and its compute grows with K, not E: the N*K token-slots are sorted by expert and
each expert multiplies only its own rows (`expert_matmul`, the one place a grouped-matmul kernel plugs in).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.route import Routing, group_offsets, route_slots
from kernels.slots import (
    combine_slots_cf,
    combine_slots_weighted,
    combine_slots_weighted_backward,
    gather_slots_cf,
)
from rmamba.config import RoMConfig
from rmamba.mamba import MambaMixer, Mixer, make_ssm


@functools.cache
def _grouped_mm_card(device_index: int) -> bool:
    """Whether this CUDA device runs torch's grouped matmul (compute capability >= 9.0); asked once per device."""
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device_index)[0] >= 9


def grouped_mm_available(x: Tensor, weights: Tensor) -> bool:
    """True where torch's grouped matmul runs as one fused kernel: a CUDA device of compute capability >= 9.0,
    bf16 compute (bf16 tensors, or bf16 autocast), and rows whose bf16 size is a multiple of 16 bytes."""
    if not (x.is_cuda and _grouped_mm_card(x.device.index if x.device.index is not None else 0)):
        return False
    bf16 = (x.dtype == torch.bfloat16 and weights.dtype == torch.bfloat16) or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    return bf16 and weights.shape[1] % 8 == 0 and weights.shape[2] % 8 == 0


def expert_matmul(x_sorted: Tensor, weights: Tensor, counts: Tensor | Sequence[int],
                  grouped: bool | None = None, offs: Tensor | None = None) -> Tensor:
    """Grouped matmul: row block e of ``x_sorted`` times expert e's weight.

    x_sorted: (S, d_in), rows grouped by expert in order 0..E-1; weights: (E, d_out, d_in) (nn.Linear layout);
    counts: (E,) int64 tensor (or E ints) of rows per expert, summing to S. Returns (S, d_out).
    FLOPs = 2 * S * d_in * d_out, independent of E. ``grouped`` picks the path (None: automatic): True runs
    torch's grouped matmul in bf16 (``torch._grouped_mm``: one kernel for all experts, group offsets stay on the
    device, so no host sync); False loops over the experts with F.linear in the input dtype (exact fp32 on the CPU).
    ``offs``: the grouped path's int32 cumulative counts, if the caller has them (one layer's projections share them).
    """
    if not isinstance(counts, Tensor):
        counts = torch.tensor(list(counts), dtype=torch.int64)
    if grouped is None:
        grouped = grouped_mm_available(x_sorted, weights)
    if grouped:
        if offs is None:
            offs = group_offsets(counts.to(x_sorted.device))
        return torch._grouped_mm(x_sorted.to(torch.bfloat16), weights.to(torch.bfloat16).transpose(1, 2), offs=offs)
    sizes = counts.tolist()
    pieces = [F.linear(xs, weights[e]) for e, xs in enumerate(x_sorted.split(sizes)) if sizes[e] > 0]
    return torch.cat(pieces) if pieces else x_sorted.new_zeros(0, weights.shape[1])


@dataclass
class RoutingStats:
    """Routing of one layer over one call (or several, merged). Counts are over token-slots (tokens * K).
    ``sums``: (prob_sum, z_sum), the two sums behind the routing losses (kernels.route computes them with the
    routing, in the same pass on a GPU), carrying the router's gradient."""

    tokens_per_expert: Tensor        # (E,) int64, slots routed to each expert; sums to n_tokens * top_k
    n_tokens: int
    top_k: int
    top_experts: Tensor | None = None  # (batch, L, K) int64 experts chosen per token; None once merged
    sums: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def _sum(self, i: int) -> Tensor:
        if self.sums is None:
            raise ValueError("RoutingStats: no routing-loss sums (built without `sums`); the losses and mean_prob "
                             "need the (prob_sum, z_sum) of the routing")
        return self.sums[i]

    @property
    def prob_sum(self) -> Tensor:
        """(E,) fp32, router probabilities summed over tokens (carries grad)."""
        return self._sum(0)

    @property
    def z_sum(self) -> Tensor:
        """() fp32, sum over tokens of logsumexp(logits)^2 (carries grad)."""
        return self._sum(1)

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.numel()

    @property
    def mean_prob(self) -> Tensor:
        """(E,) mean router probability per expert (detached, for monitoring)."""
        return self.prob_sum.detach() / max(self.n_tokens, 1)

    @property
    def usage(self) -> Tensor:
        """(E,) share of routed slots per expert (sums to 1)."""
        return self.tokens_per_expert.float() / max(self.n_tokens * self.top_k, 1)

    def load_balance_loss(self, coef: float = 1.0) -> Tensor:
        """Switch load balancing E * sum_i f_i P_i (1 when balanced; f_i carries no gradient, P_i does), times
        ``coef``: with f = counts / slots and P = prob_sum / tokens, one dot product and one scale."""
        scale = coef * self.num_experts / (max(self.n_tokens, 1) * max(self.n_tokens * self.top_k, 1))
        return torch.dot(self.tokens_per_expert.to(self.prob_sum), self.prob_sum) * scale

    def z_loss(self, coef: float = 1.0) -> Tensor:
        """Router z-loss: mean over tokens of logsumexp(logits)^2, times ``coef``."""
        return self.z_sum * (coef / max(self.n_tokens, 1))

    def aux_loss(self, lb_coef: float, z_coef: float) -> Tensor:
        return self.load_balance_loss(lb_coef) + self.z_loss(z_coef)


def merge_routing_stats(stats: Sequence[RoutingStats]) -> RoutingStats:
    """Pool the stats of one layer over several calls (e.g. one batch per equipment type), so the load
    balance is asked of the union and not of each call (that would forbid per-type specialisation)."""
    if len(stats) == 1:
        s = stats[0]
        return RoutingStats(s.tokens_per_expert, s.n_tokens, s.top_k, sums=s.sums)
    return RoutingStats(
        tokens_per_expert=torch.stack([s.tokens_per_expert for s in stats]).sum(0),
        n_tokens=sum(s.n_tokens for s in stats), top_k=stats[0].top_k, top_experts=None,
        sums=(torch.stack([s.prob_sum for s in stats]).sum(0), torch.stack([s.z_sum for s in stats]).sum()))


class _GatherSlots(torch.autograd.Function):
    """x (N, d) -> (N*K, d): row p is x[token_of_slot[p]] (the tokens copied into their sorted slots).

    Its adjoint is ``_CombineSlots``; both are plain gathers (index_select), so neither pass needs a zero-filled
    buffer or a scatter-add: the slot order is a permutation, whose inverse ``sorted_pos`` is known."""

    @staticmethod
    def forward(ctx, x: Tensor, token_of_slot: Tensor, sorted_pos: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(token_of_slot, sorted_pos)
        ctx.k = k
        return x.index_select(0, token_of_slot)

    @staticmethod
    def backward(ctx, g: Tensor):
        token_of_slot, sorted_pos = ctx.saved_tensors
        return _CombineSlots.apply(g, token_of_slot, sorted_pos, ctx.k), None, None, None


class _CombineSlots(torch.autograd.Function):
    """x_sorted (N*K, d) -> (N, d): row t is the sum over k of the row of slot t * K + k."""

    @staticmethod
    def forward(ctx, x: Tensor, token_of_slot: Tensor, sorted_pos: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(token_of_slot, sorted_pos)
        ctx.k = k
        rows = x.index_select(0, sorted_pos)
        return rows if k == 1 else rows.view(-1, k, x.shape[1]).sum(1)

    @staticmethod
    def backward(ctx, g: Tensor):
        token_of_slot, sorted_pos = ctx.saved_tensors
        return _GatherSlots.apply(g, token_of_slot, sorted_pos, ctx.k), None, None, None


class _CombineSlotsCF(torch.autograd.Function):
    """x_sorted (N*K, C) -> (batch, C, L) channel-first: token t = (b, l) gets the sum of its K slots' rows. The
    scan's layout in one pass (kernels.slots); _CombineSlots would give token-major rows, which the SSM would then
    transpose. Adjoint: ``_GatherSlotsCF``."""

    @staticmethod
    def forward(ctx, x: Tensor, token_of_slot: Tensor, sorted_pos: Tensor, k: int, shape: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(token_of_slot, sorted_pos)
        ctx.k = k
        return combine_slots_cf(x, sorted_pos, k, *shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        token_of_slot, sorted_pos = ctx.saved_tensors
        return _GatherSlotsCF.apply(g, token_of_slot, sorted_pos, ctx.k), None, None, None, None


class _GatherSlotsCF(torch.autograd.Function):
    """Channel-first x (batch, C, L) -> (N*K, C): row p is token token_of_slot[p]'s column of x. Adjoint:
    ``_CombineSlotsCF``."""

    @staticmethod
    def forward(ctx, x: Tensor, token_of_slot: Tensor, sorted_pos: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(token_of_slot, sorted_pos)
        ctx.k = k
        ctx.shape = (x.shape[0], x.shape[2])
        return gather_slots_cf(x, token_of_slot, sorted_pos, ctx.k)

    @staticmethod
    def backward(ctx, g: Tensor):
        token_of_slot, sorted_pos = ctx.saved_tensors
        return _CombineSlotsCF.apply(g, token_of_slot, sorted_pos, ctx.k, ctx.shape), None, None, None


class _GatedCombineSlots(torch.autograd.Function):
    """x_sorted (N*K, C), gate (N*K,) -> (N, C): row t is the gate-weighted sum of its K slots' rows (the routed
    out-projection's last step). One pass each way (kernels.slots), where a product, a cast and a combine, and their
    backward, are six torch ops and three autograd nodes."""

    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor, token_of_slot: Tensor, sorted_pos: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(x, gate, token_of_slot, sorted_pos)
        ctx.k = k
        return combine_slots_weighted(x, gate, sorted_pos, k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        x, gate, token_of_slot, sorted_pos = ctx.saved_tensors
        dx, dgate = combine_slots_weighted_backward(x, gate, token_of_slot, sorted_pos, ctx.k, g.contiguous())
        return dx, dgate, None, None, None


class RoMMixer(Mixer):
    """Routed Mamba-1 mixer. Experts: w_in (E, 2*d_inner, d_model) = [W_x; W_z] per expert and
    w_out (E, d_model, d_inner) = W_o (nn.Linear layout: (out, in)). Router: Linear(d_model, E, bias=False)."""

    def __init__(self, cfg: RoMConfig):
        super().__init__()
        if cfg.num_experts < 1:
            raise ValueError(f"num_experts: RoMMixer expects >= 1 expert, got {cfg.num_experts}")
        self.d_model, self.d_inner = cfg.d_model, cfg.d_inner
        self.num_experts, self.top_k, self.gate_on_all = cfg.num_experts, cfg.top_k, cfg.gate_on_all
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(cfg.num_experts, 2 * cfg.d_inner, cfg.d_model))
        self.ssm = make_ssm(cfg)
        self.w_out = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model, cfg.d_inner))
        # Each expert initialised as the nn.Linear it replaces: U(+-1/sqrt(fan_in)).
        nn.init.uniform_(self.w_in, -cfg.d_model ** -0.5, cfg.d_model ** -0.5)
        nn.init.uniform_(self.w_out, -cfg.d_inner ** -0.5, cfg.d_inner ** -0.5)

    @torch.no_grad()
    def load_dense(self, dense: MambaMixer) -> RoMMixer:
        """Copy a MambaMixer's weights into every expert and the shared SSM ("upcycling").
        With E=1 the result computes exactly what ``dense`` computes."""
        self.ssm.load_state_dict(dense.ssm.state_dict())
        self.w_in.copy_(dense.in_proj.weight.expand_as(self.w_in))
        self.w_out.copy_(dense.out_proj.weight.expand_as(self.w_out))
        return self

    def route(self, h: Tensor) -> Routing:
        """h (N, d_model) -> top-K experts per token, gates, the slot order sorted by expert and the routing-loss
        sums (kernels.route)."""
        return route_slots(self.router(h).float(), self.top_k)    # routing math in fp32

    def project_in(self, h: Tensor) -> tuple[Tensor, Routing]:
        """h (batch, L, d_model) -> xz (batch, 2*d_inner, L) summed over each token's K experts, channel-first."""
        b, L, _ = h.shape
        h = h.reshape(b * L, -1)
        d = self.route(h)
        grouped = grouped_mm_available(h, self.w_in)
        if grouped:
            h = h.to(torch.bfloat16)  # the grouped matmul reads bf16: gather half the bytes
        xs = _GatherSlots.apply(h, d.token_of_slot, d.sorted_pos, self.top_k)
        xz_sorted = expert_matmul(xs, self.w_in, d.counts, grouped, d.offs)  # (N*K, 2*d_inner)
        if self.gate_on_all:
            xz_sorted = xz_sorted * d.gate_of_slot[:, None].to(xz_sorted.dtype)
        return _CombineSlotsCF.apply(xz_sorted, d.token_of_slot, d.sorted_pos, self.top_k, (b, L)), d

    def project_out(self, y: Tensor, d: Routing) -> Tensor:
        """y (batch, d_inner, L) -> out (batch, L, d_model) = sum over the token's experts of g * y W_o."""
        b, _, L = y.shape
        grouped = grouped_mm_available(y, self.w_out)
        if grouped:
            y = y.to(torch.bfloat16)
        o = expert_matmul(_GatherSlotsCF.apply(y, d.token_of_slot, d.sorted_pos, self.top_k), self.w_out, d.counts,
                          grouped, d.offs)
        return _GatedCombineSlots.apply(o, d.gate_of_slot, d.token_of_slot, d.sorted_pos, self.top_k).view(b, L, -1)

    def routing_stats(self, d: Routing, shape: tuple[int, int]) -> RoutingStats:
        return RoutingStats(tokens_per_expert=d.counts, n_tokens=d.top_experts.shape[0], top_k=self.top_k,
                            top_experts=d.top_experts.detach().view(*shape, self.top_k), sums=(d.prob_sum, d.z_sum))


__all__ = ["RoMMixer", "RoutingStats", "expert_matmul", "grouped_mm_available", "merge_routing_stats"]
