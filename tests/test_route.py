"""RoM's routing (kernels.route): the Triton top-1 kernels (run by Triton's interpreter on the CPU, TRITON_INTERPRET=1
set before they are imported) against the torch path, forward outputs and the router logits' gradient."""

from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from conftest import interpreted_kernels  # noqa: E402

from kernels.route import route_slots, route_torch  # noqa: E402

interpreted = interpreted_kernels("kernels.triton_route", "_route_fwd_kernel")


# (tokens, experts): one partial tile; two tiles of 512 at E = 8; E = 33 pads to 64 -> tiles of 64, 41 of them, more
# than the 32 tiles' loss partials the placing kernel sums at a time; one expert
@pytest.mark.parametrize("n,e", [(37, 5), (700, 8), (2600, 33), (9, 1)])
def test_triton_top1_routing_matches_the_torch_path(n, e):
    torch.manual_seed(n + e)
    logits = torch.randn(n, e) * 3
    logits[: n // 3, 0] += 4.0                            # a busy expert, so counts differ
    ref = route_torch(logits, 1)
    out = route_slots(logits, 1, backend="triton")
    for name in ("token_of_slot", "sorted_pos", "counts", "offs", "top_experts"):
        a, b = getattr(out, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for name in ("gate_of_slot", "prob_sum", "z_sum"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("used", [("gate",), ("gate", "prob", "z"), ("prob", "z"), ("z",)])
def test_triton_top1_routing_gradient_matches_the_torch_path(used):
    torch.manual_seed(len(used))
    n, e = 300, 6
    base = torch.randn(n, e) * 2
    w_gate, w_prob = torch.randn(n), torch.randn(e)
    grads = []
    for backend in ("triton", "torch"):
        logits = base.clone().requires_grad_()
        r = route_slots(logits, 1, backend=backend)
        loss = 0.0
        if "gate" in used:
            loss = loss + (r.gate_of_slot * w_gate[r.token_of_slot]).sum()
        if "prob" in used:
            loss = loss + (r.prob_sum * w_prob).sum()
        if "z" in used:
            loss = loss + 0.3 * r.z_sum
        loss.backward()
        grads.append(logits.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_routing_rejects_bad_input_and_keeps_k_above_one_on_the_torch_path():
    with pytest.raises(ValueError, match="logits: expected an fp32"):
        route_slots(torch.randn(4, 3, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= 3"):
        route_slots(torch.randn(4, 3), 4)
    logits = torch.randn(10, 4)
    out, ref = route_slots(logits, 2, backend="triton"), route_torch(logits, 2)
    assert torch.equal(out.token_of_slot, ref.token_of_slot) and out.top_experts.shape == (10, 2)


def test_a_rom_mixer_trains_the_same_on_the_triton_routing(monkeypatch):
    """The whole mixer with its routing on the interpreted kernels: output, router and input gradients as on the torch
    path (the aux losses included)."""
    import functools

    import rmamba.rom as rom
    from rmamba import RoMConfig, RoMMixer

    torch.manual_seed(11)
    mixer = RoMMixer(RoMConfig(d_model=8, n_layers=1, num_experts=4, top_k=1))
    h0 = torch.randn(2, 19, 8)
    got = []
    for backend in ("triton", "torch"):
        monkeypatch.setattr(rom, "route_slots", functools.partial(route_slots, backend=backend))
        mixer.zero_grad(set_to_none=True)
        h = h0.clone().requires_grad_()
        out, _, stats = mixer(h)
        (out.pow(2).mean() + stats.aux_loss(1e-2, 1e-3)).backward()
        got.append((out, h.grad, mixer.router.weight.grad, stats.tokens_per_expert))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN arithmetic
@pytest.mark.parametrize("e", [5, 8])
def test_nan_logits_still_give_a_valid_slot_order(e):
    """A NaN router logit (a diverging step, a NaN input) must leave the dispatch a permutation with counts that add up
    (the slot kernels index with it); the NaN row's expert is its NaN column, as torch.topk ranks NaN highest."""
    torch.manual_seed(e)
    n = 700
    logits = torch.randn(n, e)
    logits[2] = float("nan")                 # a whole row
    logits[n - 1, e - 1] = float("nan")      # one value
    logits[300, 0] = float("nan")
    r = route_slots(logits, 1, backend="triton")
    assert int(r.counts.sum()) == n and (r.top_experts >= 0).all() and (r.top_experts < e).all()
    assert torch.equal(r.token_of_slot.sort().values, torch.arange(n))
    assert torch.equal(r.token_of_slot[r.sorted_pos], torch.arange(n))
    assert torch.equal(r.counts, torch.bincount(r.top_experts.flatten(), minlength=e))
    assert r.top_experts[n - 1, 0] == e - 1 and r.top_experts[300, 0] == 0 and r.top_experts[2, 0] == 0
