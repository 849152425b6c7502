"""Diagnose the three out-of-distribution factors of LM-Infinite in one forward pass.

Two observers ride along a normal forward: :class:`LogitObserver` (:mod:`.logits`, factors 1 and 2: logits
by distance, entropy and sink mass by position) is the attention engine's observer;
:class:`HiddenStateObserver` (:mod:`.hidden`, factor 3: hidden states of chosen decoder layers) hooks decoder
layers. Logits-by-distance statistics are exact for the sampled queries (every ``query_stride``-th query plus
the last; ``query_stride=1`` samples all of them). Nothing of size n×n is ever formed.

Entry points: :func:`diagnose` (one call, returns a :class:`Diagnosis`) and :func:`capture` (a context
manager around forwards you run yourself).
"""

from ..models.anatomy import decoder_layers
from .config import CaptureConfig, CaptureGeometry, resolve_geometry
from .diagnosis import FACTOR_NUMBERS, TABLE_COLUMNS, TABLE_KINDS, Diagnosis, factor_estimates
from .hidden import HiddenStateObserver
from .logits import LogitObserver
from .position_probe import position_probe
from .session import CaptureSession, capture, diagnose

__all__ = [
    "FACTOR_NUMBERS",
    "TABLE_COLUMNS",
    "TABLE_KINDS",
    "CaptureConfig",
    "CaptureGeometry",
    "CaptureSession",
    "Diagnosis",
    "HiddenStateObserver",
    "LogitObserver",
    "capture",
    "decoder_layers",
    "diagnose",
    "factor_estimates",
    "position_probe",
    "resolve_geometry",
]
