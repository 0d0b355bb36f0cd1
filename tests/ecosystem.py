"""Test set-up for the ecosystem's models (timm, transformers, torchvision) — never part of normkit.

``prepare_torchvision()`` lets torchvision's Python part import where its compiled operators do
not load: the torchvision wheels reachable for torch 2.13 here are CUDA builds, and beside the CPU
torch ``import torchvision`` (so ``import timm``, and transformers' models that touch its image
utilities) fails with ``operator torchvision::nms does not exist`` — torchvision registers fake
kernels for ``nms`` and ``qnms`` at import, and those need the operators' schemas. When
torchvision's ``_C`` library does not load, this defines those two schemas (no kernel: calling
them would still fail, and nothing normkit tests calls them) with ``torch.library``. Where ``_C``
loads (a matching build), it does nothing.

Used by ``tests/conftest.py`` (the ``timm`` / ``transformers`` fixtures) and by ``normkit bench
--suite zoo`` when it runs from this checkout; normkit's own package never imports this file.

``library(name)`` imports ``timm`` or ``transformers`` after that preparation, or returns None
(with the reason in ``missing``) when it is not installed here. Model builders and the norm-layer
census are :mod:`normkit.bench.zoo`'s (one copy for the tests and the benchmark).
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_LIB = None  # keeps the torch.library registration alive
missing: dict[str, str] = {}


def prepare_torchvision() -> str:
    """Make ``import torchvision`` work here; returns what it found or did: "native" (its ``_C`` loads),
    "present" (the operators exist already), "schemas" (defined here) or "absent" (not installed)."""
    global _LIB
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    if _LIB is not None:
        return "schemas"
    libs = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")))
    if libs:
        try:
            torch.ops.load_library(libs[0])  # torchvision loads the same file again: a no-op then
            return "native"
        except OSError:
            pass
    try:
        torch.ops.torchvision.nms  # noqa: B018 — defined already (a build, or another copy of this file)
        return "present"
    except (AttributeError, RuntimeError):
        pass
    _LIB = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return "schemas"


def library(name: str):
    """``timm`` or ``transformers`` (imported after :func:`prepare_torchvision`), or None."""
    from normkit.bench import zoo

    prepare_torchvision()
    try:
        return zoo.import_library(name)
    except ImportError as err:
        missing[name] = str(err)
        return None
