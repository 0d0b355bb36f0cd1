"""Operations on whole models."""

from .convert import convert, register_conversion

__all__ = ["convert", "register_conversion"]
