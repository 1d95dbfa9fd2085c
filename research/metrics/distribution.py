"""Distribution metrics against the style's held-out references: FID, KID (clean-fid) and Inception Score.

`fid`, `kid_subsets` and `inception_score` are the plain estimators; the `*_report` functions add the
interval and sample count that every reported metric carries.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from scipy.linalg import LinAlgWarning
from cleanfid.fid import frechet_distance, kernel_distance

from .stats import bootstrap_sets, subsample_ci

KID_MAX_SUBSET = 1000  # clean-fid's and Bińkowski et al.'s subset size; smaller sets use all their images
KID_SUBSETS = 100  # subsets per KID estimate (clean-fid's default)
MIN_IMAGES_PER_IS_SPLIT = 50  # each IS split needs enough images to estimate the marginal p(y)
MAX_IS_SPLITS = 10  # the customary number of IS splits for large sets


# ----------------------------------------------------------------------------- FID

def _joint_basis(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Express both sets in an orthonormal basis of the span of their rows.

    Exact for FID (means and covariances live in that span, and the trace of sqrtm is basis-free) and turns
    clean-fid's 2048×2048 sqrtm into an (n_a+n_b)-sized one for small sets: what makes bootstrapping affordable.
    """
    if len(a) + len(b) >= a.shape[1]:
        return a, b
    q, _ = np.linalg.qr(np.concatenate([a, b]).T)
    return a @ q, b @ q


def _fid_plain(a: np.ndarray, b: np.ndarray) -> float:
    # sets smaller than the feature dimension have singular covariances: fid_report flags them "unreliable"
    # instead of letting clean-fid warn and print once per bootstrap draw
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", LinAlgWarning)
        return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (clean-fid's frechet_distance)."""
    a, b = _joint_basis(np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64))
    return _fid_plain(a, b)


def _fid_by_svd(a: np.ndarray, b: np.ndarray) -> float:
    """The same Fréchet distance for bootstrap draws, without a d×d matrix root.

    The nonzero eigenvalues of Σa·Σb are the squared singular values of Ac·Bcᵀ / √((na−1)(nb−1)) (Ac, Bc: the
    centred rows), so Tr sqrtm(Σa·Σb) is an na×nb SVD away; scipy's sqrtm of the singular covariances of
    small sets takes seconds per draw. tests/test_metrics.py checks it against clean-fid.
    """
    ac, bc = a - a.mean(0), b - b.mean(0)
    tr_covmean = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ac ** 2).sum() / (len(a) - 1) + (bc ** 2).sum() / (len(b) - 1) - 2 * tr_covmean)


def fid_report(feats_a: np.ndarray, feats_b: np.ndarray, n_boot: int = 100, seed: int = 0) -> dict:
    """FID with a bootstrap interval over images of both sets; "unreliable" when a set is smaller than the
    feature dimension (its covariance is then rank-deficient and FID biased upward)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    small = min(len(a), len(b)) < a.shape[1]
    draw = _fid_by_svd if small else _fid_plain  # large sets: the d×d root is the cheaper one
    out = {"mean": fid(a, b), "ci95": bootstrap_sets(draw, [a, b], n_boot, seed), "n": len(a), "n_reference": len(b)}
    if small:
        out["unreliable"] = True
    return out


# ----------------------------------------------------------------------------- KID

def kid_subsets(feats_a: np.ndarray, feats_b: np.ndarray, subset_size: int | None = None,
                num_subsets: int = KID_SUBSETS, seed: int = 0) -> np.ndarray:
    """Unbiased KID (clean-fid's kernel_distance, cubic polynomial kernel) on each of `num_subsets` subsets."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    m = subset_size or min(len(a), len(b), KID_MAX_SUBSET)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {len(a)} and {len(b)}.")
    state = np.random.get_state()  # kernel_distance draws subsets from numpy's global generator
    np.random.seed(seed)
    try:
        return np.array([kernel_distance(a, b, num_subsets=1, max_subset_size=m) for _ in range(num_subsets)])
    finally:
        np.random.set_state(state)


def kid_report(feats_a: np.ndarray, feats_b: np.ndarray, num_subsets: int = KID_SUBSETS, seed: int = 0) -> dict:
    """KID mean and std over subsets of size min(n_a, n_b, 1000); the interval by subsampling half-size
    subsets (KID's estimator is unbiased at any size, and drawing without replacement avoids the duplicates
    that bias a with-replacement bootstrap)."""
    values = kid_subsets(feats_a, feats_b, num_subsets=num_subsets, seed=seed)
    m = min(len(feats_a), len(feats_b), KID_MAX_SUBSET)
    half = max(2, m // 2)

    def one(a, b):
        return float(kernel_distance(a, b, num_subsets=1, max_subset_size=half))

    state = np.random.get_state()
    np.random.seed(seed + 1)
    try:
        ci = subsample_ci(float(values.mean()), one, [np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)],
                          half, num_subsets, seed)
    finally:
        np.random.set_state(state)
    return {"mean": float(values.mean()), "std": float(values.std()), "ci95": ci, "n": len(feats_a),
            "n_reference": len(feats_b), "subset_size": m, "num_subsets": num_subsets}


# ----------------------------------------------------------------------------- Inception Score

def is_splits(n: int) -> int:
    return int(np.clip(n // MIN_IMAGES_PER_IS_SPLIT, 1, MAX_IS_SPLITS))


def inception_score(probs: np.ndarray, splits: int | None = None) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split (Salimans et al.); returns (mean, std) over splits."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    scores = []
    for part in np.array_split(p, splits or is_splits(len(p))):
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_report(probs: np.ndarray, n_boot: int = 100, seed: int = 0) -> dict:
    splits = is_splits(len(probs))
    mean, std = inception_score(probs, splits)
    ci = bootstrap_sets(lambda p: inception_score(p, splits)[0], [np.asarray(probs)], n_boot, seed)
    return {"mean": mean, "std": std, "ci95": ci, "n": len(probs), "splits": splits}
