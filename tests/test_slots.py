"""RoM's slot moves between the grouped matmul's rows and the scan's channel-first layout (kernels.slots): the
Triton kernels (run by Triton's interpreter on the CPU, TRITON_INTERPRET=1 set before they are imported) against the
torch path, and the autograd pair of rmamba.rom against index_select / index_add with fp64 gradcheck."""

from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from conftest import interpreted_kernels  # noqa: E402

import rmamba.rom as rom_mod  # noqa: E402
from kernels.slots import (  # noqa: E402
    combine_slots_cf,
    combine_slots_weighted,
    combine_slots_weighted_backward,
    gather_slots_cf,
)
from rmamba import RoMConfig, RoMMixer  # noqa: E402

interpreted = interpreted_kernels("kernels.triton_slots", "_combine_cf_kernel")


def dispatch(b: int, L: int, k: int, seed: int):
    """A real routing of b * L random tokens over 5 experts, top-k."""
    torch.manual_seed(seed)
    mixer = RoMMixer(RoMConfig(d_model=8, n_layers=1, num_experts=5, top_k=k))
    with torch.no_grad():
        return mixer.route(torch.randn(b * L, 8))


# C = 70 and L = 67 / 131 leave partial tiles of 64 on both axes
@pytest.mark.parametrize("b,L,k", [(2, 67, 1), (1, 131, 2), (3, 5, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_slot_kernels_match_the_torch_path(b, L, k, dtype):
    d = dispatch(b, L, k, seed=b * 10 + k)
    rows = torch.randn(b * L * k, 70).to(dtype)
    ref = combine_slots_cf(rows, d.sorted_pos, k, b, L, backend="torch")
    out = combine_slots_cf(rows, d.sorted_pos, k, b, L, backend="triton")
    assert out.shape == (b, 70, L) and out.is_contiguous() and out.dtype == dtype
    # K = 1 moves values; K > 1 sums in fp32 (kernel) against the rows' dtype (torch)
    tol = 0.0 if k == 1 else 1e-6 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    x = torch.randn(b, L, 70).to(dtype).transpose(1, 2)           # channel-first view, time NOT contiguous
    for xx in (x, x.contiguous()):
        g_ref = gather_slots_cf(xx, d.token_of_slot, d.sorted_pos, k, backend="torch")
        g = gather_slots_cf(xx, d.token_of_slot, d.sorted_pos, k, backend="triton")
        assert g.shape == (b * L * k, 70) and g.is_contiguous()
        torch.testing.assert_close(g, g_ref, atol=0, rtol=0)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_channel_first_slot_functions_are_adjoint_gathers(k, backend, monkeypatch):
    """combine = index_add of the slot rows into their tokens, gather = index_select of the tokens' columns; the
    autograd pair differentiates as such (fp64 gradcheck) on either backend."""
    b, L = 2, 7
    d = dispatch(b, L, k, seed=k)
    x = torch.randn(b * L * k, 6, dtype=torch.float64)
    ref = x.new_zeros(b * L, 6).index_add_(0, d.token_of_slot, x).view(b, L, 6).transpose(1, 2)
    monkeypatch.setattr(rom_mod, "combine_slots_cf",
                        lambda *a: combine_slots_cf(*a, backend=backend))
    monkeypatch.setattr(rom_mod, "gather_slots_cf", lambda *a: gather_slots_cf(*a, backend=backend))
    comb = rom_mod._CombineSlotsCF.apply(x, d.token_of_slot, d.sorted_pos, k, (b, L))
    torch.testing.assert_close(comb, ref)
    y = torch.randn(b, 6, L, dtype=torch.float64)
    torch.testing.assert_close(rom_mod._GatherSlotsCF.apply(y, d.token_of_slot, d.sorted_pos, k),
                               y.transpose(1, 2).reshape(b * L, 6).index_select(0, d.token_of_slot))
    assert torch.autograd.gradcheck(
        lambda a: rom_mod._CombineSlotsCF.apply(a, d.token_of_slot, d.sorted_pos, k, (b, L)), (x.requires_grad_(),))
    assert torch.autograd.gradcheck(
        lambda a: rom_mod._GatherSlotsCF.apply(a, d.token_of_slot, d.sorted_pos, k), (y.requires_grad_(),))


@pytest.mark.parametrize("n,k", [(67, 1), (45, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_combine_kernels_match_the_torch_path(n, k, dtype):
    """The out-projection's gated sum over slots and its two gradients: Triton (interpreter; C = 150 spans three
    channel chunks of the backward's loop, the last one partial) against the torch path."""
    d = dispatch(1, n, k, seed=n + k)
    rows = torch.randn(n * k, 150).to(dtype)
    gate = torch.rand(n * k)
    out_ref = combine_slots_weighted(rows, gate, d.sorted_pos, k, backend="torch")
    out = combine_slots_weighted(rows, gate, d.sorted_pos, k, backend="triton")
    assert out.shape == (n, 150) and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2          # the kernel sums in fp32, torch in the rows' dtype
    torch.testing.assert_close(out, out_ref, atol=tol, rtol=tol)
    grad = torch.randn(n, 150).to(dtype)
    ref = combine_slots_weighted_backward(rows, gate, d.token_of_slot, d.sorted_pos, k, grad, backend="torch")
    got = combine_slots_weighted_backward(rows, gate, d.token_of_slot, d.sorted_pos, k, grad, backend="triton")
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gated_combine_differentiates_as_the_product_and_sum_it_replaces(k, backend, monkeypatch):
    n = 9
    d = dispatch(1, n, k, seed=3 + k)
    x = torch.randn(n * k, 5, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(n * k, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(rom_mod, "combine_slots_weighted", lambda *a: combine_slots_weighted(*a, backend=backend))
    monkeypatch.setattr(rom_mod, "combine_slots_weighted_backward",
                        lambda *a: combine_slots_weighted_backward(*a, backend=backend))
    fn = lambda a, g: rom_mod._GatedCombineSlots.apply(a, g, d.token_of_slot, d.sorted_pos, k)  # noqa: E731
    ref = (x * gate[:, None]).new_zeros(n, 5).index_add_(0, d.token_of_slot, x * gate[:, None])
    # the kernel computes in fp32 (exactly so under the interpreter too): fp32-sized steps and tolerances there
    tol = dict(eps=1e-6, atol=1e-5, rtol=1e-3) if backend == "torch" else dict(eps=1e-3, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(fn(x, gate), ref, atol=tol["atol"], rtol=tol["rtol"])
    assert torch.autograd.gradcheck(fn, (x, gate), **tol)


def test_slot_moves_name_what_is_wrong():
    d = dispatch(1, 4, 1, seed=0)
    with pytest.raises(ValueError, match=r"rows: expected shape \(4, C\)"):
        combine_slots_cf(torch.randn(5, 3), d.sorted_pos, 1, 1, 4)
    with pytest.raises(ValueError, match="sorted_pos: expected an int64 vector"):
        combine_slots_cf(torch.randn(4, 3), d.sorted_pos.int(), 1, 1, 4)
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, C, L\)"):
        gather_slots_cf(torch.randn(4, 3), d.token_of_slot, d.sorted_pos, 1)
    with pytest.raises(ValueError, match="token_of_slot: expected an int64 vector of 8 slots"):
        gather_slots_cf(torch.randn(1, 3, 4), d.token_of_slot, d.sorted_pos, 2)
    with pytest.raises(ValueError, match="backend: expected one of"):
        gather_slots_cf(torch.randn(1, 3, 4), d.token_of_slot, d.sorted_pos, 1, backend="cuda")
    with pytest.raises(ValueError, match=r"gate: expected shape \(4,\)"):
        combine_slots_weighted(torch.randn(4, 3), torch.rand(3), d.sorted_pos, 1)
    with pytest.raises(ValueError, match=r"grad: expected shape \(4, 3\)"):
        combine_slots_weighted_backward(torch.randn(4, 3), torch.rand(4), d.token_of_slot, d.sorted_pos, 1,
                                        torch.randn(4, 2))
