"""RAIL's analytic heads (Xu et al., NeurIPS 2024, "Advancing Cross-domain Discriminability in
Continual Learning of Vision-Language Models") on top of any CLIP, fused with its zero-shot
probabilities; torch only. A head regresses one-hot labels Y over every class learned so far
from L2-normalised image features x (d,); rows of earlier tasks are 0 in later classes' columns.

    primal:  phi(x) = ReLU(W x), W (D, d) ~ U(-1/sqrt(d), 1/sqrt(d)) drawn once, never trained
             H = (Phi^T Phi + lam I)^-1 Phi^T Y     s(x) = H^T phi(x)       (lam 0.1)
    dual:    k(x, x') = exp(-gamma ||x - x'||^2), X the bank of every feature added
             alpha = (k(X, X) + lam I)^-1 Y         s(x) = k(x, X) alpha    (gamma 0.1, lam 1e-3)
    fusion:  p = softmax(zero-shot logits); q = (1 - beta) p + beta [s(x), 0...] where the top-1
             of p is a learned class, else q = p (beta 0.8); the prediction is argmax q

RAIL updates its heads recursively (its Theorems 1, 2): the same joint solution as above, which here
is solved by Cholesky in float64 from the primal's sums Phi^T Phi, Phi^T Y or the dual's bank."""
import math
import sys

import torch
import torch.nn.functional as F


def _ridge(gram, target, lam):
    """(gram + lam I)^-1 target by Cholesky; where that fails (in floating point, lam too small
    against gram), says so in a line and takes the pseudo-inverse, as RAIL's own update does."""
    system = gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if not info:
        return torch.cholesky_solve(target, factor)
    print(f"RAIL: the ridge system is singular (Cholesky fails at row {int(info)}); solved by its "
          "pseudo-inverse (a larger ridge or another --rail-width avoids it)", file=sys.stderr)
    return torch.linalg.pinv(system, hermitian=True) @ target


class _Head:
    """`added`: the tasks as given (CPU), the head's state: a fresh head given them is the same head
    (X-TAIL: 36 MB of features, not the primal's 1.8 GB sums). Solved when scores follow an add."""

    def __init__(self, device, **positive):
        if bad := [f"{k} {v}" for k, v in positive.items() if not 0 < v < math.inf]:  # NaN too
            raise ValueError(f"RAIL's {', '.join(bad)}: expected finite and > 0")
        self.device, self.added, self.solution = torch.device(device or "cpu"), [], None

    def add(self, features, labels, n_classes):
        """One task: (N, d) normalised features, (N,) labels in [0, n_classes), n_classes all the
        classes seen so far (never fewer than before)."""
        if int(labels.max()) >= n_classes or n_classes < max([0] + [n for *_, n in self.added]):
            raise ValueError(f"labels up to {int(labels.max())} in {n_classes} classes")
        self.added.append((features.detach().cpu(), labels.cpu(), n_classes))
        self.solution = None

    @torch.no_grad()
    def scores(self, features, chunk=4096):
        """(M, C) raw scores (float64) of (M, d) features, C the classes seen so far."""
        if self.solution is None:
            self.solution = self._solve()
        return torch.cat([self._scores(x.to(self.device, torch.float64))
                          for x in features.split(chunk)])

    def _tasks(self, first=0):  # (features (N, d), one-hot targets (N, C)) per task, float64
        return [(x.to(self.device, torch.float64), F.one_hot(y.long(), n).to(self.device,
                 torch.float64)) for x, y, n in self.added[first:]]


class Primal(_Head):  # ridge regression on a fixed random ReLU expansion of width D (RAIL's primal)
    def __init__(self, dim, width=15000, lam=0.1, seed=0, device=None):
        super().__init__(device, width=width, lam=lam)
        # nn.Linear's default init, as RAIL's code, from a generator of its own: W follows the seed
        draw = torch.rand(width, dim, generator=torch.Generator().manual_seed(seed))
        self.expand = ((2 * draw - 1) / math.sqrt(dim)).to(self.device, torch.float64)  # (D, d)
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=self.device)
        self.target, self.lam, self.summed = self.gram.new_zeros(width, 0), lam, 0  # (D, C)

    def phi(self, x):
        return torch.relu(x @ self.expand.T)  # (N, D)

    def _solve(self):
        for x, y in self._tasks(self.summed):  # the tasks added since the last solve
            phi = self.phi(x)
            self.gram += phi.T @ phi
            self.target = F.pad(self.target, (0, y.shape[1] - self.target.shape[1])) + phi.T @ y
        self.summed = len(self.added)
        return _ridge(self.gram, self.target, self.lam)  # H (D, C)

    def _scores(self, x):
        return self.phi(x) @ self.solution


class Dual(_Head):  # kernel ridge regression, a Gaussian kernel on the features (RAIL's dual form)
    def __init__(self, gamma=0.1, lam=1e-3, device=None):
        super().__init__(device, gamma=gamma, lam=lam)
        self.gamma, self.lam = gamma, lam

    def kernel(self, a, b):
        return torch.exp(-self.gamma * torch.cdist(a, b).square())  # (N_a, N_b)

    def _solve(self):
        tasks = self._tasks()
        self.bank = torch.cat([x for x, _ in tasks])  # (N, d)
        target = torch.cat([F.pad(y, (0, tasks[-1][1].shape[1] - y.shape[1])) for _, y in tasks])
        return _ridge(self.kernel(self.bank, self.bank), target, self.lam)  # alpha (N, C)

    def _scores(self, x):
        return self.kernel(x, self.bank) @ self.solution


def fuse(zero_shot_logits, scores, n_seen, beta=0.8):
    """(M, C): the zero-shot softmax, mixed with the head's (M, n_seen) scores (0 further right)
    where its top-1 is among the first n_seen classes, the learned ones. No domain label used."""
    p = zero_shot_logits.softmax(-1)
    s = F.pad(scores.to(p), (0, p.shape[1] - n_seen))  # (M, C)
    return torch.where(p.argmax(-1, keepdim=True) < n_seen, (1 - beta) * p + beta * s, p)


@torch.no_grad()
def add_row(rows, head, train, keep, labels, union, scale):
    """Feed `head` the next task, train = (N, E) features and (N,) labels among its classes, then
    append to rows["acc"] the top-1 accuracy (%) of each test set through the fusion. keep: the
    sets' "features" (N, E) and classes' "texts" (C, E), in task order (eval.evaluate); union: each
    image among all sets' classes (X-TAIL), else its own set's (MTIL: the head's columns of it)."""
    t, texts = len(rows["acc"]), keep["texts"]
    starts = [sum(len(c) for c in texts[:j]) for j in range(len(texts) + 1)]  # global labels
    head.add(train[0], train[1] + starts[t], starts[t + 1])
    every, accuracy = torch.cat(texts), []
    for j, (x, y) in enumerate(zip(keep["features"], labels)):
        s = head.scores(x).to(x.device)  # (N, classes learned)
        if union:
            q = fuse(scale * x @ every.T, s, starts[t + 1]).argmax(-1) - starts[j]
        else:  # before set j is learned, `own` has no column: every row stays zero-shot
            own = s[:, starts[j]:starts[j + 1]]
            q = fuse(scale * x @ texts[j].T, own, own.shape[1]).argmax(-1)
        accuracy.append(100.0 * (q == torch.as_tensor(y, device=q.device)).float().mean().item())
    rows["acc"].append(accuracy)
