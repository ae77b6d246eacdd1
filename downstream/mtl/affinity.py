"""Task affinities at the branch points (pure functions of arrays; SPEC §2 "Branched multi-task networks").

* RSA (thesis): per task an RDM over K held-out images, ``RDM[i,j] = 1 − Pearson(feat_i, feat_j)``;
  ``A[a,b]`` = Spearman correlation of the upper triangles (diagonal excluded) of the RDMs of tasks a and b.
* Transfer (branched-networks paper): per task t a tournament matrix ``W_t[a,b]`` = fraction of held-out samples on
  which the encoder bottom of task a gives task t a lower loss than the bottom of task b; the normalised
  principal eigenvector of W_t is the performance vector P[t]; ``A = (P + Pᵀ) / 2``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import rankdata


def rdm(features: np.ndarray) -> np.ndarray:
    """[K, F] features (one row per image) -> [K, K] representation dissimilarity matrix 1 − Pearson."""
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norm > 0, norm, 1.0)  # a constant row correlates 0 with everything
    return 1.0 - x @ x.T


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.triu_indices(matrix.shape[0], k=1)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when either input is constant."""
    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def rsa_affinity(rdms: Sequence[np.ndarray]) -> np.ndarray:
    """[N, N] Spearman correlations between the upper triangles of the N tasks' RDMs at one branch point."""
    tri = [upper_triangle(r) for r in rdms]
    n = len(tri)
    out = np.eye(n)
    for a in range(n):
        for b in range(a + 1, n):
            out[a, b] = out[b, a] = spearman(tri[a], tri[b])
    return out


def tournament_matrix(losses: np.ndarray) -> np.ndarray:
    """[N_encoders, K] per-sample losses of one task -> W[a,b] = fraction of samples where a's loss < b's."""
    losses = np.asarray(losses, dtype=np.float64)
    return (losses[:, None, :] < losses[None, :, :]).mean(axis=2)


def principal_eigenvector(matrix: np.ndarray) -> np.ndarray:
    """The nonnegative eigenvector of the largest real eigenvalue of a nonnegative matrix, scaled to sum 1."""
    values, vectors = np.linalg.eig(np.asarray(matrix, dtype=np.float64))
    v = np.real(vectors[:, int(np.argmax(np.real(values)))])
    v = np.abs(v) if v.sum() >= 0 else np.abs(-v)  # Perron vector: one sign (zeros where the matrix is reducible)
    total = v.sum()
    return v / total if total > 0 else np.full(len(v), 1.0 / len(v))


def transfer_affinity(losses: np.ndarray) -> np.ndarray:
    """[N_tasks t, N_encoders a, K] per-sample losses at one depth -> A = (P + Pᵀ)/2, P[t] = performance vector."""
    P = np.stack([principal_eigenvector(tournament_matrix(losses[t])) for t in range(len(losses))])
    return (P + P.T) / 2
