"""The digits MLP (64 → 64 ReLU → 10 softmax) trained with plain SGD in numpy.

Mirrors the LiteRT model edgefl trains: the same weight names, a loss summed over the
batch and divided by the batch size, fixed batches of 32 and the same remainder policy
(each epoch a seeded permutation, the last partial batch filled up from its start).
"""

from __future__ import annotations

import numpy as np

BATCH = 32
WEIGHT_NAMES = ("dense0_kernel", "dense0_bias", "dense1_kernel", "dense1_bias")


def logits(w: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hidden activations, logits) of the batch ``x``."""
    h = np.maximum(x @ w["dense0_kernel"] + w["dense0_bias"], 0.0)
    return h, h @ w["dense1_kernel"] + w["dense1_bias"]


def train_step(w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, lr: float) -> float:
    """One SGD step on ``(x, y)`` updating ``w`` in place; returns the mean loss."""
    h, z = logits(w, x)
    z = z - z.max(axis=1, keepdims=True)
    exp = np.exp(z)
    probs = exp / exp.sum(axis=1, keepdims=True)
    n = x.shape[0]
    loss = float(-np.log(np.maximum(probs[np.arange(n), y], 1e-12)).mean())
    dz = probs
    dz[np.arange(n), y] -= 1.0
    dz /= n
    dh = (dz @ w["dense1_kernel"].T) * (h > 0)
    grads = {
        "dense1_kernel": h.T @ dz,
        "dense1_bias": dz.sum(axis=0),
        "dense0_kernel": x.T @ dh,
        "dense0_bias": dh.sum(axis=0),
    }
    for name, grad in grads.items():
        w[name] -= (lr * grad).astype(w[name].dtype)
    return loss


def fit(
    w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, seed: int
) -> float:
    """Train ``epochs`` passes in shuffled batches of :data:`BATCH`; returns the last loss."""
    n = x.shape[0]
    steps = -(-n // BATCH)
    rng = np.random.default_rng(seed)
    loss = float("nan")
    for _ in range(epochs):
        order = np.resize(rng.permutation(n), steps * BATCH)
        for s in range(steps):
            idx = order[s * BATCH : (s + 1) * BATCH]
            loss = train_step(w, x[idx], y[idx], lr)
    return loss


def accuracy(w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Share of ``x`` classified as ``y``."""
    return float((logits(w, x)[1].argmax(axis=1) == y).mean())
