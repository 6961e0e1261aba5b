"""Mixer-level tests: Mamba-1 math and init, RoM == Mamba at E=1, streaming, routing, compute, config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import kernels
import rmamba.rom as rom_mod
from rmamba import (
    Backbone,
    MambaMixer,
    RoMConfig,
    RoMForecaster,
    RoMMixer,
    RoutingStats,
    count_parameters,
    expert_matmul,
    merge_routing_stats,
    parameter_table,
)

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one intra-op thread is as fast and kinder to a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small(**kw) -> RoMConfig:
    base = dict(d_model=16, n_layers=2, d_state=4, d_conv=4, expand=2, num_experts=4, top_k=1)
    return RoMConfig(**{**base, **kw})


def spec_mamba(m: MambaMixer, h: torch.Tensor) -> torch.Tensor:
    """ROM_SPEC section 1 written out literally (fp64, explicit time loop): h (b, L, d_model) -> (b, L, d_model)."""
    p = {k: v.double() for k, v in m.state_dict().items()}
    h = h.double()
    b, L, _ = h.shape
    di, n, K = m.d_inner, m.ssm.d_state, m.ssm.d_conv
    xz = h @ p["in_proj.weight"].T
    x, z = xz[..., :di], xz[..., di:]
    w = p["ssm.conv1d.weight"][:, 0, :]                                  # (di, K)
    xp = F.pad(x, (0, 0, K - 1, 0))                                      # left-pad time
    xc = sum(xp[:, k:k + L] * w[:, k] for k in range(K)) + p["ssm.conv1d.bias"]
    xc = F.silu(xc)
    dt_low, B, C = (xc @ p["ssm.x_proj.weight"].T).split([m.ssm.dt_rank, n, n], dim=-1)
    delta = F.softplus(dt_low @ p["ssm.dt_proj.weight"].T + p["ssm.dt_proj.bias"])
    A = -torch.exp(p["ssm.A_log"])
    state = torch.zeros(b, di, n, dtype=torch.float64)
    ys = []
    for t in range(L):
        dA, dBx = torch.exp(delta[:, t, :, None] * A), delta[:, t, :, None] * B[:, t, None, :] * xc[:, t, :, None]
        state = dA * state + dBx
        ys.append((state * C[:, t, None, :]).sum(-1) + p["ssm.D"] * xc[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return y @ p["out_proj.weight"].T


def random_chunks(L: int, g: torch.Generator) -> list[int]:
    """Random chunk lengths summing to L, always including chunks shorter than d_conv - 1."""
    sizes, left = [1, 2], L - 3
    while left > 0:
        s = min(left, int(torch.randint(1, 12, (1,), generator=g)))
        sizes.append(s)
        left -= s
    return sizes


# ---- Mamba-1 mixer ------------------------------------------------------------------------------------------
def test_mamba_mixer_matches_spec_math():
    torch.manual_seed(0)
    m = MambaMixer(small(num_experts=0))
    h = torch.randn(2, 23, 16)
    out, _, stats = m(h)
    assert stats is None
    torch.testing.assert_close(out.double(), spec_mamba(m, h), **TOL)


def test_channel_first_projections_compute_and_differentiate_as_linear_layers():
    """The dense mixer's projections run channel-first (one GEMM each, and a custom backward for W_o): the same
    values and gradients as nn.Linear on token-major rows, for time-contiguous and transposed inputs."""
    from rmamba.mamba import _ProjectOutChannelFirst

    torch.manual_seed(0)
    m = MambaMixer(small(num_experts=0)).double()
    h = torch.randn(2, 9, 16, dtype=torch.float64)
    xz, _ = m.project_in(h)
    assert xz.shape == (2, 2 * m.d_inner, 9) and xz.stride(-1) == 1
    torch.testing.assert_close(xz, F.linear(h, m.in_proj.weight).transpose(1, 2))
    w = m.out_proj.weight.detach().clone().requires_grad_()
    for y in (torch.randn(2, m.d_inner, 9, dtype=torch.float64),                  # contiguous
              torch.randn(2, 9, m.d_inner, dtype=torch.float64).transpose(1, 2)):  # time stride d_inner
        y.requires_grad_()
        torch.testing.assert_close(_ProjectOutChannelFirst.apply(y, w), F.linear(y.transpose(1, 2), w))
        assert torch.autograd.gradcheck(_ProjectOutChannelFirst.apply, (y, w))
    y = torch.randn(2, m.d_inner, 9, dtype=torch.float64)
    (dy,) = torch.autograd.grad(_ProjectOutChannelFirst.apply(y.requires_grad_(), w).sum(), y)
    assert dy.stride(-1) == 1                   # the scan's backward reads it as it is, with no transposing copy


def test_mamba_init_follows_spec():
    cfg = small(d_model=64, num_experts=0, d_state=16, dt_min=1e-3, dt_max=1e-1)
    m = MambaMixer(cfg)
    s = m.ssm
    assert m.in_proj.bias is None and m.out_proj.bias is None and s.x_proj.bias is None
    assert s.conv1d.bias is not None and s.conv1d.groups == cfg.d_inner
    assert s.A_log.dtype == torch.float32
    torch.testing.assert_close(s.A_log, torch.log(torch.arange(1.0, 17.0)).expand(cfg.d_inner, 16))
    assert torch.equal(s.D, torch.ones(cfg.d_inner))
    assert s.A_log._no_weight_decay and s.D._no_weight_decay
    dt = F.softplus(s.dt_proj.bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert math.log(dt.max() / dt.min()) > 2.0  # log-uniform spread, not a constant
    assert s.dt_rank == math.ceil(64 / 16)
    assert s.dt_proj.weight.abs().max() <= s.dt_rank ** -0.5


# ---- RoM == Mamba at E=1 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate_on_all", [False, True])
def test_rom_e1_k1_equals_mamba(gate_on_all):
    torch.manual_seed(1)
    dense = MambaMixer(small(num_experts=0))
    rom = RoMMixer(small(num_experts=1, top_k=1, gate_on_all=gate_on_all)).load_dense(dense)
    h = torch.randn(3, 17, 16, requires_grad=True)
    a, sa, _ = dense(h)
    b, sb, stats = rom(h)
    torch.testing.assert_close(b, a, **TOL)
    torch.testing.assert_close(sb.ssm, sa.ssm, **TOL)
    assert stats.tokens_per_expert.tolist() == [3 * 17]
    ga, = torch.autograd.grad(a.pow(2).sum(), h)
    gb, = torch.autograd.grad(b.pow(2).sum(), h)
    torch.testing.assert_close(gb, ga, **TOL)


def test_load_dense_is_what_makes_them_equal():
    """Guard against a vacuous equivalence test: independently initialised mixers differ."""
    torch.manual_seed(1)
    dense, rom = MambaMixer(small(num_experts=0)), RoMMixer(small(num_experts=1))
    h = torch.randn(1, 8, 16)
    assert not torch.allclose(dense(h)[0], rom(h)[0], atol=1e-3)


# ---- streaming ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [small(num_experts=0), small(num_experts=4, top_k=2)], ids=["dense", "rom-E4-K2"])
def test_mixer_chunked_and_step_equal_full(cfg):
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    m = MambaMixer(cfg) if cfg.dense else RoMMixer(cfg)
    h = torch.randn(2, 40, 16)
    with torch.no_grad():
        full, full_state, _ = m(h)
        outs, state, t = [], None, 0
        for s in random_chunks(40, g):
            o, state, _ = m(h[:, t:t + s], state)
            outs.append(o)
            t += s
        torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
        torch.testing.assert_close(state.ssm, full_state.ssm, **TOL)
        torch.testing.assert_close(state.conv, full_state.conv, **TOL)
        state = m.allocate_state(2)
        assert state.conv.shape == (2, cfg.d_inner, cfg.d_conv - 1) and state.ssm.dtype == torch.float32
        steps = [m.step(h[:, i], state)[0] for i in range(40)]
        torch.testing.assert_close(torch.stack(steps, 1), full, **TOL)
        torch.testing.assert_close(state.ssm, full_state.ssm, **TOL)


def test_chunk_without_carried_state_differs():
    """The carried state matters: restarting each chunk from zero gives different outputs."""
    torch.manual_seed(3)
    m = RoMMixer(small(num_experts=2))
    h = torch.randn(1, 20, 16)
    with torch.no_grad():
        full = m(h)[0]
        restarted = torch.cat([m(h[:, :10])[0], m(h[:, 10:])[0]], 1)
    assert not torch.allclose(restarted, full, atol=1e-4)


# ---- routing --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_router_gets_gradient_from_the_output(k):
    torch.manual_seed(4)
    m = RoMMixer(small(num_experts=4, top_k=k))
    out, _, _ = m(torch.randn(2, 12, 16))
    out.pow(2).mean().backward()  # no aux loss: the gradient must come through the gates
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_routing_stats_add_up(k):
    torch.manual_seed(5)
    m = RoMMixer(small(num_experts=4, top_k=k))
    _, _, st = m(torch.randn(3, 11, 16))
    assert int(st.tokens_per_expert.sum()) == 3 * 11 * k
    assert st.top_experts.shape == (3, 11, k)
    assert torch.equal(torch.bincount(st.top_experts.flatten(), minlength=4), st.tokens_per_expert)
    assert torch.allclose(st.mean_prob.sum(), torch.tensor(1.0))
    assert torch.allclose(st.usage.sum(), torch.tensor(1.0))
    # a token's K experts are distinct
    assert (st.top_experts.sort(-1).values.diff(dim=-1) > 0).all()


def test_aux_losses():
    torch.manual_seed(6)
    m = RoMMixer(small(num_experts=4, top_k=1))
    with torch.no_grad():
        m.router.weight.zero_()  # uniform probabilities: balance loss is exactly 1, z-loss = log(E)^2
    _, _, st = m(torch.randn(2, 9, 16))
    torch.testing.assert_close(st.load_balance_loss(), torch.tensor(1.0))
    torch.testing.assert_close(st.z_loss(), torch.tensor(math.log(4) ** 2))
    # collapsed routing (all slots and all probability on one expert) -> E
    collapsed = RoutingStats(torch.tensor([10, 0, 0, 0]), 10, 1,
                             sums=(torch.tensor([10.0, 0, 0, 0]), torch.tensor(0.0)))
    torch.testing.assert_close(collapsed.load_balance_loss(), torch.tensor(4.0))
    with pytest.raises(ValueError, match="no routing-loss sums"):
        RoutingStats(torch.tensor([1]), 1, 1).load_balance_loss()
    merged = merge_routing_stats([st, collapsed])
    assert merged.n_tokens == 28 and merged.tokens_per_expert.tolist()[0] == int(st.tokens_per_expert[0]) + 10


def test_routing_sums_asked_for_under_no_grad_do_not_cut_the_routers_gradient():
    """A monitoring read of the loss sums under no_grad must leave the router's gradient through them intact."""
    torch.manual_seed(8)
    m = RoMMixer(small(num_experts=4, top_k=1))
    _, _, st = m(torch.randn(2, 9, 16))
    with torch.no_grad():
        assert torch.allclose(st.mean_prob.sum(), torch.tensor(1.0))
    loss = merge_routing_stats([st]).aux_loss(1e-2, 1e-3)
    assert loss.requires_grad
    loss.backward()
    assert m.router.weight.grad.abs().sum() > 0


def test_channel_first_out_projection_runs_under_cpu_autocast():
    from rmamba.mamba import _ProjectOutChannelFirst

    y = torch.randn(2, 6, 5, requires_grad=True)
    w = torch.randn(4, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _ProjectOutChannelFirst.apply(y, w)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert y.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, torch.ones(2 * 5, 4).t() @ y.detach().transpose(1, 2).reshape(10, 6),
                               atol=0.1, rtol=2e-2)


def test_expert_matmul_matches_per_row_reference():
    torch.manual_seed(7)
    w = torch.randn(5, 6, 4)
    counts = [3, 0, 2, 0, 4]  # empty experts included
    x = torch.randn(sum(counts), 4)
    expert = torch.repeat_interleave(torch.arange(5), torch.tensor(counts))
    ref = torch.stack([w[e] @ x[i] for i, e in enumerate(expert.tolist())])
    torch.testing.assert_close(expert_matmul(x, w, counts), ref, **TOL)
    assert expert_matmul(x[:0], w, [0] * 5).shape == (0, 6)


def test_expert_matmul_grouped_path_matches_loop():
    """The grouped-matmul path (torch._grouped_mm, bf16; on the CPU through torch's fallback) computes what the
    per-expert loop computes, values and gradients, with counts as a tensor and empty experts included."""
    torch.manual_seed(3)
    counts = torch.tensor([5, 0, 3, 8, 0, 1, 2, 0])
    w = torch.randn(8, 16, 32)
    x = torch.randn(int(counts.sum()), 32)
    g = torch.randn(int(counts.sum()), 16)
    outs, grads = [], []
    for grouped in (False, True):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = expert_matmul(xx, ww, counts, grouped=grouped)
        (out.float() * g).sum().backward()
        outs.append(out.float())
        grads.append((xx.grad, ww.grad))
    assert outs[1].shape == outs[0].shape == (19, 16)
    scale = outs[0].abs().max()
    assert (outs[1] - outs[0]).abs().max() <= 2e-2 * scale  # bf16 operands
    for a, b in zip(grads[1], grads[0]):
        assert (a.float() - b).abs().max() <= 2e-2 * b.abs().max()
    assert not rom_mod.grouped_mm_available(x, w)  # CPU tensors: the automatic choice is the exact loop


def _flops(cfg: RoMConfig, h: torch.Tensor) -> int:
    m = RoMMixer(cfg)
    with FlopCounterMode(display=False) as fc:
        m(h)
    return fc.get_total_flops()


def test_compute_grows_with_k_not_e():
    torch.manual_seed(8)
    h = torch.randn(2, 64, 32)
    base = dict(d_model=32, d_state=4, n_layers=1)
    f_e1 = _flops(RoMConfig(num_experts=1, top_k=1, **base), h)
    f_e8 = _flops(RoMConfig(num_experts=8, top_k=1, **base), h)
    f_e8k2 = _flops(RoMConfig(num_experts=8, top_k=2, **base), h)
    expert_k1 = 2 * 128 * (32 * 128 + 64 * 32)  # routed projection FLOPs of one expert per token, 128 tokens
    assert f_e1 >= expert_k1                                 # the counter sees the expert matmuls
    assert f_e8 / f_e1 < 1.5, f"E=8 costs {f_e8 / f_e1:.2f}x E=1 at K=1"
    assert f_e8k2 - f_e8 >= 0.9 * expert_k1, "a second expert per token must cost a second expert matmul"


# ---- errors name the argument ---------------------------------------------------------------------------------
def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"top_k.*num_experts \(2\).*got 3"):
        RoMConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match=r"top_k.*num_experts"):
        RoMConfig.from_dict({"num_experts": 4, "top_k": 5})
    with pytest.raises(TypeError, match=r"model\.d_model: expected int, got str"):
        RoMConfig.from_dict({"d_model": "64"})
    with pytest.raises(TypeError, match=r"model\.gate_on_all: expected bool"):
        RoMConfig.from_dict({"gate_on_all": 1})
    with pytest.raises(ValueError, match=r"model\.d_modell: unknown key; expected one of d_model"):
        RoMConfig.from_dict({"d_modell": 64})
    with pytest.raises(ValueError, match=r"model\.dt_rank"):
        RoMConfig(dt_rank="big")
    with pytest.raises(ValueError, match=r"model\.dt_min: expected <= dt_max"):
        RoMConfig(dt_min=0.5, dt_max=0.1)
    cfg = RoMConfig.from_dict({"d_model": 48, "num_experts": 0, "dt_max": 1})
    assert cfg.dense and cfg.dt_rank_value == 3 and cfg.d_inner == 96
    assert RoMConfig.from_dict(cfg.to_dict()) == cfg


def test_nan_into_the_kernel_names_the_argument():
    torch.manual_seed(9)
    m = RoMMixer(small(num_experts=2))
    h = torch.randn(1, 6, 16)
    h[0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^u: contains NaN"):
        m(h)
    u, dl = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    dl[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^delta: contains NaN"):
        kernels.selective_scan(u, dl, -torch.ones(4, 2), torch.randn(1, 2, 5), torch.randn(1, 2, 5))


def test_mixer_shape_errors_name_the_argument():
    m = MambaMixer(small(num_experts=0))
    with pytest.raises(ValueError, match=r"h: expected shape \(batch, L, d_model=16\), got \(2, 5, 8\)"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"state\.conv: expected shape \(2, 32, 3\), got \(1, 32, 3\)"):
        m(torch.randn(2, 5, 16), m.allocate_state(1))
    with pytest.raises(ValueError, match=r"h: expected shape \(batch, d_model=16\)"):
        m.step(torch.randn(2, 1, 16), m.allocate_state(2))
    with pytest.raises(ValueError, match=r"num_experts"):
        RoMMixer(small(num_experts=0))


# ---- parameter accounting -------------------------------------------------------------------------------------
def test_parameter_table_counts_every_parameter_and_k_of_e_experts():
    cfg = small(num_experts=8, top_k=2)
    model = RoMForecaster(cfg, {"pump": 3, "compressor": 5})
    rows = {r.component: r for r in parameter_table(model, cfg)}
    assert rows["total"].total == sum(p.numel() for p in model.parameters())
    experts = rows["routed experts (W_x, W_z, W_o)"]
    assert experts.total == cfg.n_layers * 8 * 3 * cfg.d_model * cfg.d_inner
    assert experts.active == experts.total * 2 // 8
    assert rows["input adapters"].active == (2 * 5 + 1) * cfg.d_model  # the largest type's adapter
    assert rows["router"].total == rows["router"].active == cfg.n_layers * cfg.d_model * 8
    # meta-device counting equals counting a real model
    assert [(r.component, r.total, r.active) for r in count_parameters(cfg, {"pump": 3, "compressor": 5})] == \
           [(r.component, r.total, r.active) for r in rows.values()]


def test_default_config_is_mostly_experts_and_dense_is_all_active():
    rows = {r.component: r for r in count_parameters(RoMConfig())}
    share = rows["routed experts (W_x, W_z, W_o)"].total / rows["total"].total
    assert 0.9 < share < 0.99  # ROM_SPEC: the routed projections hold ~95% of a layer's weights
    dense = count_parameters(RoMConfig(num_experts=0))
    assert all(r.total == r.active for r in dense)
    assert sum(p.numel() for p in Backbone(RoMConfig(num_experts=0)).parameters()) == dense[-1].total


@pytest.mark.parametrize("k", [1, 2, 3])
def test_slot_gather_and_combine_are_adjoint_gathers(k):
    """RoM's dispatch moves rows with two gathers (no scatter-add): check them against index_select/index_add and
    their gradients with fp64 gradcheck, for K = 1, 2, 3."""
    torch.manual_seed(k)
    cfg = RoMConfig(d_model=8, n_layers=1, num_experts=4, top_k=k)
    mixer = RoMMixer(cfg).double()
    h = torch.randn(13, 8, dtype=torch.float64)
    d = mixer.route(h)
    slots = h.index_select(0, d.token_of_slot)
    torch.testing.assert_close(rom_mod._GatherSlots.apply(h, d.token_of_slot, d.sorted_pos, k), slots)
    x = torch.randn(13 * k, 5, dtype=torch.float64)
    ref = x.new_zeros(13, 5).index_add_(0, d.token_of_slot, x)
    torch.testing.assert_close(rom_mod._CombineSlots.apply(x, d.token_of_slot, d.sorted_pos, k), ref)
    hh = h.clone().requires_grad_()
    xx = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: rom_mod._GatherSlots.apply(a, d.token_of_slot, d.sorted_pos, k), (hh,))
    assert torch.autograd.gradcheck(lambda a: rom_mod._CombineSlots.apply(a, d.token_of_slot, d.sorted_pos, k), (xx,))


def test_scan_finiteness_check_can_be_turned_off_and_the_model_keeps_it_on_the_cpu(monkeypatch):
    u, dl = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    dl[0, 0, 0] = float("nan")
    A, B, C = -torch.ones(4, 2), torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    y = kernels.selective_scan(u, dl, A, B, C, check_finite=False)     # no error; NaN flows through
    assert y.shape == (1, 4, 5) and torch.isnan(y).any()
    with pytest.raises(ValueError, match=r"^B: expected shape"):       # shapes are still checked
        kernels.selective_scan(u, dl, A, B[:, :, :4], C, check_finite=False)
    # the model asks for the check except on a GPU, where it would sync the device (CPU here: on)
    seen = []
    real = kernels.selective_scan
    monkeypatch.setattr(kernels, "selective_scan", lambda *a, **k: seen.append(k["check_finite"]) or real(*a, **k))
    MambaMixer(small(num_experts=0))(torch.randn(1, 6, 16))
    assert seen == [True]
    # the one-step update likewise
    x = torch.randn(1, 4)
    x[0, 1] = float("nan")
    state = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match=r"^x: contains NaN"):
        kernels.selective_state_update(state, x, torch.randn(1, 4), A, torch.randn(1, 2), torch.randn(1, 2))
    y = kernels.selective_state_update(state, x, torch.randn(1, 4), A, torch.randn(1, 2), torch.randn(1, 2),
                                       check_finite=False)
    assert torch.isnan(y[0, 1]) and torch.isfinite(y[0, 0])


def test_routing_counts_match_the_experts_chosen():
    """Slots per expert come from a scatter-add (no device sync); they equal a bincount of the choices, also for
    experts nobody chose and for K > 1."""
    torch.manual_seed(3)
    for k in (1, 2):
        m = RoMMixer(small(num_experts=6, top_k=k))
        d = m.route(torch.randn(5, 16))           # 5 tokens: at K = 1 some of the 6 experts get none
        assert torch.equal(d.counts, torch.bincount(d.top_experts.flatten(), minlength=6))
        assert torch.equal(d.token_of_slot, torch.argsort(d.top_experts.flatten(), stable=True) // k)
