"""The one exception type oodlens raises for user mistakes, and the checks that raise it."""

from __future__ import annotations

from typing import Any


class OodlensError(ValueError):
    """A mistake the user can fix: the message is one line naming the problem and the fix."""


def check_count(label: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer ≥ ``minimum`` (booleans and fractions refused), else an
    error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OodlensError(f"{label} must be an integer ≥ {minimum}, got {value!r}")
    return value


def check_train_length(train_length: Any) -> int:
    """The pretraining length: a whole number of tokens, at least 2 (one token predicts nothing)."""
    return check_count("train_length", train_length, minimum=2)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def non_finite_note(where: str, dtype: object) -> str:
    """The warning for NaN or infinite numbers found in ``where`` (issued once per place by the caller): names
    the place and the dtype, and the fix."""
    shown = str(dtype).removeprefix("torch.")
    return (
        f"non-finite values (NaN or inf) in {where} under {shown}: the numbers built from it are marked n/a; "
        "run in float32 or bfloat16 (--dtype float32), whose range does not overflow"
    )
