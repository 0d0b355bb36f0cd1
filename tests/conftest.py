"""Shared fixtures: the ecosystem's libraries, imported through ``tests/ecosystem.py``'s set-up."""

from __future__ import annotations

import importlib.util

import pytest


def _library(name: str):
    import ecosystem

    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (it comes with the test extra: pip install -e '.[test]')")
    lib = ecosystem.library(name)
    if lib is None:  # installed but broken: a set-up defect, not a reason to skip
        pytest.fail(f"{name} is installed but does not import: {ecosystem.missing[name]}")
    return lib


@pytest.fixture(scope="session")
def timm():
    return _library("timm")


@pytest.fixture(scope="session")
def transformers():
    return _library("transformers")


@pytest.fixture(scope="session")
def torchvision():
    return _library("torchvision")
