"""oodlens: see why language models break beyond their training length, and fix it on the fly (LM-Infinite)."""

from .errors import OodlensError
from .models import load_model
from .policies import (
    POLICIES,
    Policy,
    PolicyHandle,
    apply_lm_infinite,
    apply_policy,
    distance_limit,
    lambda_mask,
    lm_infinite,
    policy_by_name,
    vanilla,
    window,
)

__all__ = [
    "OodlensError",
    "POLICIES",
    "load_model",
    "Policy",
    "PolicyHandle",
    "apply_lm_infinite",
    "apply_policy",
    "distance_limit",
    "lambda_mask",
    "lm_infinite",
    "policy_by_name",
    "vanilla",
    "window",
]
__version__ = "0.1.0"
