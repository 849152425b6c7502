"""The command line: ``python -m oodlens.probe`` (or ``oodlens-probe``), a thin layer over
:func:`~oodlens.probe.run.run_probe` and :func:`~oodlens.probe.report.write_report`.

Its options are generated from :class:`~oodlens.probe.config.ProbeConfig`'s fields; ``--config FILE`` (JSON or
YAML) sets the same fields, and options given on the command line win. Every value is checked before the
model loads, and the output location before any computation; a user mistake is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import OodlensError
from .collect import resume_state
from .config import OUTPUT, ProbeConfig
from .report import prepare_output, print_summary, write_report
from .run import run_probe

OUTPUT_ONLY = {"out": "runs/probe", "overwrite": False, "resume": False}  # of the command, not of the run


def _number_list(cast: type) -> Callable[[str], tuple]:
    """An argparse type for comma-separated values of type ``cast``."""

    def parse(text: str) -> tuple:
        try:
            return tuple(cast(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {cast.__name__}s, got {text!r}"
            ) from None

    return parse


def _argument_type(annotation: Any) -> tuple[Any, bool]:
    """(argparse ``type``, is_flag) for a field annotation: bool → flag, tuple[T, ...] → list of T."""
    options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = options[0]
    if annotation is bool:
        return None, True
    if typing.get_origin(annotation) is tuple:
        return _number_list(typing.get_args(annotation)[0]), False
    return annotation, False


def _shown_default(value: Any) -> str:
    if value == ():
        return "none"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def build_parser() -> argparse.ArgumentParser:
    """The probe's argument parser, one option per :class:`ProbeConfig` field."""
    parser = argparse.ArgumentParser(
        prog="python -m oodlens.probe",
        description="Diagnose a language model beyond its pretraining length, before and after training-free "
        "fixes, and write a report folder (summary.json, figures, report.md).",
    )
    parser.add_argument("--version", action="version", version=f"oodlens {__version__}")
    parser.add_argument(
        "--config", type=Path, help="JSON or YAML file of option values (options given here win)"
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(ProbeConfig)
    for spec in fields(ProbeConfig):
        group = groups.setdefault(spec.metadata["group"], parser.add_argument_group(spec.metadata["group"]))
        flag = "--" + spec.name.replace("_", "-")
        kind, is_flag = _argument_type(hints[spec.name])
        help_text = spec.metadata["help"]
        if spec.default is not None and not is_flag:
            help_text += f" (default: {_shown_default(spec.default)})"
        if is_flag:
            on = "on" if spec.default else "off"
            group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=spec.default,
                help=f"{help_text} ({on} by default)",
            )
        else:
            group.add_argument(
                flag, type=kind, default=spec.default, help=help_text, metavar=spec.metadata["metavar"]
            )
    output = groups[OUTPUT]
    output.add_argument(
        "--out", default=OUTPUT_ONLY["out"], help=f"output folder (default: {OUTPUT_ONLY['out']})"
    )
    output.add_argument(
        "--overwrite", action="store_true", help="replace an existing report folder (never any other folder)"
    )
    output.add_argument(
        "--resume",
        action="store_true",
        help="skip the run when --out already holds a finished, valid report of these settings; run again "
        "over a damaged one (for sweeps: rerun a job array and only unfinished runs compute)",
    )
    verbosity = output.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    return parser


def config_file_values(path: Path) -> dict[str, Any]:
    """The option values in a JSON or YAML file, checked against the known options."""
    try:
        text = path.read_text()
    except OSError as error:
        raise OodlensError(f"cannot read --config {str(path)!r}: {error.strerror}") from error
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:  # json and yaml raise their own error types
        raise OodlensError(
            f"--config {str(path)!r} is not valid {path.suffix.lstrip('.') or 'JSON'}: {error}"
        ) from error
    if not isinstance(values, dict):
        raise OodlensError(f"--config {str(path)!r} must hold a mapping of option names to values")
    known = {spec.name for spec in fields(ProbeConfig)} | set(OUTPUT_ONLY)
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OodlensError(
            f"--config {str(path)!r} has unknown option {unknown[0]!r}; see --help for the options"
        )
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}


def parse_args(argv: list[str] | None) -> tuple[ProbeConfig, argparse.Namespace]:
    """The run's :class:`ProbeConfig` (validated) and the command's own options."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        parser.set_defaults(**config_file_values(first.config))
    args = parser.parse_args(argv)
    config = ProbeConfig(**{spec.name: getattr(args, spec.name) for spec in fields(ProbeConfig)})
    return config.validate(), args


def main(argv: list[str] | None = None) -> int:
    """Run the probe from the command line; returns the exit code (2 for a user mistake, 130 if
    interrupted)."""
    try:
        config, args = parse_args(argv)
        _show_progress_messages(
            logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
        )
        overwrite = args.overwrite
        if args.resume:
            state = resume_state(args.out, config)
            if state == "complete":
                print(f"{args.out}: already holds this run's finished report (--resume): nothing to do")
                return 0
            overwrite = overwrite or state == "replace"
        with prepare_output(Path(args.out), overwrite=overwrite) as writer:  # locked until written
            result = run_probe(config)
            folder = write_report(result, writer)
    except OodlensError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print_summary(result, folder)
    return 0


class _StandardError(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a message comes (a caller, such as a test or a
    notebook, may replace it between runs)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_progress_messages(level: int) -> None:
    """oodlens' own messages on standard error at ``level`` (other libraries' loggers are left alone)."""
    logger = logging.getLogger("oodlens")
    if not any(isinstance(handler, _StandardError) for handler in logger.handlers):
        handler = _StandardError()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def main_entry() -> None:
    """The ``oodlens-probe`` console script."""
    sys.exit(main())
