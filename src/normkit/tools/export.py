"""Export models with normkit layers: ``torch.export`` and ONNX.

Plain ``torch.export.export(model, args)`` and ``torch.onnx.export(model, args, path)`` work as
they are: while exporting (``torch.compiler.is_exporting()``) or tracing, every normkit layer
computes through torch's own operators (:mod:`normkit.route`, :mod:`normkit.aten_path`), with
the statistics written out in two-pass form, so the ExportedProgram holds aten ops only — it
loads and runs without normkit, and every exporter translates it.

What remains here is for programs that do contain ``torch.ops.normkit.*`` nodes (code that calls
the ops directly, or a graph captured some other way) and for convenience:

    ep = normkit.tools.export_program(model, (x,))           # torch.export + decomposition
    onnx_program = normkit.export_onnx(model, (x,), "model.onnx")

``decompositions()`` is a table ``{normkit op: the same math in aten ops}`` (the reference
backend's formulas: two-pass mean/variance, ``x·scale + shift``, activation) for
``ExportedProgram.run_decompositions``. It is applied only on request, never registered
globally, so ``torch.compile`` keeps calling normkit's own kernels.

A model in training mode exports with batch statistics: the graph computes the batch's mean and
variance. The running-statistics update is a buffer mutation of the ExportedProgram; the ONNX
graph keeps only the model's outputs.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ..ops import decompositions as ops_decompositions

__all__ = ["decompositions", "export_program", "export_onnx"]

_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def decompositions() -> dict:
    """``{torch.ops.normkit.<forward op>.default: aten implementation}`` plus torch's default table
    (:func:`normkit.ops.decompositions`): for ``ExportedProgram.run_decompositions``."""
    table = torch.export.default_decompositions()
    table.update(ops_decompositions())
    return table


def export_program(model: nn.Module, args: tuple, kwargs: dict | None = None, *,
                   dynamic_shapes=None, strict: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export(model, args)`` with normkit's ops decomposed into aten ops.

    The model is not changed (export traces with fake tensors; a training-mode model's
    running-statistics update is recorded in the program, not applied).
    """
    if not isinstance(args, tuple):
        raise TypeError(f"export_program: args: expected a tuple of inputs, got {type(args).__name__}")
    ep = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    return ep.run_decompositions(decompositions())


def export_onnx(model: nn.Module | torch.export.ExportedProgram, args: tuple,
                path: str | os.PathLike | None = None, *, kwargs: dict | None = None, dynamic_shapes=None,
                opset_version: int = 18, convert_torch_norms: bool | None = None, **onnx_kwargs):
    """Export ``model`` to ONNX (opset ``opset_version`` ≥ 17) through torch's dynamo exporter.

    Args:
        model: any model with normkit (and torch.nn) layers, in train or eval mode; or an
            ExportedProgram of one (its normkit ops are decomposed here).
        args: tuple of example inputs.
        path: where to write the ``.onnx`` file (optional: the returned program has ``.save``).
        kwargs, dynamic_shapes: as for ``torch.export.export``.
        convert_torch_norms: export a copy in which torch.nn's norm layers are replaced by normkit's
            (:func:`normkit.convert`; the model itself is not changed). Needed for training
            mode: torch 2.13 exports a training-mode ``torch.nn.BatchNorm2d`` to ONNX such that
            onnxruntime 1.31 does not reproduce the batch-statistics output (measured: max errors
            4.8 and 6.2 on ``3 + 0.5·randn(4, 6, 7, 5)``; see with ``convert_torch_norms=False``);
            normkit's decomposition computes the batch statistics explicitly. ``None`` (default):
            convert when some torch.nn norm layer is in training mode; in eval mode torch's own
            ``BatchNormalization`` nodes are kept (for inference, fold first:
            ``export_onnx(normkit.fold(model.eval()), ...)``).
        **onnx_kwargs: passed to ``torch.onnx.export`` (e.g. ``input_names``, ``optimize``).

    Returns the ``torch.onnx.ONNXProgram``. Needs the ``onnx`` and ``onnxscript`` packages.
    """
    if opset_version < 17:
        raise ValueError(f"export_onnx: opset_version: expected >= 17, got {opset_version}")
    if isinstance(model, torch.export.ExportedProgram):
        ep = model.run_decompositions(decompositions())
    else:
        if convert_torch_norms is None:
            convert_torch_norms = any(m.training and type(m).__module__.startswith("torch.nn")
                                      for m in model.modules() if isinstance(m, _TORCH_NORMS))
        if convert_torch_norms:
            from .convert import convert

            model = convert(copy.deepcopy(model), to="normkit")
        ep = export_program(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    onnx_kwargs.setdefault("verbose", False)
    return torch.onnx.export(ep, args, path, kwargs=kwargs, dynamo=True, opset_version=opset_version,
                             **onnx_kwargs)
