"""Command line: `python -m oodlens.probe`.

For now it loads a model and prints what oodlens knows about it (its `ModelInfo`); the diagnosis and the
LM-Infinite comparison come in later.
"""

from __future__ import annotations

import argparse
import sys

from oodlens.errors import OodlensError
from oodlens.models import DEFAULT_MODEL, DEVICES, DTYPES, load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m oodlens.probe", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="'smollm2' (embedded), a .gguf file, a model folder, 'tiny:<family>' or a hub id",
    )
    parser.add_argument("--device", default="auto", help=f"{' | '.join(DEVICES)} | cuda:N (default auto)")
    parser.add_argument("--dtype", default="auto", help=f"auto | {' | '.join(DTYPES)} (default auto)")
    parser.add_argument(
        "--train-length", type=int, help="pretraining length in tokens (default: from the model)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the probe; returns the process exit code (2 for a user mistake)."""
    args = parse_args(argv)
    try:
        loaded = load_model(args.model, device=args.device, dtype=args.dtype, train_length=args.train_length)
    except OodlensError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for field, value in loaded.info.to_dict().items():
        print(f"{field:20} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
