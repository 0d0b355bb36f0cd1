"""The set-up the Triton test modules share: without CUDA, the kernels run on CPU tensors under the interpreter.

``triton.jit`` decides at import time whether it builds interpreter objects, so a module imports triton and the
kernels with ``TRITON_INTERPRET=1`` (:func:`import_for_interpreter`) and then puts the environment back as it was;
a module fixture sets the variable again only while that module's tests run (the backend checks it per call), so
other test files never see it. If another test module imported triton first, built for the GPU, a module's tests
cannot run in this process: they are skipped here (:func:`skip_when_fresh`) and run, all of them, in a fresh child
process by the test :func:`fresh_process_test` makes (which fails if any of them fails). With CUDA the same tests
run on the GPU.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
FRESH_REASON = ("triton was imported for the GPU before this module: these tests run in a fresh process "
                "(test_interpreter_suite_in_fresh_process)")


def set_interpret(value: str | None) -> str | None:
    """Set (or, for None, remove) TRITON_INTERPRET; returns the previous value."""
    old = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    return old


def _built_for_gpu(triton_module) -> bool:
    """Whether triton.language's own @jit functions (tl.sum, tl.zeros …) were built for the GPU."""
    standard = vars(triton_module.language.standard).values()
    return any(isinstance(f, triton_module.runtime.jit.JITFunction) for f in standard)


def import_for_interpreter(*modules: str) -> bool:
    """Import triton (skipping the calling module without it) and, without CUDA, ``modules`` for the interpreter.

    Returns whether the calling module's tests must run in a fresh process (triton was already built for the GPU).
    """
    if CUDA:
        pytest.importorskip("triton")
        return False
    before = set_interpret("1")
    try:
        triton = pytest.importorskip("triton")
        if _built_for_gpu(triton):
            return True
        for name in modules:
            importlib.import_module(name)
        return False
    finally:
        set_interpret(before)


def skip_when_fresh(fresh: bool):
    """The mark of the tests that run here only when this process can interpret the kernels."""
    return pytest.mark.skipif(fresh, reason=FRESH_REASON)


def interpreter_fixture(fresh: bool, register):
    """A module-scoped autouse fixture: TRITON_INTERPRET=1 while the module's tests run (without CUDA), with
    ``register()`` called once the kernel package is known to be built for the interpreter."""

    @pytest.fixture(scope="module", autouse=True, name="_interpreter")
    def _interpreter():
        if fresh:
            yield
            return
        env = pytest.MonkeyPatch()
        if not CUDA:
            env.setenv("TRITON_INTERPRET", "1")
            kernels = importlib.import_module("normkit.kernels.triton")
            if not kernels.INTERPRETED:  # pragma: no cover - guarded by the fresh process
                pytest.fail("kernels were built for the GPU")
            register()
        yield
        env.undo()

    return _interpreter


def fresh_process_test(fresh: bool, path: str):
    """The test that runs the module at ``path`` in a fresh process when this one cannot interpret the kernels."""

    @pytest.mark.skipif(not fresh, reason="the interpreter tests run in this process")
    def test_interpreter_suite_in_fresh_process():
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(path), "..", "src"),
                                             env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider"],
                              capture_output=True, text=True, env=env, timeout=900)
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        assert proc.returncode == 0 and " passed" in summary, proc.stdout[-6000:] + proc.stderr[-2000:]

    return test_interpreter_suite_in_fresh_process
