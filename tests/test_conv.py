"""The mixer's fused causal conv1d + SiLU (kernels.conv): the Triton kernels, run by Triton's interpreter on the
CPU (TRITON_INTERPRET=1, set before they are imported), against the torch path, values and gradients."""

from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from conftest import interpreted_kernels  # noqa: E402

from kernels.conv import causal_conv1d_silu, causal_conv1d_silu_torch, conv_window  # noqa: E402

interpreted = interpreted_kernels("kernels.triton_conv", "_conv_fwd_kernel")


def inputs(b, c, L, w, dtype, bias, init, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:   # a channel-first view with time contiguous and other strides, as the dense mixer hands it over
        x = torch.randn(2 * c, b, L, generator=g).to(dtype).transpose(0, 1)[:, :c]
    else:
        x = torch.randn(b, c, L, generator=g).to(dtype)
    weight = torch.randn(c, w, generator=g) * 0.5
    bi = torch.randn(c, generator=g) if bias else None
    ini = torch.randn(b, c, w - 1, generator=g).to(dtype) if init else None
    return x, weight, bi, ini


# L: shorter than the window; longer than one forward (256-step) tile; longer than one backward (512-step) tile
@pytest.mark.parametrize("L", [1, 2, 5, 300, 700])
@pytest.mark.parametrize("bias,init", [(True, False), (False, True), (True, True), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_conv_matches_torch_values_and_gradients(L, bias, init, dtype):
    """Against the torch path in fp32 on the same values (the kernels compute in fp32 for any input dtype): equal
    up to fp32 rounding, and for bf16 up to the rounding of the bf16 outputs (y, dx). 10 channels: a partial channel
    tile in both passes; L = 700: the weight / bias gradients summed over several backward time tiles."""
    x, w, b, ini = inputs(2, 10, L, 4, dtype, bias, init, seed=L, strided=L == 300)
    leaves = [t.clone().requires_grad_() if t is not None and i < 3 else t for i, t in enumerate((x, w, b, ini))]
    ref_leaves = [None if t is None else t.float().clone().requires_grad_(i < 3)
                  for i, t in enumerate((x, w, b, ini))]
    y = causal_conv1d_silu(*leaves, backend="triton")
    y_ref = causal_conv1d_silu_torch(*ref_leaves)
    assert y.shape == (2, 10, L) and y.dtype == dtype and y.is_contiguous()
    out_tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(y.float(), y_ref, **out_tol)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    y.backward(dy)
    y_ref.backward(dy.float())
    for name, a, r in zip(("x", "weight", "bias"), leaves, ref_leaves):
        if a is None:
            continue
        assert a.grad.dtype == a.dtype, name
        tol = out_tol if name == "x" else dict(atol=1e-4, rtol=1e-4)     # weight, bias: fp32 sums
        torch.testing.assert_close(a.grad.float(), r.grad, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_the_carried_windows_gradient_comes_from_the_torch_path():
    x, w, b, ini = inputs(2, 6, 9, 4, torch.float32, True, True, seed=3)
    args = [t.clone().requires_grad_() for t in (x, w, b, ini)]
    ref = [t.clone().requires_grad_() for t in (x, w, b, ini)]
    causal_conv1d_silu(*args, backend="triton").sum().backward()
    causal_conv1d_silu_torch(*ref).sum().backward()
    for a, r in zip(args, ref):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-5, rtol=1e-5)


def test_chunks_with_the_carried_window_equal_one_piece():
    x, w, b, _ = inputs(1, 5, 40, 4, torch.float32, True, False, seed=4)
    whole = causal_conv1d_silu(x, w, b, backend="triton")
    parts, window = [], None
    for s, e in ((0, 2), (2, 3), (3, 17), (17, 40)):           # chunks shorter than the window included
        parts.append(causal_conv1d_silu(x[:, :, s:e], w, b, window, backend="triton"))
        window = conv_window(x[:, :, s:e], window, 3)
    torch.testing.assert_close(torch.cat(parts, -1), whole, atol=1e-6, rtol=1e-6)
    assert window.is_contiguous() and torch.equal(window, x[:, :, -3:])


def test_conv_errors_name_the_argument():
    x, w, b, ini = inputs(2, 4, 6, 4, torch.float32, True, True, seed=5)
    with pytest.raises(ValueError, match=r"weight: expected shape \(4, W\)"):
        causal_conv1d_silu(x, w[:3], b)
    with pytest.raises(ValueError, match=r"initial: expected shape \(2, 4, 3\)"):
        causal_conv1d_silu(x, w, b, ini[:, :, :2])
    with pytest.raises(ValueError, match="backend: expected one of"):
        causal_conv1d_silu(x, w, b, backend="cuda")
