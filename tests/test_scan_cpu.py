"""The chunked CPU scan against the sequential reference: values, gradients, state carry, streaming, errors."""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
import kernels.cpu as kcpu
from kernels import resolve_backend, selective_scan, selective_state_update
from kernels.cpu import selective_scan_cpu
from kernels.reference import selective_scan_reference

FAST = settings(max_examples=40, deadline=None, derandomize=True)


def make_inputs(seed: int, b: int, d: int, n: int, L: int, dtype=torch.float32, *, D: bool = True, z: bool = True,
                bias: bool = True, softplus: bool = True, h0: bool = True, dt_max: float = 1.0, a_min: float = -4.0):
    """Random scan arguments (kwargs of selective_scan); delta > 0 when no softplus, A in [a_min, -0.05]."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    delta = r(b, d, L) if softplus else torch.rand(b, d, L, generator=g, dtype=torch.float64) * dt_max
    A = -0.05 + torch.rand(d, n, generator=g, dtype=torch.float64) * (a_min + 0.05)
    args = dict(u=r(b, d, L), delta=delta, A=A, B=r(b, n, L), C=r(b, n, L), D=r(d) if D else None,
                z=r(b, d, L) if z else None, delta_bias=0.5 * r(d) if bias else None, delta_softplus=softplus,
                initial_state=r(b, d, n) if h0 else None)
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@contextmanager
def chunking(chunk: int | None, block_elements: int | None):
    """Run the cpu backend with a given chunk size / block budget (None keeps the default)."""
    with mock.patch.object(kcpu, "CHUNK_SIZE", chunk or kcpu.CHUNK_SIZE), \
            mock.patch.object(kcpu, "BLOCK_ELEMENTS", block_elements or kcpu.BLOCK_ELEMENTS):
        yield


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """Elementwise |a - e| <= rel * (|e| + max|e|): relative to the tensor's scale (y has zero crossings)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual.double() - expected.double()).abs()
    bound = rel * (expected.double().abs() + scale.double())
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.3g}x the tolerance (max abs err {err.max().item():.3g})"


shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5),
                   st.one_of(st.just(1), st.integers(2, 9), st.integers(10, 130)))
plans = st.sampled_from([(None, None), (1, None), (3, None), (4, 64), (5, 300), (7, 1000), (8, 1)])
flags = st.fixed_dictionaries({k: st.booleans() for k in ("D", "z", "bias", "softplus", "h0")})


@FAST
@given(shape=shapes, plan=plans, flag=flags, seed=st.integers(0, 2**16), dtype=st.sampled_from(["fp32", "fp64"]),
       grad=st.booleans())
def test_cpu_matches_reference(shape, plan, flag, seed, dtype, grad):
    """Both forward paths: the autograd one (an input requires grad) and the inference one (none does)."""
    b, d, n, L = shape
    dt = torch.float64 if dtype == "fp64" else torch.float32
    args = make_inputs(seed, b, d, n, L, dt, **flag)
    y_ref, s_ref = selective_scan_reference(**args, return_final_state=True)
    if grad:
        args["u"] = args["u"].clone().requires_grad_()
    with chunking(*plan):
        y, s = selective_scan_cpu(**args, return_final_state=True)
    assert y.requires_grad == grad
    y = y.detach()
    rel = 1e-11 if dt == torch.float64 else 1e-5
    assert s.dtype == dt
    assert_rel_close(y, y_ref, rel, "y")
    assert_rel_close(s, s_ref, rel, "final state")


def test_inference_buffers_are_reused_safely():
    """The inference path keeps scratch buffers between calls: a second call of the same shape must not see the
    first call's data or overwrite its output, and threads must not share them."""
    first, second = (make_inputs(seed, 2, 5, 3, 77) for seed in (1, 2))
    with torch.no_grad():
        y1 = selective_scan_cpu(**first)
        kept = y1.clone()
        y2 = selective_scan_cpu(**second)
    assert torch.equal(y1, kept)
    assert_rel_close(y1, selective_scan_reference(**first), 1e-5, "first call")
    assert_rel_close(y2, selective_scan_reference(**second), 1e-5, "second call")

    import threading
    results: dict[int, torch.Tensor] = {}
    inputs = [make_inputs(seed, 1, 64, 16, 4096) for seed in range(4)]

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = selective_scan_cpu(**inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert_rel_close(results[i], selective_scan_cpu(**inputs[i]), 1e-6, f"thread {i}")
        assert torch.allclose(results[i], selective_scan_reference(**inputs[i]), rtol=1e-4, atol=1e-4)


def test_plan_covers_awkward_lengths():
    """The plans used above really produce several blocks of several chunks, and a ragged last chunk."""
    with chunking(4, 64):
        assert kcpu.plan(1, 2, 2, 30) == (4, 4)  # 30 steps: 2 blocks of 16, the last 14 (ragged chunk)
    with chunking(None, None):
        T, G = kcpu.plan(1, 128, 16, 16384)  # the benchmark shape: chunks side by side, step ops single-threaded
        assert 1 < T and 1 < G and 2 * G * 128 * 16 < 32768 and T * G * 128 * 16 <= kcpu.BLOCK_ELEMENTS
        T, G = kcpu.plan(8, 512, 16, 4096)  # a wide shape: one shortened chunk per block
        assert G == 1 and 1 <= T * 8 * 512 * 16 <= max(kcpu.BLOCK_ELEMENTS, 8 * 512 * 16)


def test_long_sequence_16k():
    args = make_inputs(0, 1, 3, 4, 16384, torch.float32, dt_max=0.2)
    y_ref, s_ref = selective_scan_reference(**args, return_final_state=True)
    y, s = selective_scan_cpu(**args, return_final_state=True)
    assert_rel_close(y, y_ref, 1e-5, "y")
    assert_rel_close(s, s_ref, 1e-5, "final state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("softplus", [False, True])
def test_large_decays_stay_finite(dtype, softplus):
    """delta up to 50 and A down to -100 (|delta A| up to 5000): no NaN/Inf, values and grads as the reference."""
    args = make_inputs(1, 2, 4, 8, 300, dtype, softplus=softplus, dt_max=50.0, a_min=-100.0)
    if softplus:
        args["delta"] = args["delta"] * 25.0  # pre-activations up to ~100
    args["initial_state"] = args["initial_state"] * 1e3
    leaves = {k: v.requires_grad_() for k, v in args.items() if isinstance(v, torch.Tensor)}
    results = []
    for fn, chunk in ((selective_scan_reference, None), (selective_scan_cpu, None), (selective_scan_cpu, 3)):
        with chunking(chunk, 256):
            y, s = fn(**args, return_final_state=True)
        (y.sum() + s.sum()).backward()
        results.append((y.detach(), s.detach(), {k: v.grad for k, v in leaves.items()}))
        for v in leaves.values():
            v.grad = None
    y_ref, s_ref, g_ref = results[0]
    rel = 1e-11 if dtype == torch.float64 else 1e-5
    for y, s, grads in results:
        assert torch.isfinite(y).all() and torch.isfinite(s).all()
        assert all(torch.isfinite(gr).all() for gr in grads.values())
        assert_rel_close(y, y_ref, rel, "y")
        assert_rel_close(s, s_ref, rel, "state")
        for k, gr in grads.items():
            assert_rel_close(gr, g_ref[k], 10 * rel, k)


@pytest.mark.parametrize("plan", [(None, None), (2, 24), (3, 1)])
def test_gradcheck_fp64(plan):
    args = make_inputs(2, 2, 3, 2, 11, torch.float64)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    inputs = tuple(args[k].requires_grad_() for k in names)

    def fn(*ts):
        kw = dict(args, **dict(zip(names, ts)))
        return selective_scan_cpu(**kw, return_final_state=True)

    with chunking(*plan):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(shape=shapes, plan=plans, flag=flags, seed=st.integers(0, 2**16))
def test_grads_match_reference_fp32(shape, plan, flag, seed):
    b, d, n, L = shape
    args = make_inputs(seed, b, d, n, L, torch.float32, **flag)
    w = torch.randn(b, d, L, generator=torch.Generator().manual_seed(seed))
    grads = []
    for cpu in (True, False):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items() if isinstance(v, torch.Tensor)}
        kw = dict(args, **leaves)
        with chunking(*plan):
            fn = selective_scan_cpu if cpu else selective_scan_reference
            y, s = fn(**kw, return_final_state=True)
        ((y * w).sum() + s.square().sum()).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for k in grads[0]:
        assert_rel_close(grads[0][k], grads[1][k], 1e-5, k)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("k", [1, 17, 40, 69])
def test_split_scan_carries_state(backend, k):
    args = make_inputs(3, 2, 4, 3, 70, torch.float64)
    y_full, s_full = selective_scan(**args, return_final_state=True, backend=backend)
    head = {key: (v[..., :k] if isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[-1] == 70 else v)
            for key, v in args.items()}
    tail = {key: (v[..., k:] if isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[-1] == 70 else v)
            for key, v in args.items()}
    with chunking(4, 96):
        y1, s1 = selective_scan(**head, return_final_state=True, backend=backend)
        y2, s2 = selective_scan(**dict(tail, initial_state=s1), return_final_state=True, backend=backend)
    assert_rel_close(torch.cat([y1, y2], dim=-1), y_full, 1e-12, "y")
    assert_rel_close(s2, s_full, 1e-12, "state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_updates_equal_scan(dtype):
    args = make_inputs(4, 2, 5, 4, 37, dtype)
    y_full, s_full = selective_scan(**args, return_final_state=True, backend="cpu")
    state = args["initial_state"].clone()
    ys = [selective_state_update(state, args["u"][..., t], args["delta"][..., t], args["A"], args["B"][..., t],
                                 args["C"][..., t], D=args["D"], z=args["z"][..., t], dt_bias=args["delta_bias"],
                                 dt_softplus=True) for t in range(37)]
    rel = 1e-11 if dtype == torch.float64 else 1e-5
    assert_rel_close(torch.stack(ys, dim=-1), y_full, rel, "y")
    assert_rel_close(state, s_full, rel, "state")


def test_bf16_inputs():
    args = make_inputs(5, 2, 4, 3, 50, torch.bfloat16)
    y, s = selective_scan(**args, return_final_state=True, backend="cpu")
    y_ref, s_ref = selective_scan_reference(**args, return_final_state=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_rel_close(y.float(), y_ref.float(), 1e-2, "y")
    assert_rel_close(s, s_ref, 1e-5, "state")


def _bad(name: str, value):
    args = make_inputs(6, 2, 3, 4, 10)
    args[name] = value
    return args


good = make_inputs(6, 2, 3, 4, 10)
BAD_INPUTS = [
    ("u", good["u"][0], ValueError),
    ("u", good["u"][..., :0], ValueError),
    ("delta", good["delta"][..., :9], ValueError),
    ("A", good["A"][:2], ValueError),
    ("A", good["A"][0], ValueError),
    ("B", good["B"][:, :3], ValueError),
    ("C", good["C"][..., 1:], ValueError),
    ("D", good["D"][:2], ValueError),
    ("z", good["z"][:1], ValueError),
    ("delta_bias", good["delta_bias"][None], ValueError),
    ("initial_state", good["initial_state"][..., :3], ValueError),
    ("u", good["u"].to(torch.int32), TypeError),
    ("A", good["A"].to(torch.int64), TypeError),
    ("delta", good["delta"].to(torch.int16), TypeError),
    ("B", good["B"].numpy(), TypeError),
    ("u", good["u"].index_put((torch.tensor([1]), torch.tensor([2]), torch.tensor([3])), torch.tensor(float("nan"))),
     ValueError),
    ("delta", torch.full_like(good["delta"], float("nan")), ValueError),
    ("C", torch.full_like(good["C"], float("inf")), ValueError),
    ("B", good["B"].index_fill(2, torch.tensor([9]), float("-inf")), ValueError),
    ("z", good["z"].index_fill(1, torch.tensor([1]), float("nan")), ValueError),
    ("initial_state", good["initial_state"].index_fill(0, torch.tensor([0]), float("nan")), ValueError),
    ("D", good["D"].index_fill(0, torch.tensor([2]), float("inf")), ValueError),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(("name", "value", "error"), BAD_INPUTS)
def test_bad_inputs_name_the_argument(backend, name, value, error):
    with pytest.raises(error, match=rf"^{name}:"):
        selective_scan(**_bad(name, value), backend=backend)


def test_unknown_backend(monkeypatch):
    args = make_inputs(7, 1, 2, 2, 5)
    with pytest.raises(ValueError, match="backend.*'cuda_magic'"):
        selective_scan(**args, backend="cuda_magic")
    monkeypatch.setenv("RMAMBA_SCAN_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend.*'nope'"):
        selective_scan(**args)


def test_backend_selection(monkeypatch):
    calls = []

    def spy(name, fn):
        def wrapped(*a, **kw):
            calls.append(name)
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(kcpu, "selective_scan_cpu", spy("cpu", selective_scan_cpu))
    monkeypatch.setattr(kernels, "selective_scan_reference", spy("reference", selective_scan_reference))
    monkeypatch.delenv("RMAMBA_SCAN_BACKEND", raising=False)
    args = make_inputs(8, 1, 2, 2, 5)
    selective_scan(**args)
    selective_scan(**args, backend="reference")
    selective_scan(**args, backend="cpu")
    monkeypatch.setenv("RMAMBA_SCAN_BACKEND", "reference")
    selective_scan(**args)
    selective_scan(**args, backend="cpu")  # the argument wins over the variable
    assert calls == ["cpu", "reference", "cpu", "reference", "cpu"]
    monkeypatch.delenv("RMAMBA_SCAN_BACKEND")
    assert resolve_backend(None, torch.device("cpu")) == "cpu"


def test_cpu_backend_is_chunked():
    """The cpu backend is its own chunked autograd.Function, not the reference loop in disguise."""
    assert selective_scan_cpu is not selective_scan_reference
    args = make_inputs(9, 1, 2, 2, 6)
    args["u"].requires_grad_()
    nodes, todo = set(), [selective_scan_cpu(**args).grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            todo.extend(nxt for nxt, _ in node.next_functions)
    assert any("ChunkedScan" in type(node).__name__ for node in nodes)
