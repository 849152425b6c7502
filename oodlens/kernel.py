"""Kept for ``from oodlens import kernel``: the CPU entropy kernel lives in
:mod:`oodlens.attention.cpu_kernel`."""

from .attention.cpu_kernel import SOURCE, compiled, entropy_attention

__all__ = ["SOURCE", "compiled", "entropy_attention"]
