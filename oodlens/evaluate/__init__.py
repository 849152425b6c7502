"""Evaluation: perplexity by position, passkey retrieval, generation quality, streaming perplexity, decoding
speed after a long context, the memory a run needs, RULER-style tasks, and every method compared by what
it repairs.

Every evaluation takes :class:`~oodlens.policies.Policy` objects (``policy.name`` labels the rows), applies
each with :func:`~oodlens.policies.apply_policy` (which restores the model afterwards), runs under
``torch.no_grad()`` in eval mode, and returns a result object with ``to_dataframe()`` and ``summary()`` (a
JSON-ready dict). See :mod:`.scoring` for how tokens are scored.
"""

from .budget import estimate_forward_memory, longest_length_within
from .comparison import MethodComparison, compare_methods
from .generation import (
    GenerationResult,
    PasskeyResult,
    continuation_scores,
    generate_greedy,
    generation_quality,
    pad_token_id_of,
    passkey_correct,
    passkey_retrieval,
)
from .perplexity import DEFAULT_BUCKET, PerplexityResult, perplexity_by_position
from .scoring import DEFAULT_CHUNK, TRUNCATED_BASELINE, cache_kwargs, sequence_nll, truncated_sequence_nll
from .speed import DecodeSpeedResult, decode_speed
from .streaming import StreamingResult, cycle_tokens, streaming_perplexity
from .tasks import DEFAULT_TASKS, TaskResult, task_accuracy

__all__ = [
    "DEFAULT_BUCKET",
    "DEFAULT_CHUNK",
    "DEFAULT_TASKS",
    "DecodeSpeedResult",
    "TRUNCATED_BASELINE",
    "GenerationResult",
    "MethodComparison",
    "PasskeyResult",
    "PerplexityResult",
    "StreamingResult",
    "TaskResult",
    "cache_kwargs",
    "compare_methods",
    "continuation_scores",
    "cycle_tokens",
    "decode_speed",
    "generate_greedy",
    "estimate_forward_memory",
    "generation_quality",
    "longest_length_within",
    "pad_token_id_of",
    "passkey_correct",
    "passkey_retrieval",
    "perplexity_by_position",
    "sequence_nll",
    "streaming_perplexity",
    "task_accuracy",
    "truncated_sequence_nll",
]
