"""Backend selection: environment variable, context manager, explicit failures, auto fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

import normkit
from normkit import backends
from normkit.reference import ReferenceBackend


class CountingBackend(ReferenceBackend):
    """The reference math, counting which entry points ran."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattribute__(self, name):
        if name in backends.OPS:
            object.__getattribute__(self, "calls").append(name)
        return object.__getattribute__(self, name)


@pytest.fixture
def isolated_registry(monkeypatch):
    """Backends registered in a test vanish after it."""
    monkeypatch.setattr(backends, "_FACTORIES", dict(backends._FACTORIES))
    monkeypatch.setattr(backends, "_INSTANCES", {})
    monkeypatch.setattr(backends, "_WARNED", set())
    return backends


def test_environment_variable_and_context_manager(monkeypatch):
    monkeypatch.setenv("NORMKIT_BACKEND", "reference")
    assert backends.current() == "reference"
    with normkit.backend("cpu"):
        assert backends.current() == "cpu"
        with normkit.backend("auto"):
            assert backends.current() == "auto"
        assert backends.current() == "cpu"
    assert backends.current() == "reference"
    monkeypatch.setenv("NORMKIT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.current()
    with pytest.raises(ValueError, match="backend must be one of"):
        normkit.backend("fast").__enter__()


def test_selected_backend_computes_every_entry_point(isolated_registry):
    spy = CountingBackend()
    isolated_registry.register_backend("cpu", lambda: spy)
    x = (3 + torch.randn(4, 6, 5)).requires_grad_()
    with normkit.backend("cpu"):
        normkit.BatchNorm1d(6)(x).sum().backward()
        normkit.GroupNorm(2, 6)(x).sum().backward()
        normkit.LayerNorm(5)(x).sum().backward()
        normkit.LayerNorm2d(6)(x.unsqueeze(-1)).sum().backward()
        normkit.InPlaceABN(6)(x * 1.0).sum().backward()
    assert set(spy.calls) == set(backends.OPS)


def test_explicit_backend_that_cannot_run_raises(isolated_registry):
    def missing():
        raise ImportError("No module named 'numba'")

    isolated_registry.register_backend("cpu", missing)
    with normkit.backend("cpu"), pytest.raises(normkit.BackendUnavailableError, match="numba"):
        normkit.LayerNorm(4)(torch.randn(2, 4))


def test_explicit_backend_refusing_the_tensor_raises(isolated_registry):
    class CudaOnly(ReferenceBackend):
        def unsupported(self, op, x):
            return None if x.is_cuda else "only CUDA tensors"

    isolated_registry.register_backend("triton", CudaOnly)
    with normkit.backend("triton"), pytest.raises(normkit.BackendUnavailableError, match="only CUDA tensors"):
        normkit.BatchNorm1d(4)(torch.randn(3, 4))


def test_auto_falls_back_and_warns_once(isolated_registry):
    def broken():
        raise RuntimeError("kernels failed to build")

    isolated_registry.register_backend("cpu", broken)
    x = torch.randn(64, 1024)  # above normkit.route.ATEN_BELOW: auto asks the kernel backend first
    with normkit.backend("auto"):
        with pytest.warns(RuntimeWarning, match="kernels failed to build"):
            y = normkit.BatchNorm1d(1024)(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            normkit.BatchNorm1d(1024)(x)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_available_lists_every_backend():
    state = backends.available()
    assert set(state) == {"reference", "cpu", "triton"}
    assert state["reference"] == "available"


FORK_SCRIPT = """
import os, warnings, torch, normkit
x = torch.randn(8, 16, 16, 17)                 # above normkit.route.ATEN_BELOW: the kernel path
normkit.BatchNorm2d(16)(x)                     # starts the kernel thread pool in the parent
pid = os.fork()
if pid == 0:
    # as DataLoader workers do: torch's own OpenMP pool hangs a forked child's first parallel region
    # (torch.nn.BatchNorm2d too, torch 2.13) unless the child runs on one thread
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = normkit.BatchNorm2d(16)(x)          # auto: must not kill the child
    os._exit(0 if y.shape == x.shape else 3)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
"""


def test_forked_child_survives_after_parent_used_the_kernels():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "child exit 0" in out.stdout, out.stdout + out.stderr[-2000:]
