"""A RoM layer's routing: router logits -> each token's top-K experts, gates, the token-slots sorted by expert, and
the two sums behind the routing losses (ROM_SPEC section 2).

    route_slots(logits (N, E) fp32, k) -> Routing:
        gate_of_slot (N*k,) fp32   gate of each sorted slot (differentiable); softmax probability for k = 1, the
                                   K chosen probabilities renormalised for k > 1
        token_of_slot (N*k,) int64 token of each sorted slot; slots sorted by expert, stably (token order within one)
        sorted_pos (N*k,) int64    position in the sorted order of slot t*k + j (the inverse permutation)
        counts (E,) int64          slots per expert;  offs (E,) int32: their cumulative sums (grouped-matmul ends)
        top_experts (N, k) int64   experts chosen per token
        prob_sum (E,) fp32         router probabilities summed over tokens (differentiable)
        z_sum () fp32              sum over tokens of logsumexp(logits)^2 (differentiable)

CUDA tensors at k = 1 run kernels.triton_route (two Triton kernels and a cumsum forward, one kernel backward, where
the torch path is ~20 ops each way and a radix sort; CPU tensors too with backend="triton" under TRITON_INTERPRET=1,
the tests); everything else runs torch ops with autograd. Both give the same order (a stable counting sort equals a
stable argsort) and the same values up to fp32 rounding of the softmax sums, for finite logits without ties (the
kernels take the argmax of the logits, NaN highest; the torch path the top-k of the probabilities).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kernels._host import OP_BACKENDS, use_triton

ROUTE_BACKENDS = OP_BACKENDS


class Routing(NamedTuple):
    gate_of_slot: Tensor
    token_of_slot: Tensor
    sorted_pos: Tensor
    counts: Tensor
    offs: Tensor
    top_experts: Tensor
    prob_sum: Tensor
    z_sum: Tensor


def group_offsets(counts: Tensor) -> Tensor:
    """The grouped matmul's group ends: int32 cumulative slot counts."""
    return counts.cumsum(0).to(torch.int32)


def route_torch(logits: Tensor, k: int) -> Routing:
    """The torch path (also the reference of the tests); differentiable through autograd."""
    probs = logits.softmax(dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)                   # (N, k)
    gates = top_p if k == 1 else top_p / top_p.sum(-1, keepdim=True)
    flat = top_i.reshape(-1)                               # slot s = token * k + j
    order = torch.argsort(flat, stable=True)
    # slots per expert by a scatter-add, not torch.bincount: on CUDA bincount reads its input's maximum back to the
    # host (a device sync in every forward, which stalls the host until the GPU has caught up)
    counts = flat.new_zeros(logits.shape[1]).scatter_add_(0, flat, torch.ones_like(flat))
    sorted_pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    token_of_slot = order if k == 1 else order // k
    return Routing(gates.reshape(-1)[order], token_of_slot, sorted_pos, counts, group_offsets(counts), top_i,
                   probs.sum(0), torch.logsumexp(logits, dim=-1).pow(2).sum())


def route_slots(logits: Tensor, k: int, backend: str | None = None) -> Routing:
    """See the module docstring."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits: expected an fp32 (tokens, experts) tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k: expected 1 <= k <= {logits.shape[1]} experts, got {k}")
    if use_triton(logits, backend) and k == 1 and logits.shape[0] > 0:
        from kernels.triton_route import RouteTop1
        return Routing(*RouteTop1.apply(logits))
    return route_torch(logits, k)


__all__ = ["Routing", "route_slots", "route_torch", "group_offsets", "ROUTE_BACKENDS"]
