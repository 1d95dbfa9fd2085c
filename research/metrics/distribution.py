"""Distribution metrics against the style's held-out references: FID, KID (clean-fid's) and Inception Score.

`fid`, `kid` and `inception_score` are the plain estimators; the `*_statistic` functions give the same
value for any subset of images and references, which is what the jackknife in stats.py needs.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from scipy.linalg import LinAlgWarning
from cleanfid.fid import frechet_distance

from .stats import Statistic

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


def fid_statistic(feats: np.ndarray, refs: np.ndarray) -> Statistic:
    """FID of the kept images against the kept references, for the jackknife in stats.py."""
    a, b = np.asarray(feats, np.float64), np.asarray(refs, np.float64)
    small = min(len(a), len(b)) < a.shape[1]
    draw = _fid_by_svd if small else _fid_plain  # large sets: the d×d root is the cheaper one
    return lambda g, r: fid(a, b) if len(g) == len(a) and len(r) == len(b) else draw(a[g], b[r])


# ----------------------------------------------------------------------------- KID

def _cubic_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """clean-fid's KID kernel k(x, y) = (x·y / d + 1)³."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Unbiased MMD² with clean-fid's cubic kernel over all images of both sets.

    clean-fid's kernel_distance averages the same estimator over equal-size random subsets; on sets of
    equal size up to 1000 the two are identical (tests/test_metrics.py checks it), and for unequal sizes
    this one keeps every image instead of dropping the larger set's surplus at random.
    """
    return kid_statistic(feats_a, feats_b)(np.arange(len(feats_a)), np.arange(len(feats_b)))


def kid_statistic(feats: np.ndarray, refs: np.ndarray) -> Statistic:
    """KID of the kept images against the kept references; the kernel matrices are computed once."""
    a, b = np.asarray(feats, np.float64), np.asarray(refs, np.float64)
    if min(len(a), len(b)) < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {len(a)} and {len(b)}.")
    kaa, kbb, kab = _cubic_kernel(a, a), _cubic_kernel(b, b), _cubic_kernel(a, b)

    def within(k: np.ndarray, idx: np.ndarray) -> float:
        block = k[np.ix_(idx, idx)]
        return (block.sum() - np.trace(block)) / (len(idx) * (len(idx) - 1))

    return lambda g, r: float(within(kaa, g) + within(kbb, r) - 2 * kab[np.ix_(g, r)].mean())


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


def inception_score_statistic(probs: np.ndarray) -> Statistic:
    """IS of the kept images, with the split count of the full set (one split below 100 images)."""
    p = np.asarray(probs, np.float64)
    splits = is_splits(len(p))
    return lambda g, r: inception_score(p[g], splits)[0]
