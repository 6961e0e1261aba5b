import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The test machines have no GPU: Triton kernels run through Triton's interpreter. Set before anything imports
# triton, so every module that loads kernels.triton_scan sees interpreted kernels (mixing modes in one
# process breaks @triton.jit helpers).
os.environ["TRITON_INTERPRET"] = "1"
