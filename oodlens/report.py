"""Kept for ``from oodlens import report``: the report folder is written by :mod:`oodlens.probe.report`."""

from .probe.report import *  # noqa: F403
from .probe.report import __all__  # noqa: F401
