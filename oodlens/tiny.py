"""Kept for ``from oodlens.tiny import ...``: the tiny random models live in :mod:`oodlens.models.tiny`."""

from .models.tiny import *  # noqa: F403
from .models.tiny import __all__  # noqa: F401
