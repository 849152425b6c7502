"""Figure 1 of the paper: the three out-of-distribution factors, before and after LM-Infinite.

(a) attention logit bound against distance (running maximum of the last query's logits, mean over heads),
(b) attention entropy against position with the ln n reference, (c) PCA of hidden states coloured by
position for several layers. Each panel overlays vanilla ("before") and LM-Infinite ("after").

    python analyses/fig1_three_factors.py                 # SmolLM2, 2 × its pretraining length
    python analyses/fig1_three_factors.py --quick         # tiny random model, seconds
"""

from __future__ import annotations

import common

from oodlens import plotting
from oodlens.capture import CaptureConfig, Diagnosis, diagnose
from oodlens.policies import lm_infinite, vanilla
from oodlens.theory import check_theory


def add_arguments(parser) -> None:
    parser.add_argument(
        "--length", type=int, default=None, help="tokens per window (default: 2 × train length)"
    )


def run(argv: list[str] | None = None) -> dict[str, Diagnosis]:
    settings = common.parse("fig1_three_factors", __doc__.splitlines()[0], add_arguments, argv)
    loaded = common.model(settings)
    train = loaded.info.train_length
    length = settings.extra.length or 2 * train
    ids = common.windows(settings, length)
    config = CaptureConfig(hidden_layers=[1, 2, 3, 5, 10, 20] if not settings.quick else None)
    diagnoses = {}
    for label, policy in (("vanilla", vanilla()), ("lm-infinite", lm_infinite())):
        diagnoses[label] = common.cached(
            settings,
            f"diagnosis-{label}",
            {"length": length},
            lambda policy=policy: diagnose(
                loaded.model, ids, policy, config=config, train_length=train, name=loaded.info.name
            ),
            suffix="",
            write=lambda diagnosis, path: diagnosis.save(path),
            read=Diagnosis.load,
        )
    common.save(settings, plotting.plot_logits_by_distance(diagnoses, train), "fig1a_logits_by_distance")
    common.save(settings, plotting.plot_entropy_by_position(diagnoses, train), "fig1b_entropy_by_position")
    common.save(settings, plotting.plot_hidden_pca(diagnoses), "fig1c_hidden_pca")
    common.save(settings, plotting.plot_sink_mass(diagnoses, train), "fig1d_sink_mass")
    for label, diagnosis in diagnoses.items():
        summary = diagnosis.summary()
        theory = check_theory(diagnosis).summary()
        print(
            f"\n[{label}] max logit within {summary['max_logit_within']:.2f} "
            f"beyond {summary['max_logit_beyond']:.2f}; "
            f"last-query max within {summary['last_query_max_within']:.2f} "
            f"beyond {summary['last_query_max_beyond']:.2f}; "
            f"entropy late-within {summary['entropy_late_within']:.3f} "
            f"beyond {summary['entropy_beyond']:.3f} nats; "
            f"entropy bound holds: {theory['entropy_bound_holds']}"
        )
    return diagnoses


if __name__ == "__main__":
    run()
