"""Operations on whole models: convert, fold, recalibrate, export, inspect."""

from .convert import convert, register_conversion
from .export import decompositions, export_onnx, export_program
from .fold import FoldReport, fold
from .freeze import freeze, unfreeze
from .inspect import LayerRecord, inspect
from .recalibrate import recalibrate
from .report import ConversionReport

__all__ = [
    "convert",
    "register_conversion",
    "ConversionReport",
    "freeze",
    "unfreeze",
    "fold",
    "FoldReport",
    "recalibrate",
    "export_onnx",
    "export_program",
    "decompositions",
    "inspect",
    "LayerRecord",
]
