"""Attention policies: which keys each query sees, and at what distance.

Every method oodlens runs is the same blockwise attention (:mod:`oodlens.attention`) with another answer to
those two questions. A :class:`Policy` is model-independent; :func:`apply_policy` resolves it against a
model's pretraining length and returns a :class:`PolicyHandle` that restores the model exactly.
"""

from ..models.anatomy import attention_modules  # kept here for code written against the first release
from .base import EVERY_KEY, CachePlan, Policy
from .handle import PolicyHandle, apply_lm_infinite, apply_policy, native_or_policy
from .lm_infinite import distance_limit, lambda_mask, lm_infinite, vanilla, window
from .peers import dual_chunk, leaky_rerope, rerope, self_extend, streaming_llm, string
from .registry import ABLATIONS, POLICIES, check_method, policy_by_name
from .rope_scaling import rope_scaling

__all__ = [
    "EVERY_KEY",
    "ABLATIONS",
    "POLICIES",
    "CachePlan",
    "Policy",
    "PolicyHandle",
    "apply_lm_infinite",
    "apply_policy",
    "attention_modules",
    "check_method",
    "distance_limit",
    "dual_chunk",
    "lambda_mask",
    "leaky_rerope",
    "lm_infinite",
    "native_or_policy",
    "policy_by_name",
    "rerope",
    "rope_scaling",
    "self_extend",
    "streaming_llm",
    "string",
    "vanilla",
    "window",
]
