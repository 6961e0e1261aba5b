import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The test machines have no GPU: Triton kernels run through Triton's interpreter. Set before anything imports
# triton, so every module that loads kernels.triton_scan sees interpreted kernels (mixing modes in one
# process breaks @triton.jit helpers).
os.environ["TRITON_INTERPRET"] = "1"


def load_interpreted(module: str, kernel: str):
    """Import ``module`` (a kernels.triton_* module) with its kernels interpreted, re-importing it if an earlier test
    loaded it compiled, and check that its ``kernel`` is an interpreted function."""
    import importlib
    import sys

    mod = sys.modules.get(module)
    if mod is not None:
        importlib.reload(mod)
    mod = importlib.import_module(module)
    assert type(getattr(mod, kernel)).__name__ == "InterpretedFunction", f"{module}.{kernel} must be interpreted here"
    return mod


def interpreted_kernels(module: str, kernel: str):
    """A module-scoped autouse fixture for a test module of a kernels.triton_* module: its kernels interpreted (see
    load_interpreted). Assign it to a module-level name; the module sets TRITON_INTERPRET=1 before its imports."""

    @pytest.fixture(scope="module", autouse=True)
    def interpreted():
        return load_interpreted(module, kernel)

    return interpreted
