"""Forecaster tests: streaming equivalence, masks, NLL attribution, input errors, and a two-type toy on CPU."""

from __future__ import annotations

import math
import time

import pytest
import torch

from rmamba import ForecasterState, RoMConfig, RoMForecaster, gaussian_nll

TOL = dict(atol=1e-5, rtol=1e-5)
TYPES = {"pump": 3, "compressor": 5}


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one intra-op thread is as fast and kinder to a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(**kw) -> RoMForecaster:
    base = dict(d_model=16, n_layers=2, d_state=4, num_experts=4, top_k=2)
    return RoMForecaster(RoMConfig(**{**base, **kw}), TYPES)


def with_gaps(b: int, L: int, n: int, seed: int, p_missing: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random values with ~p_missing missing entries, which hold NaN (as a log would)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, n, generator=g)
    mask = (torch.rand(b, L, n, generator=g) > p_missing).float()
    return torch.where(mask.bool(), x, torch.tensor(float("nan"))), mask


# ---- streaming ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_experts", [0, 4], ids=["dense", "rom-E4-K2"])
def test_chunked_and_step_equal_full(num_experts):
    torch.manual_seed(0)
    m = make(num_experts=num_experts, top_k=min(2, max(num_experts, 1)))
    x, mask = with_gaps(2, 37, 5, seed=1)
    with torch.no_grad():
        full, full_state = m(x, mask, "compressor")
        chunks, state, t = [], None, 0
        for s in (1, 2, 9, 5, 13, 7):
            out, state = m(x[:, t:t + s], mask[:, t:t + s], "compressor", state)
            chunks.append(out)
            t += s
        assert t == 37
        steps, st = [], None
        for i in range(37):
            out, st = m.step(x[:, i], mask[:, i], "compressor", st)
            steps.append(out)
    for name in ("mean", "scale", "nll"):
        ref = getattr(full, name)
        torch.testing.assert_close(torch.cat([getattr(o, name) for o in chunks], 1), ref, **TOL)
        torch.testing.assert_close(torch.cat([getattr(o, name) for o in steps], 1), ref, **TOL)
    assert torch.equal(torch.cat([o.scored for o in chunks], 1), full.scored)
    assert torch.equal(torch.cat([o.scored for o in steps], 1), full.scored)
    for a, b in zip(state.layers, full_state.layers):
        torch.testing.assert_close(a.ssm, b.ssm, **TOL)
    if num_experts:  # routing decisions are per token, so they agree too
        top = torch.cat([o.routing[0].top_experts for o in chunks], 1)
        assert torch.equal(top, full.routing[0].top_experts)


def test_state_is_documented_shape_and_restartable():
    m = make()
    st = m.allocate_state(3, "pump")
    assert isinstance(st, ForecasterState) and len(st.layers) == 2 and st.mean is None
    assert st.layers[0].conv.shape == (3, 32, 3) and st.layers[0].ssm.shape == (3, 32, 4)
    assert st.layers[0].ssm.dtype == torch.float32
    x, mask = with_gaps(3, 8, 3, seed=2)
    with torch.no_grad():
        a, _ = m(x, mask, "pump", st)
        b, _ = m(x, mask, "pump")
    torch.testing.assert_close(a.mean, b.mean, **TOL)  # zero state == no state


# ---- masks and the NLL ----------------------------------------------------------------------------------------
def test_missing_values_are_ignored_but_the_mask_is_seen():
    torch.manual_seed(3)
    m = make()
    x, mask = with_gaps(2, 12, 3, seed=3)
    garbage = torch.where(mask.bool(), x, torch.tensor(123.0))
    with torch.no_grad():
        a, _ = m(x, mask, "pump")
        b, _ = m(garbage, mask, "pump")
        c, _ = m(torch.nan_to_num(x), torch.ones_like(mask), "pump")  # same numbers, mask says "observed"
        d, _ = m(x, None, "pump")  # mask None: observed = finite
    torch.testing.assert_close(a.mean, b.mean, **TOL)
    torch.testing.assert_close(a.mean, d.mean, **TOL)
    assert not torch.allclose(a.mean, c.mean, atol=1e-4)


def test_nll_scores_observed_targets_against_the_previous_forecast():
    torch.manual_seed(4)
    m = make()
    x, mask = with_gaps(2, 10, 3, seed=4)
    out, _ = m(x, mask, "pump")
    assert out.nll.shape == out.mean.shape == out.scale.shape == out.scored.shape == (2, 10, 3)
    expected_scored = mask.bool().clone()
    expected_scored[:, 0] = False  # no forecast for the first step of a fresh sequence
    assert torch.equal(out.scored, expected_scored)
    assert (out.nll[~out.scored] == 0).all()
    ref = gaussian_nll(x[:, 1:], out.mean[:, :-1], out.scale[:, :-1])
    torch.testing.assert_close(out.nll[:, 1:][out.scored[:, 1:]], ref[out.scored[:, 1:]], **TOL)
    torch.testing.assert_close(out.forecast_loss(), ref[out.scored[:, 1:]].mean(), **TOL)
    torch.testing.assert_close(out.score, out.nll.sum(-1))
    assert (out.scale >= m.cfg.min_scale).all()
    # a large error in one sensor shows up in that sensor's attribution
    spiked = x.clone()
    spiked[0, 5, 1] = 50.0
    mask2 = mask.clone()
    mask2[0, 5] = 1.0
    spiked = torch.where(mask2.bool(), torch.nan_to_num(spiked), spiked)
    out2, _ = m(spiked, mask2, "pump")
    assert int(out2.nll[0, 5].argmax()) == 1
    out.loss().backward()
    assert m.heads["pump"].weight.grad.abs().sum() > 0 and m.heads["compressor"].weight.grad is None


def test_a_calls_aux_loss_is_the_pooled_loss_of_that_call_alone():
    """ForecastOutput.aux_loss is computed when asked, from the call's routing: the same number as the
    forecaster's pooled aux loss given that one call, and it carries gradient to the router."""
    m = make()
    out, _ = m(*with_gaps(2, 9, 3, seed=8), "pump")
    torch.testing.assert_close(out.aux_loss, m.aux_loss(out.routing))
    assert out.aux_loss > 0
    out.aux_loss.backward()
    assert m.backbone.layers[0].mixer.router.weight.grad.abs().sum() > 0


def test_dense_backbone_has_no_routing():
    m = make(num_experts=0)
    out, _ = m(*with_gaps(1, 6, 3, seed=5), "pump")
    assert out.routing == [] and float(out.aux_loss) == 0.0


# ---- errors name the argument ---------------------------------------------------------------------------------
def test_input_errors_name_the_argument():
    m = make()
    x, mask = with_gaps(2, 10, 3, seed=6)
    with pytest.raises(ValueError, match=r"equipment_type: unknown type 'turbine'; known types: compressor, pump"):
        m(x, mask, "turbine")
    with pytest.raises(ValueError, match=r"values: expected shape .*n_sensors=5 .*'compressor', got \(2, 10, 3\)"):
        m(x, mask, "compressor")
    with pytest.raises(ValueError, match=r"values: expected shape \(batch, L, n_sensors\)"):
        m(x[0], mask[0], "pump")
    with pytest.raises(ValueError, match=r"mask: expected the shape of values \(2, 10, 3\), got \(2, 10, 2\)"):
        m(x, mask[..., :2], "pump")
    with pytest.raises(ValueError, match=r"values: NaN or Inf where mask says observed"):
        m(x, torch.ones_like(mask), "pump")
    with pytest.raises(TypeError, match=r"values: expected a float tensor"):
        m(torch.ones(2, 10, 3, dtype=torch.long), None, "pump")
    _, st = m(x, mask, "pump")
    with pytest.raises(ValueError, match=r"state: carries equipment type 'pump', got a call for 'compressor'"):
        m(*with_gaps(2, 4, 5, seed=7), "compressor", st)
    with pytest.raises(ValueError, match=r"state: batch 2 does not match values' batch 1"):
        m(x[:1], mask[:1], "pump", st)
    with pytest.raises(ValueError, match=r"values: expected shape \(batch, n_sensors\)"):
        m.step(x, mask, "pump")
    with pytest.raises(ValueError, match=r"equipment_types\.pump: expected a sensor count >= 1, got 0"):
        RoMForecaster(RoMConfig(), {"pump": 0})


# ---- the toy: two equipment types, two signal families --------------------------------------------------------
def sines(g: torch.Generator, b: int, L: int, n: int = 3) -> torch.Tensor:
    """Pumps: sines of one random period (6..16 steps) per sequence, random phase per sensor, noise 0.05."""
    t = torch.arange(float(L))
    w = 2 * math.pi / (6 + 10 * torch.rand(b, 1, 1, generator=g))
    phase = 2 * math.pi * torch.rand(b, 1, n, generator=g)
    return torch.sin(w * t[None, :, None] + phase) + 0.05 * torch.randn(b, L, n, generator=g)


def sawtooth(g: torch.Generator, b: int, L: int, n: int = 5) -> torch.Tensor:
    """Compressors: sawtooth ramps in [-1, 1], random period (5..15 steps) and phase per sensor, noise 0.05."""
    t = torch.arange(float(L))
    period = 5 + 10 * torch.rand(b, 1, n, generator=g)
    phase = torch.rand(b, 1, n, generator=g)
    return 2 * ((t[None, :, None] / period + phase) % 1.0) - 1 + 0.05 * torch.randn(b, L, n, generator=g)


@pytest.mark.slow
def test_toy_two_equipment_types_learn_and_route_apart():
    """Bounds: held-out NLL (nats per observed value) < 0.0 on average and < 0.4 per type (a Gaussian fitted to
    the marginal scores ~1.07 on the sines and ~0.87 on the sawtooth; the untrained model ~1.5); expert usage of
    the two types differs by total variation > 0.3 (mean over layers); training takes < 60 s of CPU time
    (process time, one thread: wall time on a shared machine measures the neighbours)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    gens = {"pump": sines, "compressor": sawtooth}
    m = RoMForecaster(RoMConfig(d_model=32, n_layers=2, d_state=8, num_experts=4, top_k=1), TYPES)
    steps, lr = 200, 5e-3
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        outs = []
        for name, fn in gens.items():
            x = fn(g, 16, 64)
            mask = (torch.rand(x.shape, generator=g) > 0.05).float()
            outs.append(m(x, mask, name)[0])
        # one balance loss over both types' tokens, so experts may specialise by type
        loss = sum(o.forecast_loss() for o in outs) / 2 + m.aux_loss(*[o.routing for o in outs])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0

    held_out, usage = {}, {}
    with torch.no_grad():
        for name, fn in gens.items():
            out, _ = m(fn(g, 32, 64), None, name)
            held_out[name] = out.forecast_loss().item()
            usage[name] = [s.usage for s in out.routing]
    tv = sum(0.5 * (a - b).abs().sum().item() for a, b in zip(usage["pump"], usage["compressor"])) / 2
    print(f"toy: held-out NLL {held_out}, routing TV {tv:.3f}, {cpu:.1f} s CPU, {elapsed:.1f} s wall")
    assert sum(held_out.values()) / 2 < 0.0, held_out
    assert max(held_out.values()) < 0.4, held_out
    assert tv > 0.3, (tv, usage)
    assert cpu < 60, f"toy training took {cpu:.0f} s of CPU time"
