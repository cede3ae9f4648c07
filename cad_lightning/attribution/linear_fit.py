"""The linear attribution model of the regression estimator: concept score ≈ intercept + Σ_i coef_i · mask_i.

Two solvers, picked by the size of the mask matrix (masks × components):

- ``dense`` (up to ``dense_limit`` entries): scikit-learn ``RidgeCV`` (efficient leave-one-out over the
  strengths) or ``LassoCV`` (k-fold), on the 0/1 mask matrix;
- ``streaming`` (beyond it, ridge only): the normal equations. Mask rows are regenerated chunk by chunk from
  their ids, and per cross-validation fold the sums ZᵀZ and Zᵀy of Z = [masks, 1] are accumulated in float64;
  the matrix itself is never held. Ridge with an unpenalised intercept (the same estimate as scikit-learn's
  ``Ridge``, which centres the data) is solved for every strength; each fold's validation error comes from the
  sums alone (‖y_k − Z_k β‖² = y_kᵀy_k − 2βᵀZ_kᵀy_k + βᵀZ_kᵀZ_kβ). Memory is O(components²) floats, so it
  serves up to ``MAX_STREAMING_COMPONENTS`` components for any number of masks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cad_lightning.errors import UserInputError

METHODS = ("ridge", "lasso")
DEFAULT_STRENGTHS = tuple(float(a) for a in np.logspace(-2, 4, 19))
MAX_STREAMING_COMPONENTS = 20_000


@dataclass
class LinearFit:
    coef: np.ndarray  # (n_components,) float64: effect of keeping component i (= drop of the score when ablated)
    intercept: float
    strength: float
    method: str
    solver: str
    train_r2: float
    fit_time_s: float
    details: dict = field(default_factory=dict)

    def predict(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        return np.asarray(masks, dtype=np.float64) @ self.coef + self.intercept


def fit_linear(
    rows: Callable[[Sequence[int]], torch.Tensor],
    ids: Sequence[int],
    y: Sequence[float],
    method: str = "ridge",
    strengths: Sequence[float] | None = None,
    folds: int = 5,
    dense_limit: int = 50_000_000,
    chunk: int = 1024,
) -> LinearFit:
    """Fit the scores ``y`` of masks ``ids``; ``rows(ids)`` regenerates their mask rows (len(ids), n_components)."""
    if method not in METHODS:
        raise UserInputError(f"method must be one of {', '.join(METHODS)}, got '{method}'.")
    ids, y = list(ids), np.asarray(y, dtype=np.float64)
    if len(ids) != len(y) or len(ids) < 2:
        raise UserInputError(f"the fit needs at least 2 masks with one score each, got {len(ids)} masks and {len(y)} scores.")
    strengths = tuple(strengths or DEFAULT_STRENGTHS)
    n_components = rows(ids[:1]).shape[1]
    start = time.perf_counter()
    if len(ids) * n_components <= dense_limit:
        x = np.concatenate([rows(ids[i : i + chunk]).numpy().astype(np.float64) for i in range(0, len(ids), chunk)])
        fit = _fit_dense(x, y, method, strengths, folds)
        from sklearn.metrics import r2_score

        fit.train_r2 = float(r2_score(y, fit.predict(x))) if float(y.std()) > 0 else float("nan")
    else:
        if method != "ridge":
            raise UserInputError(
                f"{len(ids)} masks × {n_components} components is beyond the dense limit ({dense_limit} entries) and "
                "lasso needs the dense matrix: use method ridge (streaming normal equations) or fewer masks."
            )
        if n_components > MAX_STREAMING_COMPONENTS:
            raise UserInputError(
                f"{n_components} components are too many for the streaming ridge solver (at most "
                f"{MAX_STREAMING_COMPONENTS}); use a coarser granularity (head or layer) or fewer components."
            )
        fit = _fit_streaming(rows, ids, y, strengths, folds, chunk)
    fit.fit_time_s = time.perf_counter() - start
    return fit


def _fit_dense(x: np.ndarray, y: np.ndarray, method: str, strengths: Sequence[float], folds: int) -> LinearFit:
    from sklearn.linear_model import LassoCV, RidgeCV

    if method == "ridge":
        model = RidgeCV(alphas=strengths).fit(x, y)
        details = {"cv": "leave-one-out (RidgeCV)", "strengths": list(strengths), "best_score": float(model.best_score_)}
        strength = float(model.alpha_)
    else:
        model = LassoCV(cv=min(folds, len(y)), alphas=30, random_state=0, max_iter=5000).fit(x, y)
        details = {"cv": f"{min(folds, len(y))}-fold (LassoCV)", "nonzero": int((model.coef_ != 0).sum())}
        strength = float(model.alpha_)
    return LinearFit(np.asarray(model.coef_, dtype=np.float64), float(model.intercept_), strength, method,
                     "dense (scikit-learn)", float("nan"), 0.0, details)


def _solve(gram: np.ndarray, zy: np.ndarray, strength: float) -> np.ndarray:
    penalty = np.full(gram.shape[0], strength)
    penalty[-1] = 0.0  # the intercept is not penalised
    return np.linalg.solve(gram + np.diag(penalty), zy)


def _fit_streaming(rows, ids, y, strengths, folds, chunk) -> LinearFit:
    folds = max(2, min(folds, len(ids)))
    n_components = rows(ids[:1]).shape[1]
    size = n_components + 1
    gram = np.zeros((folds, size, size))
    zy = np.zeros((folds, size))
    yy = np.zeros(folds)
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        z = np.concatenate([rows(part).numpy().astype(np.float64), np.ones((len(part), 1))], axis=1)
        target = y[start : start + chunk]
        fold_of = np.arange(start, start + len(part)) % folds
        for k in range(folds):
            sel = fold_of == k
            gram[k] += z[sel].T @ z[sel]
            zy[k] += z[sel].T @ target[sel]
            yy[k] += float(target[sel] @ target[sel])
    gram_all, zy_all, yy_all = gram.sum(0), zy.sum(0), yy.sum()
    errors = []
    for strength in strengths:
        error = 0.0
        for k in range(folds):
            beta = _solve(gram_all - gram[k], zy_all - zy[k], strength)
            error += yy[k] - 2 * beta @ zy[k] + beta @ gram[k] @ beta
        errors.append(error / len(ids))
    best = int(np.argmin(errors))
    beta = _solve(gram_all, zy_all, strengths[best])
    residual = yy_all - 2 * beta @ zy_all + beta @ gram_all @ beta
    mean = zy_all[-1] / len(ids)
    total = yy_all - len(ids) * mean**2
    return LinearFit(beta[:-1].copy(), float(beta[-1]), float(strengths[best]), "ridge",
                     "streaming normal equations (float64)", 1.0 - float(residual) / float(total) if total > 0 else float("nan"),
                     0.0, {"cv": f"{folds}-fold from the sums", "strengths": list(strengths),
                           "cv_mse": [float(e) for e in errors]})
