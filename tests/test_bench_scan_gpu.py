"""The GPU benchmark's host-side helpers (benchmarks/scan_gpu.py), run on the CPU: loading mamba-ssm's
selective_scan_fn from an sdist tree, the compiled-kernel register report, and the table of the autograd anchor."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import scan_gpu  # noqa: E402

INTERFACE = '''
import torch
from mamba_ssm.utils.torch import custom_fwd
from einops import rearrange
from mamba_ssm.ops.triton.layer_norm import _layer_norm_fwd
import selective_scan_cuda


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    if B.dim() == 3:
        B = rearrange(B, "b dstate l -> b 1 dstate l")
    return selective_scan_cuda.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)[-1]
'''


@pytest.fixture
def sdist_tree(tmp_path, monkeypatch):
    """A stand-in for the extracted sdist with the three files load_scan_fn reads; sys.modules restored after."""
    (tmp_path / "mamba_ssm/utils").mkdir(parents=True)
    (tmp_path / "mamba_ssm/ops").mkdir(parents=True)
    (tmp_path / "mamba_ssm/utils/torch.py").write_text("def custom_fwd(f):\n    return f\n")
    (tmp_path / "mamba_ssm/ops/selective_scan_interface.py").write_text(INTERFACE)
    prefixes = ("mamba_ssm", "einops", "selective_scan_cuda")
    for name in list(sys.modules):
        if name.startswith(prefixes):
            monkeypatch.delitem(sys.modules, name)      # put back after the test
    yield tmp_path
    for name in list(sys.modules):
        if name.startswith(prefixes):
            del sys.modules[name]                       # what the loader registered (monkeypatch restores the rest)


@pytest.mark.parametrize("has_einops", [True, False])
def test_load_scan_fn_uses_the_built_extension(sdist_tree, has_einops):
    if has_einops:                            # an installed einops is used as it is
        ein = types.ModuleType("einops")
        ein.rearrange = lambda t, pattern: t[:, None]
        sys.modules["einops"] = ein
    else:
        sys.modules["einops"] = None          # import fails: the one-pattern stand-in is used
    seen = []
    ext = types.ModuleType("selective_scan_cuda")

    def fwd(u, delta, A, B, C, D, z, bias, softplus):
        seen.append(tuple(B.shape))
        return u, None, 2 * u

    ext.fwd = fwd
    fn = scan_gpu.load_scan_fn(sdist_tree, ext)
    u = torch.randn(2, 3, 5)
    out = fn(u, u, torch.randn(3, 4), torch.randn(2, 4, 5), torch.randn(2, 4, 5), None, u, None, True)
    assert torch.equal(out, 2 * u) and seen == [(2, 1, 4, 5)]
    assert (sys.modules["einops"].rearrange.__name__ == "<lambda>") == has_einops


def test_compiled_registers_reads_triton_caches():
    src = types.SimpleNamespace(constants={(1,): 64, (2,): True, "LOCAL": False})
    compiled = types.SimpleNamespace(n_regs=255, n_spills=12, src=src)
    kern = types.SimpleNamespace(fn=types.SimpleNamespace(__name__="_bwd_kernel"), arg_names=["x", "CK", "CHAIN_IN"],
                                 device_caches={0: ({"key": compiled}, {}, None, None, None)})
    empty = types.SimpleNamespace(fn=types.SimpleNamespace(__name__="other"), arg_names=[], device_caches={})
    ts = types.SimpleNamespace(_fwd_kernel=empty, _fwd_split_kernel=empty, _bwd_kernel=kern, _chain_kernel=empty)
    assert scan_gpu.compiled_registers(ts) == [
        "_bwd_kernel regs 255 spills 12 {'CK': 64, 'CHAIN_IN': True, 'LOCAL': False}"]


def test_render_shows_the_autograd_anchor_table():
    t = {"median_ms": 2.0, "min_ms": 1.9, "max_ms": 2.2}
    row = {"batch": 8, "d_inner": 1536, "L": 2048, "dtype": "bfloat16", "triton_fwd": t, "mamba_fwd": t,
           "speedup_fwd": 1.0, "mamba_fn_fwd": {**t, "median_ms": 3.0}, "speedup_fwd_fn": 1.5,
           "triton_fwdbwd": t, "mamba_fn_fwdbwd": {**t, "median_ms": 4.0}, "speedup_fwdbwd_fn": 2.0}
    text = scan_gpu.render({"configs": [row]})
    assert "selective_scan_fn" in text
    line = [ln for ln in text.splitlines() if ln.startswith("| 8, 1536, 2048") and "3.000" in ln]
    assert len(line) == 1 and "1.50x" in line[0] and "2.00x" in line[0]


def test_importing_the_benchmark_keeps_input_checks_on():
    """Only the benchmark processes skip the kernels' input validation (scan_gpu.main), never an importer."""
    assert os.environ.get("RMAMBA_SKIP_INPUT_CHECKS") != "1"
