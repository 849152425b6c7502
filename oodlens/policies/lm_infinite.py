"""LM-Infinite (Han et al., 2023) and the ablations of its Fig. 5: vanilla, a plain window, the Λ-shaped mask
alone, the distance limit alone, and both together.

=================  ====================================  =====================================
policy             keys query i sees                     distance used
=================  ====================================  =====================================
vanilla            all j ≤ i                             i − j
window             i − j < W                             i − j
lambda             j < G or i − j < W                    i − j
distance-limit     all j ≤ i                             min(i − j, L)  (ReRoPE without its log scale)
lm-infinite        j < G or i − j < W                    i − j locally, L for far starting keys
=================  ====================================  =====================================

W (``n_local``) defaults to the pretraining length and L (``distance_limit``) to W, as the paper sets both; G
is ``n_global`` (the paper: anything in 5–100 works alike, 10 by default). A limit beyond W or beyond the
pretraining length is refused: it would show the model distances it never saw.
"""

from __future__ import annotations

from typing import Any

from ..errors import OodlensError, check_count
from .base import EVERY_KEY, RESOLVERS, Policy, or_length, settings_of, tokens


def _band(settings: dict[str, Any], train_length: int) -> dict[str, Any]:
    """A window (default L) with the first ``n_global`` keys beyond it, optionally at a distance limit
    (default L); every length at most L, and the limit at most the window."""
    window = tokens("n_local/window", or_length(settings.get("n_local"), train_length))
    n_global = settings.get("n_global", 0)
    if n_global != EVERY_KEY:
        check_count("n_global", n_global, minimum=0)
    limit = None
    if settings.get("limited"):
        limit = tokens("distance_limit", or_length(settings.get("distance_limit"), window), upto=train_length)
        if limit > window:
            raise OodlensError(
                f"distance_limit {limit} exceeds the window {window}: "
                "keys just beyond the window would be seen farther than keys inside it; "
                "use a limit of at most the window"
            )
    top_k = check_count("top_k", settings.get("top_k", 0), minimum=0)
    if top_k and limit is None:
        raise OodlensError("top_k needs a distance limit (the top-k keys sit at distance_limit // 2)")
    return {"window": window, "n_global": n_global, "distance_limit": limit, "top_k": top_k}


RESOLVERS["band"] = _band


def vanilla() -> Policy:
    """Full causal attention (the model as trained); still routed through the engine so it can be observed."""
    return Policy("vanilla")


def window(n_local: int | None = None) -> Policy:
    """Sliding window of ``n_local`` keys (default: the pretraining length), no starting tokens."""
    return Policy("window", "band", settings_of(n_local=n_local))


def lambda_mask(n_global: int = 10, n_local: int | None = None) -> Policy:
    """Λ-shaped mask only: starting tokens plus the window, distances left as they are."""
    return Policy("lambda", "band", settings_of(n_global=n_global, n_local=n_local))


def distance_limit(limit: int | None = None) -> Policy:
    """Distance limit only: every key, distances beyond ``limit`` (default: the pretraining length) clamped to
    it. This is ReRoPE without its log query scale (:func:`oodlens.policies.peers.rerope`)."""
    return Policy(
        "distance-limit",
        "band",
        settings_of(n_local=limit, n_global=EVERY_KEY, distance_limit=limit, limited=True),
    )


def lm_infinite(
    n_global: int = 10,
    n_local: int | None = None,
    distance_limit: int | None = None,
    top_k: int = 0,
    top_k_from_layer: int = 4,
) -> Policy:
    """LM-Infinite: Λ-shaped mask plus distance limit (and optionally top-k middle tokens, the paper's passkey
    setting is ``top_k=5``)."""
    settings = settings_of(
        n_global=n_global, n_local=n_local, distance_limit=distance_limit, limited=True, top_k=top_k
    )
    return Policy("lm-infinite", "band", settings, top_k_from_layer=top_k_from_layer)
