"""torch.optim.LBFGS per item of a group (batched.py's companion): ring buffers of curvature pairs per
item and the two-loop recursion solved for all items at once.

torch's two-loop recursion is 2 x history dependent dot products and updates: ~25 small kernels per
history pair, ~1,200 launches per iteration at history 50, which leaves a GPU idle between launches
at B = 1 (a 512 px VGG pass is about a millisecond on an H200). Both loops are triangular systems
in the pairs' inner products, so the direction can be a fixed sequence of ~40 kernels whatever the
history: four batched matrix products with the history (its Gram matrices and the gradient's
projections), two unit-triangular solves of (B, m, m), and two products back (``solved=True``).

Which one runs: torch's order (``two_loop_direction``, the default), because a group's item then
follows its single run as closely as the batched convolutions allow. The solved form is the same
arithmetic rounded in another order and less accurately (measured on CPU against a float64 two-loop:
1e-6 of the direction against 1e-7, the Gram products' long sums), which L-BFGS amplifies over steps;
on CPU it is 4-7x faster per direction (bench/gpu.py --quick, "L-BFGS direction"). It is an option
(``run_group(lbfgs_solved=True)``) until bench/gpu.py has measured both on a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

logger = logging.getLogger(__name__)

CURVATURE_MIN = 1e-10  # torch.optim.LBFGS keeps a pair only when y.s exceeds this


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, N) . (B, N) -> (B,)."""
    return (a * b).sum(dim=1)


class BatchedLBFGS:
    """torch.optim.LBFGS with max_iter=1, no line search and zero tolerances (optim.Stepper's), per
    item: one gradient in, one step out, the curvature history in ring buffers of ``history`` pairs.

    Item b's ring: the newest pair at slot ``(head[b] - 1) % history``; an empty slot has rho 0, so it
    adds nothing to the direction. Items accept pairs at different iterations, so each has its own
    head (the direction puts each item's slots in its own order)."""

    def __init__(self, x: torch.Tensor, history: int, *, solved: bool = False) -> None:
        b, n = x.shape[0], x[0].numel()
        self.h, self.solved = history, solved
        dev, dt = x.device, x.dtype
        self.S = torch.zeros(b, history, n, device=dev, dtype=dt)  # steps s = d * t, by slot
        self.Y = torch.zeros(b, history, n, device=dev, dtype=dt)  # gradient changes y
        self.rho = torch.zeros(b, history, device=dev, dtype=dt)  # 1 / y.s; 0: empty
        self.head = torch.zeros(b, dtype=torch.long, device=dev)  # the next slot to write
        self.count = torch.zeros(b, dtype=torch.long, device=dev)  # pairs held
        self.n_iter = torch.zeros(b, dtype=torch.long, device=dev)  # iterations since a reset
        self.d = torch.zeros(b, n, device=dev, dtype=dt)  # the last direction
        self.t = torch.zeros(b, device=dev, dtype=dt)  # its step length
        self.H_diag = torch.ones(b, device=dev, dtype=dt)
        self.prev_g = torch.zeros(b, n, device=dev, dtype=dt)
        self.rows = torch.arange(b, device=dev)
        self.iters = 0  # host: steps since the group's scale began (bounds the slots in use)

    @torch.no_grad()
    def step(self, x: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor, take: torch.Tensor) -> None:
        """One iteration of each item where ``take``: the pair from the last step enters its history
        (when y.s > CURVATURE_MIN), the two-loop recursion gives the direction, x moves by t * d
        unless d is not a descent direction (torch stops before moving then, keeping its state)."""
        g = grad.reshape(grad.shape[0], -1)  # (B, N)
        first = self.n_iter == 0
        y, s = g - self.prev_g, self.d * self.t[:, None]
        ys = _dot(y, s)
        accept = take & ~first & (ys > CURVATURE_MIN)
        self._remember(accept, s, y, ys)
        self.iters += 1
        d = torch.where(first[:, None], -g, self.direction(g))
        t = torch.where(first, torch.clamp(1.0 / g.abs().sum(dim=1), max=1.0) * lr, lr.to(g.dtype))
        move = take & (_dot(g, d) <= 0)
        flat = x.view(x.shape[0], -1)
        flat.add_(torch.where(move[:, None], d * t[:, None], torch.zeros_like(d)))
        keep = take[:, None]
        self.d = torch.where(keep, d, self.d)
        self.t = torch.where(take, t, self.t)
        self.prev_g = torch.where(keep, g, self.prev_g)
        self.n_iter = self.n_iter + take.long()

    def _remember(self, accept: torch.Tensor, s: torch.Tensor, y: torch.Tensor, ys: torch.Tensor) -> None:
        rows, slot, a = self.rows, self.head, accept[:, None]
        self.S[rows, slot] = torch.where(a, s, self.S[rows, slot])
        self.Y[rows, slot] = torch.where(a, y, self.Y[rows, slot])
        self.rho[rows, slot] = torch.where(accept, 1.0 / torch.where(accept, ys, 1.0), self.rho[rows, slot])
        yy = _dot(y, y)
        self.H_diag = torch.where(accept, ys / torch.where(accept, yy, 1.0), self.H_diag)
        self.head = torch.where(accept, (self.head + 1) % self.h, self.head)
        self.count = torch.where(accept, torch.clamp(self.count + 1, max=self.h), self.count)

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """-H g for every item (B, N), H its L-BFGS inverse Hessian estimate: torch's two-loop
        recursion, in torch's order or (``solved``) in the solved form."""
        return self.solved_direction(g) if self.solved else two_loop_direction(self, g)

    def solved_direction(self, g: torch.Tensor) -> torch.Tensor:
        """The two-loop recursion as two triangular solves over the history's Gram matrices."""
        with _ieee_matmul():
            return self._solve(g)

    def _solve(self, g: torch.Tensor) -> torch.Tensor:
        # every slot, empty or not (rho 0: it adds an exact 0), so that the shapes, and with them
        # the rounding, do not depend on how long the item has run: an item resumed in another
        # group follows the same path bit for bit
        S, Y, m = self.S, self.Y, self.h  # (B, m, N)
        order = _newest_first(self.head, m)  # (B, m): chronological position -> slot
        rho = self.rho.gather(1, order)  # (B, m), newest first from here on
        sy = _reorder(S @ Y.transpose(1, 2), order)  # (B, m, m): s_i . y_j
        yy = _reorder(Y @ Y.transpose(1, 2), order)  # y_i . y_j
        sg = (S @ g[:, :, None]).squeeze(2).gather(1, order)  # (B, m): s_i . g
        yg = (Y @ g[:, :, None]).squeeze(2).gather(1, order)
        eye = torch.eye(m, device=g.device, dtype=g.dtype)
        # loop 1, newest to oldest: a_i = rho_i s_i . q, q = -g - sum over newer j of a_j y_j
        lower = eye + rho[:, :, None] * sy.tril(-1)
        a: torch.Tensor = torch.linalg.solve_triangular(
            lower, (-rho * sg)[:, :, None], upper=False, unitriangular=True
        )
        gamma = self.H_diag[:, None, None]
        # y_i . r0 with r0 = H_diag * q after loop 1
        yr0 = gamma * (-yg[:, :, None] - yy @ a)
        # loop 2, oldest to newest: c_i = a_i - rho_i y_i . r, r = r0 + sum over older j of c_j s_j
        upper = eye + rho[:, :, None] * sy.transpose(1, 2).triu(1)
        c: torch.Tensor = torch.linalg.solve_triangular(
            upper, a - rho[:, :, None] * yr0, upper=True, unitriangular=True
        )
        back = order.argsort(dim=1)  # slot -> chronological position
        a, c = a.squeeze(2).gather(1, back), c.squeeze(2).gather(1, back)  # by slot again
        # r = H_diag * (-g - sum a_i y_i) + sum c_i s_i
        return -gamma[:, :, 0] * (g + (a[:, None, :] @ Y).squeeze(1)) + (c[:, None, :] @ S).squeeze(1)

    def scale_last_step(self, shrink: torch.Tensor) -> None:
        """A capped step (optim.Stepper._cap_step): the next pair is the step actually taken."""
        self.t = self.t * shrink

    def reset(self, items: torch.Tensor) -> None:
        """Forget the history of these items (a NaN recovery: a fresh L-BFGS, as a single run's).
        Their pairs stay in S and Y (finite: only finite steps are kept) but with rho 0 they add
        nothing, and new pairs overwrite them; not copying S and Y keeps this cheap at every step."""
        self.rho = torch.where(items[:, None], 0.0, self.rho)
        for name in ("head", "count", "n_iter"):
            setattr(self, name, torch.where(items, 0, getattr(self, name)))
        self.H_diag = torch.where(items, 1.0, self.H_diag)

    def item_state(self, b: int, lr: float, loss: float) -> dict[str, Any]:
        """Item b as a torch.optim.LBFGS state_dict (history oldest first), as optim.Stepper makes."""
        param = torch.zeros(self.d.shape[1])
        # the hyperparameters optim.Stepper runs with: load_state_dict takes them from the dict
        opt = torch.optim.LBFGS(
            [param], lr=lr, max_iter=1, history_size=self.h, tolerance_grad=0.0, tolerance_change=0.0
        )
        count, head = int(self.count[b]), int(self.head[b])
        slots = [(head - count + k) % self.h for k in range(count)]
        n_iter = int(self.n_iter[b])
        opt.state[param] = {
            "func_evals": n_iter,
            "n_iter": n_iter,
            "d": self.d[b].detach().cpu().clone(),
            "t": self.t[b].detach().cpu().clone(),
            "old_dirs": [self.Y[b, i].detach().cpu().clone() for i in slots],
            "old_stps": [self.S[b, i].detach().cpu().clone() for i in slots],
            "ro": [self.rho[b, i].detach().cpu().clone() for i in slots],
            "H_diag": self.H_diag[b].detach().cpu().clone(),
            "prev_flat_grad": self.prev_g[b].detach().cpu().clone(),
            "prev_loss": loss,
        }
        return opt.state_dict()

    def load_item(self, b: int, state: dict[str, Any]) -> None:
        """Item b from a torch.optim.LBFGS state_dict (optim.Stepper's; empty: a fresh history):
        its pairs oldest first into slots 0.., the newest last, as item_state reads them."""
        for held in state["state"].values():
            if "d" not in held:  # it returned before its first step (an all-zero gradient)
                continue
            pairs = list(zip(held["old_stps"], held["old_dirs"], held["ro"], strict=True))[-self.h :]
            for k, (s, y, rho) in enumerate(pairs):
                self.S[b, k], self.Y[b, k] = s.to(self.S), y.to(self.Y)
                self.rho[b, k] = torch.as_tensor(rho).to(self.rho)
            self.head[b], self.count[b] = len(pairs) % self.h, len(pairs)
            self.n_iter[b] = int(held["n_iter"])
            self.d[b] = held["d"].to(self.d)
            self.t[b] = torch.as_tensor(held["t"]).to(self.t)
            self.H_diag[b] = torch.as_tensor(held["H_diag"]).to(self.H_diag)
            self.prev_g[b] = held["prev_flat_grad"].to(self.prev_g)
            self.iters = max(self.iters, len(pairs))  # the slots in use cover these pairs


@contextmanager
def _ieee_matmul() -> Iterator[None]:
    """fp32 matrix products in full precision: TF32 (on for VGG on CUDA, losses.fast_cuda_math)
    keeps 10 mantissa bits, far too few for inner products of curvature pairs. A host flag read
    at each launch: no sync."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _newest_first(head: torch.Tensor, h: int) -> torch.Tensor:
    """(B, h): each item's slots from its newest pair to its oldest (a slot's age is
    (head - 1 - slot) mod h; a ring position past the pairs held has rho 0)."""
    slots = torch.arange(h, device=head.device)
    age = (head[:, None] - 1 - slots[None, :]) % h
    return age.argsort(dim=1)


def _reorder(gram: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, m, m) by slot -> by chronological position (rows and columns)."""
    m = order.shape[1]
    rows = gram.gather(1, order[:, :, None].expand(-1, -1, m))
    return rows.gather(2, order[:, None, :].expand(-1, m, -1))


def two_loop_direction(opt: BatchedLBFGS, g: torch.Tensor) -> torch.Tensor:
    """``opt.direction(g)`` in torch.optim.LBFGS's order: the two loops pair by pair (the
    reference the solve form is tested and benchmarked against)."""
    # every pair held is among the newest min(iters, h) ring positions (an empty one adds 0)
    q, alphas, rows, held = -g, [], opt.rows, min(opt.iters, opt.h)
    for k in range(held):  # newest to oldest
        slot = (opt.head - 1 - k) % opt.h
        a = _dot(opt.S[rows, slot], q) * opt.rho[rows, slot]
        q = q - a[:, None] * opt.Y[rows, slot]
        alphas.append(a)
    r = q * opt.H_diag[:, None]
    for k in reversed(range(held)):  # oldest to newest
        slot = (opt.head - 1 - k) % opt.h
        be = _dot(opt.Y[rows, slot], r) * opt.rho[rows, slot]
        r = r + (alphas[k] - be)[:, None] * opt.S[rows, slot]
    return r


__all__ = ["CURVATURE_MIN", "BatchedLBFGS", "two_loop_direction"]
