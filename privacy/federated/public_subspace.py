"""A low-dimensional subspace of the model's update space, estimated from PUBLIC data only.

User-level central DP adds noise N(0, sigma^2 C^2) to every coordinate of the clipped sum, so its norm grows with
sqrt(dimension) while the clients' signal does not. The clients' gradients, though, live mostly in a few
directions, and gradients on public data (the public speakers that trained the public start) find those directions
without touching private data. Projecting each client update onto the top-k right singular vectors of a matrix of
public gradients, computed at the current global model, and clipping and noising the k coefficients instead of the
d coordinates divides the noise norm by sqrt(d / k) and keeps what of the signal the subspace holds (Zhou, Wu and
Banerjee 2021, "Bypassing the ambient dimension: private SGD with gradient subspace identification"; Yu et al. 2021,
"Do not let privacy overbill utility: gradient embedding perturbation", which also keeps the residual; here it is
dropped). The basis depends on public data and on the released global model only, so the projection is a fixed
public map per round: each client's projected, clipped coefficient vector still has L2 norm <= C, the mechanism is
the same subsampled Gaussian mechanism in k dimensions, and the accounting is unchanged.

Plain numpy / PyTorch; the server (privacy/federated/server_app.py) builds one from its task's public split.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn


def gradient_basis(gradients: np.ndarray, dim: int) -> np.ndarray:
    """The top-`dim` right singular vectors of `gradients` (m x d, one gradient per row) as orthonormal rows (dim x d).

    Not centred: the mean gradient is the direction that matters most. Signs are fixed (largest entry of each row
    positive) so the basis is a function of the gradients alone."""
    gradients = np.asarray(gradients, dtype=np.float64)
    if gradients.ndim != 2:
        raise ValueError(f"gradients: expected a matrix (one gradient per row), got shape {gradients.shape}")
    m, d = gradients.shape
    if not 1 <= dim <= min(m, d):
        raise ValueError(f"public-subspace-dim={dim}: needs 1 <= k <= min(public gradients, parameters) = min({m}, {d})")
    _, _, vt = np.linalg.svd(gradients, full_matrices=False)
    basis = vt[:dim]
    signs = np.sign(basis[np.arange(dim), np.argmax(np.abs(basis), axis=1)])
    return basis * signs[:, None]


class PublicGradientSubspace:
    """Callable (global model state, server round) -> orthonormal basis (k x d) of public-gradient directions.

    build_model(): a fresh model whose trainable parameters are the state's keys; public_batches: the public data as
    batches (one gradient each); loss_fn(model, batch) -> (loss, examples). The basis is computed at the first call
    and again at the first call `refresh_every` or more rounds after the last one (rounds 1, 1 + n, ... when every
    round asks; a round that does not ask, a non-private empty cohort, does not push the next basis back by n), and
    reused in between. The coordinate order is the state's key order, each array raveled, as the strategy
    concatenates updates."""

    def __init__(self, build_model: Callable[[], nn.Module], public_batches: Sequence, loss_fn: Callable,
                 dim: int, refresh_every: int = 1):
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"public-subspace-refresh={refresh_every!r}: expected an integer >= 1 (rounds between bases)")
        if not 1 <= int(dim) <= len(public_batches):
            raise ValueError(f"public-subspace-dim={dim}: needs 1 <= k <= the {len(public_batches)} public gradients "
                             f"(one per public batch)")
        self.build_model, self.public_batches, self.loss_fn = build_model, list(public_batches), loss_fn
        self.dim, self.refresh_every = int(dim), int(refresh_every)
        self.basis: Optional[np.ndarray] = None
        self.computed_at: Optional[int] = None

    def public_gradients(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        """One row per public batch: the gradient of its loss at `state`, in the state's coordinate order."""
        from privacy.federated.task import load_federated_state

        model = self.build_model()
        load_federated_state(model, state)  # the trainable parameters are exactly the state's keys
        params = dict(model.named_parameters())
        order = [params[name] for name in state]
        model.train()
        rows = []
        for batch in self.public_batches:
            model.zero_grad(set_to_none=True)
            loss, _ = self.loss_fn(model, batch)
            grads = torch.autograd.grad(loss, order, allow_unused=True)
            rows.append(np.concatenate([(g if g is not None else torch.zeros_like(p)).detach().double().numpy().ravel()
                                        for g, p in zip(grads, order)]))
        return np.stack(rows)

    def __call__(self, state: Mapping[str, np.ndarray], server_round: int) -> np.ndarray:
        if self.basis is None or int(server_round) - self.computed_at >= self.refresh_every:
            self.basis = gradient_basis(self.public_gradients(state), self.dim)
            self.computed_at = int(server_round)
        return self.basis


def consecutive_batches(dataset, batch_size: int, collate: Callable) -> list:
    """`dataset` in manifest order as batches of `batch_size` consecutive items (one speaker's utterances when the
    split lists each speaker's utterances together and batch_size divides their count); a short last batch is kept."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    items = [dataset[i] for i in range(len(dataset))]
    return [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def task_public_subspace(task, split: str, dim: int, refresh_every: int, batch_size: int) -> PublicGradientSubspace:
    """The subspace of a federated task (privacy/federated/task.py protocol) from its `split` (the public speakers):
    one gradient per `batch_size` consecutive utterances, a client's batch size."""
    if not hasattr(task, "build_split_loader") or task.build_split_loader is None:
        raise TypeError(f"public-subspace-dim={dim}: the task {type(task).__name__} cannot load a whole split "
                        f"(build_split_loader); the public subspace needs its public split {split!r}")
    loader = task.build_split_loader(split)
    batches = consecutive_batches(loader.dataset, batch_size, loader.collate_fn)
    return PublicGradientSubspace(task.build_model, batches, task.loss_fn, dim, refresh_every)


def project(updates: Iterable[np.ndarray], basis: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """(coefficients basis @ u per update, the fraction of each update's squared norm the subspace keeps)."""
    coefficients, kept = [], []
    for update in updates:
        c = basis @ update
        coefficients.append(c)
        total = float(np.dot(update, update))
        kept.append(float(np.dot(c, c)) / total if total > 0 else 1.0)
    return coefficients, np.asarray(kept)
