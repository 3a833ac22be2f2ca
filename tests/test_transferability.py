"""The transferability scores (core/transferability) against independent computations: LogME against
scikit-learn's BayesianRidge evidence, the Ledoit-Wolf shrinkage against scikit-learn's, LEEP and NCE
against numbers worked out by hand, and all four rank separable labels above shuffled ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf
from sklearn.linear_model import BayesianRidge

from tltrain.core import transferability as tr


def _clusters(n_per_class: int = 50, classes: int = 4, dims: int = 16, seed: int = 0):
    """Features with class structure: each class's mean is a scaled one-hot direction, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    centres = np.zeros((classes, dims))
    centres[np.arange(classes), np.arange(classes)] = 3.0
    features = centres[labels] + rng.normal(size=(labels.size, dims))
    head = rng.normal(size=(dims, 8))  # a "source head" over 8 source labels
    return features, labels, features @ head


def _sklearn_logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The same evidence from BayesianRidge: flat Gamma priors (alpha_1..lambda_2 = 0) make its
    score the plain log marginal likelihood of LogME; / N per sample, mean over one-hot targets."""
    per_target = []
    for k in range(int(labels.max()) + 1):
        model = BayesianRidge(
            compute_score=True,
            fit_intercept=False,
            alpha_1=0.0,
            alpha_2=0.0,
            lambda_1=0.0,
            lambda_2=0.0,
            tol=1e-12,
            max_iter=100_000,
        )
        model.fit(features, (labels == k).astype(np.float64))
        per_target.append(model.scores_[-1] / features.shape[0])
    return float(np.mean(per_target))


@pytest.mark.parametrize(("n_per_class", "dims"), [(50, 16), (8, 64)])  # N > D and N < D
def test_logme_matches_bayesian_ridge_evidence(n_per_class: int, dims: int) -> None:
    features, labels, _ = _clusters(n_per_class=n_per_class, dims=dims)
    ours = tr.logme(features, labels)
    reference = _sklearn_logme(features, labels)
    # Both iterate MacKay's fixed point to convergence (from different starting points): 1e-6 relative.
    assert ours == pytest.approx(reference, rel=1e-6)


def test_log_evidence_reports_the_fixed_point_precisions() -> None:
    features, labels, _ = _clusters()
    target = (labels == 0).astype(np.float64)
    fit = tr.log_evidence(features, target)
    ridge = BayesianRidge(fit_intercept=False, alpha_1=0, alpha_2=0, lambda_1=0, lambda_2=0, tol=1e-12)
    ridge.fit(features, target)
    # scikit-learn's alpha_ is the noise precision (LogME's beta), lambda_ the weight precision (alpha).
    assert fit.beta == pytest.approx(ridge.alpha_, rel=1e-5)
    assert fit.alpha == pytest.approx(ridge.lambda_, rel=1e-5)
    assert 1 < fit.iterations < tr.LOGME_MAX_ITER


def test_leep_equals_the_hand_computation() -> None:
    # theta over 2 source labels; P(y, z) = [[.375, .125], [.125, .375]], P(z) = [.5, .5],
    # P(y | z) = [[.75, .25], [.25, .75]]; the EEP of each sample's own label: .75, .5, .75, .5.
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.5, 0.5]])
    labels = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(tr.joint_distribution(probs, labels), [[0.375, 0.125], [0.125, 0.375]])
    assert tr.leep(probs, labels) == pytest.approx((math.log(0.75) + math.log(0.5)) / 2, abs=1e-12)


def test_nce_equals_the_hand_computation() -> None:
    # (y, z) = (0,0) (0,0) (1,0) (1,1): P(0,0) = 1/2, P(1,0) = 1/4, P(1,1) = 1/4; P(z=0) = 3/4, P(z=1) = 1/4.
    # -H(Y|Z) = 1/2 log(2/3) + 1/4 log(1/3) + 1/4 log(1).
    source = np.array([0, 0, 0, 1])
    labels = np.array([0, 0, 1, 1])
    expected = 0.5 * math.log(2 / 3) + 0.25 * math.log(1 / 3)
    assert tr.nce(source, labels) == pytest.approx(expected, abs=1e-12)
    # Source labels that determine the target exactly: H(Y|Z) = 0.
    assert tr.nce(np.array([3, 3, 7, 7]), labels) == 0.0


def test_shrinkage_matches_scikit_learn_and_h_score_its_definition() -> None:
    features, labels, _ = _clusters(n_per_class=6, dims=40)  # N = 24 < D = 40: cov(f) is singular
    x = features - features.mean(axis=0)
    cov, shrinkage = tr.ledoit_wolf(x)
    sk_cov, sk_shrinkage = sk_ledoit_wolf(x, assume_centered=True)
    assert shrinkage == pytest.approx(sk_shrinkage, rel=1e-9)
    np.testing.assert_allclose(cov, sk_cov, rtol=1e-9, atol=1e-12)
    # tr(cov^-1 cov(E[f|y])) written out sample by sample.
    class_means = {k: x[labels == k].mean(axis=0) for k in np.unique(labels)}
    g = np.stack([class_means[k] for k in labels])
    expected = np.trace(np.linalg.inv(sk_cov) @ (g.T @ g) / len(labels))
    assert tr.h_score(features, labels) == pytest.approx(expected, rel=1e-9)


def test_separable_labels_score_higher_than_shuffled_on_every_score() -> None:
    features, labels, logits = _clusters()
    shuffled = np.random.default_rng(1).permutation(labels)
    good = tr.compute_scores(tr.SCORES, labels, features=features, source_logits=logits)
    bad = tr.compute_scores(tr.SCORES, shuffled, features=features, source_logits=logits)
    for name in tr.SCORES:
        assert good[name] is not None and bad[name] is not None
        assert good[name] > bad[name], name
    # Deterministic: the same inputs give the same numbers, bit for bit.
    assert tr.compute_scores(tr.SCORES, labels, features=features, source_logits=logits) == good


def test_scores_without_a_source_head_are_none() -> None:
    features, labels, _ = _clusters()
    out = tr.compute_scores(tr.SCORES, labels, features=features)
    assert out[tr.LEEP] is None and out[tr.NCE] is None
    assert out[tr.LOGME] is not None and out[tr.H_SCORE] is not None


def test_bad_inputs_are_refused_with_a_clear_message() -> None:
    features, labels, logits = _clusters(n_per_class=2)
    with pytest.raises(tr.TransferabilityError, match="3 samples for 4 classes"):
        tr.logme(features[:3], labels[:3], num_classes=4)
    with pytest.raises(tr.TransferabilityError, match="class 3 has no sample"):
        tr.h_score(features[:6], labels[:6], num_classes=4)
    nan = features.copy()
    nan[2, 5] = np.nan
    with pytest.raises(tr.TransferabilityError, match="NaN or infinite values .1 of 8 samples"):
        tr.logme(nan, labels)
    with pytest.raises(tr.TransferabilityError, match="apply softmax"):
        tr.leep(logits, labels)
    with pytest.raises(tr.TransferabilityError, match="unknown score 'acc'"):
        tr.compute_scores(["acc"], labels, features=features)
    with pytest.raises(tr.TransferabilityError, match="integer class indices"):
        tr.logme(features, labels.astype(float))
