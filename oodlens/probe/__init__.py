"""The main job: ``python -m oodlens.probe`` — diagnose a model beyond its training length, before and after
the fixes, and write a report folder.

A thin command line (:mod:`.cli`) over one function, :func:`run_probe` (:mod:`.run`), which returns a
:class:`ProbeResult`; :func:`write_report` (:mod:`.report`) writes the folder (schema in
``docs/report-schema.md``); :class:`ProbeConfig` (:mod:`.config`) holds every setting and generates the
command line's options.
"""

from ..display import format_number
from .cli import build_parser, main
from .config import ProbeConfig
from .report import write_report
from .result import ProbeResult
from .run import run_probe, score_and_diagnose, truncated_baseline_nll

__all__ = [
    "ProbeConfig",
    "ProbeResult",
    "build_parser",
    "format_number",
    "main",
    "run_probe",
    "score_and_diagnose",
    "truncated_baseline_nll",
    "write_report",
]
