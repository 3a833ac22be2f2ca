"""Transferability scores: how well a source model's features (or its source head) suit a target
label set, from one forward pass and no training.

Pure numpy in float64 (no torch, Ray or MLflow): the rank command computes them on the driver from
the arrays its Ray tasks return, and the tests check them against independent computations. Each
score is written from its paper's definition; higher is better for all four.

- `logme` — You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning", ICML 2021: the log evidence of a Bayesian linear model from features to each one-hot
  target, maximised over the prior precision alpha and the noise precision beta by MacKay's
  fixed-point iteration in the SVD basis of the features, divided by N, averaged over classes.
- `leep` — Nguyen, Hassner, Seeger, Archambeau, "LEEP: A New Measure to Evaluate Transferability of
  Learned Representations", ICML 2020: the mean log-likelihood of the target labels under the
  "expected empirical predictor" built from the source head's softmax outputs over source labels z.
- `nce` — Tran, Nguyen, Hassner, "Transferability and Hardness of Supervised Classification Tasks",
  ICCV 2019: negative conditional entropy -H(Y|Z), Z the source head's argmax label.
- `h_score` — Bao, Li, Huang, Zheng, Zhang, "An Information-Theoretic Approach to Transferability in
  Task Transfer Learning", ICIP 2019: tr(cov(f)^-1 cov(E[f|y])). The feature covariance is
  estimated with Ledoit-Wolf shrinkage (as in Ibrahim, Ponomareva, Mazumder, "Newer is not always
  better", 2022): with fewer samples than feature dimensions the plain inverse does not exist, and a
  pseudo-inverse returns (classes - 1) for any labelling, shuffled ones included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tltrain.spec.schema import RANK_SCORES

SCORES = RANK_SCORES  # the names live with the spec's rank.scores; their order is the table's
LOGME, LEEP, NCE, H_SCORE = SCORES
# The scores that read the source head's outputs rather than the pooled features.
NEEDS_SOURCE_HEAD = frozenset({LEEP, NCE})

# LogME's fixed point: relative change of both alpha and beta below TOL ends the iteration.
LOGME_TOL = 1e-8
LOGME_MAX_ITER = 10_000


class TransferabilityError(ValueError):
    """Inputs a score cannot be computed from (the message names what is wrong)."""


@dataclass(frozen=True)
class Evidence:
    """One target's LogME fit: the per-sample log evidence and the precisions it was maximised at."""

    log_evidence_per_sample: float
    alpha: float  # prior precision of the weights
    beta: float  # noise precision
    iterations: int


def _labels(labels: np.ndarray, n: int, num_classes: int | None) -> tuple[np.ndarray, int]:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise TransferabilityError(f"labels must be a vector of {n} class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TransferabilityError(f"labels must be integer class indices, got dtype {y.dtype}")
    if n and (y.min() < 0):
        raise TransferabilityError("labels must be class indices >= 0")
    c = int(num_classes if num_classes is not None else (y.max() + 1 if n else 0))
    if n and y.max() >= c:
        raise TransferabilityError(f"label {int(y.max())} is out of range for {c} classes")
    if c < 2:
        raise TransferabilityError(f"a transferability score needs at least 2 classes, got {c}")
    if n < c:
        raise TransferabilityError(f"{n} samples for {c} classes: sample at least one image per class")
    counts = np.bincount(y, minlength=c)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise TransferabilityError(f"class {int(empty[0])} has no sample ({empty.size} empty classes)")
    return y.astype(np.int64), c


def _matrix(name: str, x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise TransferabilityError(f"{name} must be a non-empty (samples, dims) matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(axis=1).sum())
        raise TransferabilityError(f"{name} hold NaN or infinite values ({bad} of {a.shape[0]} samples)")
    return a


def _probabilities(source_probs: np.ndarray) -> np.ndarray:
    p = _matrix("source probabilities", source_probs)
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise TransferabilityError("source probabilities must be non-negative rows summing to 1 (apply softmax)")
    return p


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (max-subtracted, so large logits do not overflow)."""
    z = _matrix("source logits", logits)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _evidence(alpha: float, beta: float, sigma: np.ndarray, z2: np.ndarray, outside: float, n: int) -> float:
    """The log evidence log N(y; 0, beta^-1 I + alpha^-1 F F^T), in F's SVD basis.

    By the matrix determinant lemma this equals the paper's
    N/2 log beta + D/2 log alpha - N/2 log 2pi - beta/2 |F m - y|^2 - alpha/2 |m|^2 - 1/2 log|A|;
    written per direction (variance 1/beta + s^2/alpha in the span of F, 1/beta outside it) it stays
    exact when beta grows without bound, as it does once N <= D and the features can fit y exactly.
    """
    var = 1.0 / beta + sigma / alpha
    outside_dims = n - sigma.shape[0]
    return float(
        -0.5
        * (n * np.log(2 * np.pi) + np.log(var).sum() + (z2 / var).sum() - outside_dims * np.log(beta) + beta * outside)
    )


def log_evidence(
    features: np.ndarray, target: np.ndarray, *, tol: float = LOGME_TOL, max_iter: int = LOGME_MAX_ITER
) -> Evidence:
    """LogME's maximum evidence of one real-valued target (You et al. 2021, Algorithm 1).

    Model: w ~ N(0, alpha^-1 I), y | f ~ N(f^T w, beta^-1). With F = U S V^T and z = U^T y, MacKay's
    updates are gamma = sum(beta s^2 / (alpha + beta s^2)), alpha = gamma / |m|^2,
    beta = (N - gamma) / |F m - y|^2, where m = beta A^-1 F^T y and A = alpha I + beta F^T F.
    Converged when alpha and the evidence each change by less than `tol` (relative); beta alone may
    diverge (a noise-free fit is the maximiser when N <= D) while the evidence settles.
    """
    f = _matrix("features", features)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    n = f.shape[0]
    if y.shape[0] != n:
        raise TransferabilityError(f"target has {y.shape[0]} values for {n} feature rows")
    # Only the spectrum and the projections are needed: |m| and the residual are basis-free.
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > s.max() * max(f.shape) * np.finfo(np.float64).eps  # the numerical rank
    u, sigma = u[:, keep], s[keep] ** 2  # eigenvalues of F^T F on its row space; the rest are 0
    z2 = (u.T @ y) ** 2
    outside = max(float(y @ y - z2.sum()), 0.0)  # |y|^2 outside the span of F's columns
    alpha, beta = 1.0, 1.0
    evidence = _evidence(alpha, beta, sigma, z2, outside, n)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        denom = alpha + beta * sigma
        gamma = float((beta * sigma / denom).sum())
        m2 = float((beta**2 * sigma * z2 / denom**2).sum())
        res2 = float((alpha**2 * z2 / denom**2).sum()) + outside
        if m2 <= 0.0:
            raise TransferabilityError("LogME is undefined here: the target is orthogonal to every feature")
        new_alpha = gamma / m2
        new_beta = (n - gamma) / res2 if res2 > 0.0 else np.inf
        if not np.isfinite(new_beta):  # an exact fit already: keep beta where the evidence has settled
            new_beta = beta
        new_evidence = _evidence(new_alpha, new_beta, sigma, z2, outside, n)
        done = abs(new_alpha - alpha) <= tol * alpha and abs(new_evidence - evidence) <= tol * max(1.0, abs(evidence))
        alpha, beta, evidence = new_alpha, new_beta, new_evidence
        if done:
            return Evidence(evidence / n, alpha, beta, iterations)
    raise TransferabilityError(f"LogME's fixed-point iteration did not converge in {max_iter} iterations")


def logme(features: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None) -> float:
    """LogME: the mean over classes of the per-sample log evidence of the one-hot target."""
    f = _matrix("features", features)
    y, c = _labels(labels, f.shape[0], num_classes)
    return float(np.mean([log_evidence(f, (y == k).astype(np.float64)).log_evidence_per_sample for k in range(c)]))


def joint_distribution(source_probs: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """LEEP's empirical joint P(y, z) = 1/N sum over samples of class y of theta_z(x) (C x Z)."""
    p = _probabilities(source_probs)
    y, c = _labels(labels, p.shape[0], num_classes)
    joint = np.zeros((c, p.shape[1]))
    np.add.at(joint, y, p)
    return joint / p.shape[0]


def leep(source_probs: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None) -> float:
    """LEEP = 1/N sum_i log sum_z P(y_i | z) theta_z(x_i), P(y | z) = P(y, z) / P(z)."""
    p = _probabilities(source_probs)
    y, _ = _labels(labels, p.shape[0], num_classes)
    joint = joint_distribution(p, y, num_classes)
    marginal = joint.sum(axis=0)  # P(z)
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)  # P(y | z)
    eep = (p @ conditional.T)[np.arange(p.shape[0]), y]  # sum_z P(y_i | z) theta_z(x_i)
    return float(np.mean(np.log(eep)))


def nce(source_labels: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None) -> float:
    """NCE = -H(Y | Z) = sum_{y,z} P(y, z) log P(y | z), from the empirical joint of (y, z) counts."""
    z = np.asarray(source_labels)
    if z.ndim != 1 or not np.issubdtype(z.dtype, np.integer) or (z.size and z.min() < 0):
        raise TransferabilityError("source labels must be a vector of non-negative integer indices")
    y, c = _labels(labels, z.shape[0], num_classes)
    _, zi = np.unique(z, return_inverse=True)
    joint = np.zeros((c, int(zi.max()) + 1))
    np.add.at(joint, (y, zi), 1.0)
    joint /= z.shape[0]
    marginal = joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log((joint / marginal)[nz])).sum())


def ledoit_wolf(centered: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit & Wolf (2004) shrunk covariance of centred rows and its shrinkage in [0, 1]."""
    n, d = centered.shape
    s = centered.T @ centered / n
    mu = float(np.trace(s)) / d
    s_norm2 = float((s**2).sum())
    d2 = s_norm2 - 2 * mu * float(np.trace(s)) + mu**2 * d  # |S - mu I|_F^2
    # sum_k |x_k x_k^T - S|_F^2 = sum_k |x_k|^4 - n |S|_F^2 (since S = X^T X / n)
    b2 = min((float(((centered**2).sum(axis=1) ** 2).sum()) - n * s_norm2) / n**2, d2)
    shrinkage = b2 / d2 if d2 > 0 else 1.0
    return shrinkage * mu * np.eye(d) + (1 - shrinkage) * s, shrinkage


def h_score(features: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None) -> float:
    """H-score = tr(cov(f)^-1 cov(E[f | y])), cov(f) shrunk (Ledoit-Wolf) so it is invertible."""
    f = _matrix("features", features)
    y, c = _labels(labels, f.shape[0], num_classes)
    x = f - f.mean(axis=0)
    cov, _ = ledoit_wolf(x)
    counts = np.bincount(y, minlength=c).astype(np.float64)
    means = np.zeros((c, f.shape[1]))
    np.add.at(means, y, x)
    means /= counts[:, None]
    g = means[y]  # each sample replaced by its class's mean feature
    between = g.T @ g / f.shape[0]
    return float(np.trace(np.linalg.solve(cov, between)))


FEATURE_SCORES: dict[str, Callable[..., float]] = {LOGME: logme, H_SCORE: h_score}


def compute_scores(
    names: Sequence[str],
    labels: np.ndarray,
    *,
    features: np.ndarray,
    source_logits: np.ndarray | None = None,
    num_classes: int | None = None,
) -> dict[str, float | None]:
    """The named scores; LEEP and NCE are None where there are no source logits."""
    out: dict[str, float | None] = {}
    probs = softmax(source_logits) if source_logits is not None else None
    for name in names:
        if name in FEATURE_SCORES:
            out[name] = FEATURE_SCORES[name](features, labels, num_classes=num_classes)
        elif name == LEEP:
            out[name] = None if probs is None else leep(probs, labels, num_classes=num_classes)
        elif name == NCE:
            out[name] = None if probs is None else nce(probs.argmax(axis=1), labels, num_classes=num_classes)
        else:
            raise TransferabilityError(f"unknown score {name!r}: choose from {', '.join(SCORES)}")
    return out


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b rank correlation (Kendall 1945: ties in either list reduce the denominator,
    as scipy.stats.kendalltau's default). 1 = the two orders agree on every pair, -1 = reversed;
    None below 2 items or when either list is constant (no order to compare)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise TransferabilityError(f"kendall_tau: lists of equal length expected, got {a.shape} and {b.shape}")
    i, j = np.triu_indices(len(a), k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    untied_a, untied_b = np.count_nonzero(da), np.count_nonzero(db)
    if untied_a == 0 or untied_b == 0:
        return None
    return float(np.sum(da * db) / np.sqrt(float(untied_a) * float(untied_b)))
