"""The position probe (Factor 3): can a linear read-out tell where a token is, and tell the starting tokens
apart?"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .diagnosis import TABLE_COLUMNS

MAX_PROBE_FOLDS = 5
RIDGE_ALPHAS = np.logspace(-2, 4, 13)


def position_probe(
    samples: dict[int, tuple[np.ndarray, np.ndarray]], n_global: int, seed: int
) -> pd.DataFrame:
    """Cross-validated scores of linear probes on sampled hidden vectors, per layer.

    Targets: ``log(1 + position)`` (ridge regression, R²) and ``position < n_global`` (class-balanced
    logistic regression, balanced accuracy and ROC-AUC). Every score is out-of-fold: each vector is predicted
    by a probe fitted without it. The folds are seeded and stratified on the start-token class, so every
    test fold holds start tokens; this uses all of the few start tokens a short capture has (one window has
    only ``n_global`` of them) instead of gambling on one split. Classification scores are NaN where
    fewer than two start (or other) tokens were sampled.

    Returns:
        DataFrame ``[layer, target, metric, score, n_samples, n_folds]``.
    """
    from threadpoolctl import threadpool_limits

    rows = []
    with threadpool_limits(limits=1):  # small problems; BLAS threads spinning on shared cores cost up to 10×
        for layer, (positions, vectors) in sorted(samples.items()):
            # float64: scikit-learn's ridge solver is several times slower in float32
            rows += _probe_layer(layer, positions, vectors.astype(np.float64), n_global, seed)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS["position_probe"]))


def _probe_layer(
    layer: int, positions: np.ndarray, vectors: np.ndarray, n_global: int, seed: int
) -> list[tuple]:
    """The rows of :func:`position_probe` for one layer's ``positions [S]`` and ``vectors [S, d]`` (NaN scores
    for a layer whose hidden states were not finite: the capture has warned about it)."""
    if not np.isfinite(vectors).all():
        scores = (("log_position", "r2"), ("start_token", "balanced_accuracy"), ("start_token", "roc_auc"))
        return [(layer, target, metric, math.nan, len(positions), 0) for target, metric in scores]
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import balanced_accuracy_score, r2_score, roc_auc_score
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    is_start = positions < n_global
    log_position = np.log1p(positions)
    n_folds = int(min(MAX_PROBE_FOLDS, is_start.sum(), (~is_start).sum()))
    stratified = n_folds >= 2
    if stratified:
        folds = list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(vectors, is_start))
    else:
        n_folds = MAX_PROBE_FOLDS
        folds = list(KFold(n_folds, shuffle=True, random_state=seed).split(vectors))
    regression = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
    r2 = r2_score(log_position, cross_val_predict(regression, vectors, log_position, cv=folds))
    balanced, auc = math.nan, math.nan
    if stratified:
        classifier = make_pipeline(
            StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000)
        )
        decision = cross_val_predict(classifier, vectors, is_start, cv=folds, method="decision_function")
        balanced = balanced_accuracy_score(is_start, decision > 0)
        auc = roc_auc_score(is_start, decision)
    scores = (
        ("log_position", "r2", r2),
        ("start_token", "balanced_accuracy", balanced),
        ("start_token", "roc_auc", auc),
    )
    return [
        (layer, target, metric, float(score), len(positions), n_folds) for target, metric, score in scores
    ]
