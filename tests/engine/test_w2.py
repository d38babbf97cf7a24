"""W2 style loss (worker/engine/w2.py): matrix square root, its gradient, and the loss's properties."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from worker.engine.w2 import EPS, moments_to_target, sqrtm, w2_loss


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """These matrices are tiny: a second OpenMP thread only waits, seconds when the other core is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(b: int, c: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    x = torch.randn(b, c, c, generator=_gen(seed), dtype=dtype)
    return x @ x.mT / c + 0.1 * torch.eye(c, dtype=dtype)


def _psd_rank(b: int, c: int, rank: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    x = torch.randn(b, c, rank, generator=_gen(seed), dtype=dtype)
    return x @ x.mT  # rank `rank` < c: c - rank zero eigenvalues


def _feats(
    b: int, c: int, hw: int, seed: int, dead: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Post-ReLU-like features (B, C, H, W), the first `dead` channels all zero."""
    f = (torch.randn(b, c, hw, hw, generator=_gen(seed), dtype=dtype) + 0.3).relu()
    f[:, :dead] = 0
    return f


def _moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = f.flatten(2)  # (B, C, N)
    return flat.mean(-1), flat @ flat.mT / flat.shape[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sqrtm_squares_back_spd(dtype: torch.dtype) -> None:
    a = _spd(3, 16, 0, dtype)
    s = sqrtm(a)
    assert s.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(s @ s, a, atol=tol, rtol=tol)
    torch.testing.assert_close(s, s.mT)
    assert torch.linalg.eigvalsh(s).min() > 0  # the PSD root, not another of the 2^C roots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sqrtm_squares_back_rank_deficient(dtype: torch.dtype) -> None:
    a = _psd_rank(2, 16, 5, 1, dtype)
    s = sqrtm(a)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(s @ s, a, atol=tol * a.abs().max().item(), rtol=0)
    assert torch.linalg.eigvalsh(s.double()).min() > -1e-3  # PSD up to rounding


def test_sqrtm_rejects_non_square() -> None:
    with pytest.raises(ValueError):
        sqrtm(torch.zeros(2, 3, 4))


def test_sqrtm_gradcheck() -> None:
    a = _spd(2, 4, 2).requires_grad_()
    assert torch.autograd.gradcheck(sqrtm, (a,), eps=1e-6, atol=1e-6)


def test_sqrtm_grad_matches_autograd_through_eigh() -> None:
    """Distinct eigenvalues, so eigh's own backward is fine there: the two must agree."""
    a = _spd(2, 6, 3)
    w = torch.randn(2, 6, 6, generator=_gen(4), dtype=torch.float64)  # arbitrary, asymmetric dL/dS
    a1 = a.clone().requires_grad_()
    (sqrtm(a1) * w).sum().backward()
    a2 = a.clone().requires_grad_()
    vals, vecs = torch.linalg.eigh((a2 + a2.mT) / 2)
    ((vecs * vals.sqrt().unsqueeze(-2) @ vecs.mT) * w).sum().backward()
    assert a1.grad is not None and a2.grad is not None
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-9, rtol=1e-7)


def test_sqrtm_grad_finite_rank_deficient() -> None:
    for a in (_psd_rank(2, 12, 3, 5, torch.float32), torch.zeros(1, 4, 4)):
        a.requires_grad_()
        sqrtm(a).diagonal(dim1=-2, dim2=-1).sum().backward()
        assert a.grad is not None and torch.isfinite(a.grad).all()


def test_sqrtm_clamps_negative_eigenvalues() -> None:
    """An indefinite input gets the root of its PSD part (l < 0 -> 0), not of |l| (crowsonkb's abs)."""
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=_gen(24), dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([4.0, 1.0, -1.0, -9.0], dtype=torch.float64)) @ q.T
    want = q @ torch.diag(torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64)) @ q.T
    torch.testing.assert_close(sqrtm(a[None])[0], want)


def test_w2_zero_for_identical_and_positive_otherwise() -> None:
    m, srm = _moments(_feats(2, 16, 12, 6))
    t = moments_to_target(m, srm)
    same = w2_loss(m, srm, t)
    assert same.shape == (2,) and same.dtype == torch.float32
    assert (same.abs() < 1e-5 * t.energy).all()
    m2, srm2 = _moments(_feats(2, 16, 12, 7))
    other = w2_loss(m2, srm2, t)
    assert (other > 1e-2 * t.energy).all()


def test_w2_never_negative_on_identical_fp32() -> None:
    """srm - mu mu^T and the trace round in fp32: unclamped, about half of these come out < 0."""
    for seed in range(10):
        m, srm = _moments(_feats(2, 32, 12, 30 + seed))
        assert (w2_loss(m, srm, moments_to_target(m, srm)) >= 0).all()


def test_w2_clamp_keeps_gradient() -> None:
    """A value below 0 is reported as 0, but its gradient is that of the unclamped expression."""
    m, srm = _moments(_feats(1, 8, 10, 25, dtype=torch.float64))
    mt, srmt = _moments(_feats(1, 8, 10, 26, dtype=torch.float64))
    t = moments_to_target(mt, srmt)
    raw = w2_loss(m, srm, t).item()
    t.cov = t.cov - 2 * raw * torch.eye(8, dtype=torch.float64)  # cov_term - 2 raw < 0
    srm1, srm2 = srm.clone().requires_grad_(), srm.clone().requires_grad_()
    shifted = w2_loss(m, srm1, t)
    torch.testing.assert_close(shifted, (m - mt).pow(2).mean(-1))  # the covariance term reads 0
    shifted.sum().backward()
    w2_loss(m, srm2, moments_to_target(mt, srmt)).sum().backward()  # the shift is constant in srm
    assert srm1.grad is not None and srm2.grad is not None and srm2.grad.abs().sum() > 0
    torch.testing.assert_close(srm1.grad, srm2.grad)


def test_w2_one_channel_closed_form() -> None:
    mu = torch.tensor([[0.3], [-1.0]], dtype=torch.float64)
    sd = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    mu_t = torch.tensor([[1.1], [0.4]], dtype=torch.float64)
    sd_t = torch.tensor([[1.5], [0.25]], dtype=torch.float64)
    srm, srm_t = (sd**2 + mu**2).unsqueeze(-1), (sd_t**2 + mu_t**2).unsqueeze(-1)  # E[x^2], (B, 1, 1)
    loss = w2_loss(mu, srm, moments_to_target(mu_t, srm_t, eps=1e-12), eps=1e-12)
    want = ((mu - mu_t) ** 2 + (sd - sd_t) ** 2).squeeze(-1)
    torch.testing.assert_close(loss, want, atol=1e-9, rtol=1e-9)


def test_w2_diagonal_closed_form() -> None:
    """Commuting (diagonal) covariances: W2^2 / C = mean((mu - mu_t)^2 + (sd - sd_t)^2)."""
    g = _gen(8)
    mu, mu_t = torch.randn(2, 5, generator=g, dtype=torch.float64).unbind(0)
    sd, sd_t = torch.rand(2, 5, generator=g, dtype=torch.float64).add(0.1).unbind(0)
    srm = torch.diag(sd**2) + torch.outer(mu, mu)
    srm_t = torch.diag(sd_t**2) + torch.outer(mu_t, mu_t)
    loss = w2_loss(mu[None], srm[None], moments_to_target(mu_t[None], srm_t[None], eps=0.0), eps=0.0)
    torch.testing.assert_close(loss, ((mu - mu_t) ** 2 + (sd - sd_t) ** 2).mean().view(1))


def test_w2_symmetric() -> None:
    """W2 is a metric; the formula is not visibly symmetric in (C, C_t) for non-commuting C."""
    a, b = (
        _moments(_feats(2, 8, 10, 9, dtype=torch.float64)),
        _moments(_feats(2, 8, 10, 10, dtype=torch.float64)),
    )
    ab = w2_loss(*a, moments_to_target(*b))
    ba = w2_loss(*b, moments_to_target(*a))
    torch.testing.assert_close(ab, ba, atol=1e-10, rtol=1e-8)


def test_w2_covariance_part_translation_invariant() -> None:
    f, g = _feats(2, 8, 10, 11), _feats(2, 8, 10, 12)
    shift = torch.randn(2, 8, 1, 1, generator=_gen(13))
    t = moments_to_target(*_moments(g))
    base = w2_loss(*_moments(f), t)
    mf, _ = _moments(f)
    moved = w2_loss(*_moments(f + shift), t)  # srm changes too; the covariance does not
    mean_change = (mf + shift.flatten(1) - t.mean).pow(2).mean(-1) - (mf - t.mean).pow(2).mean(-1)
    torch.testing.assert_close(moved - base, mean_change, atol=1e-4, rtol=1e-4)
    both = w2_loss(*_moments(f + shift), moments_to_target(*_moments(g + shift)))
    torch.testing.assert_close(both, base, atol=1e-4, rtol=1e-4)


def test_w2_batch_items_independent() -> None:
    f, g = _feats(3, 8, 10, 14), _feats(3, 8, 10, 15)
    t = moments_to_target(*_moments(g))
    x = f.clone().requires_grad_()
    loss = w2_loss(*_moments(x), t)
    (grad,) = torch.autograd.grad(loss[0], x)
    assert grad[0].abs().sum() > 0 and (grad[1:] == 0).all()
    f2 = f.clone()
    f2[1] = _feats(1, 8, 10, 16)[0]
    torch.testing.assert_close(w2_loss(*_moments(f2), t)[[0, 2]], loss.detach()[[0, 2]], atol=0, rtol=0)
    for i in range(3):  # each item alone gives its batched value
        ti = moments_to_target(*_moments(g[i : i + 1]))
        torch.testing.assert_close(w2_loss(*_moments(f[i : i + 1]), ti), loss.detach()[i : i + 1])


@pytest.mark.parametrize("eps", [EPS, 0.0])
def test_w2_finite_grads_dead_channels(eps: float) -> None:
    g = _feats(2, 16, 8, 17, dead=4)
    g[:, 10:12] = 0  # the target has other dead channels too
    t = moments_to_target(*_moments(g), eps=eps)
    x = _feats(2, 16, 8, 18, dead=6).requires_grad_()
    m, srm = _moments(x)
    m.retain_grad()
    srm.retain_grad()
    loss = w2_loss(m, srm, t, eps=eps)
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    loss.sum().backward()
    for grad in (x.grad, m.grad, srm.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_w2_target_fields() -> None:
    g = _feats(2, 8, 10, 19)
    m, srm = _moments(g.requires_grad_())
    t = moments_to_target(m, srm)
    assert not (t.mean.requires_grad or t.cov.requires_grad or t.cov_sqrt.requires_grad)
    torch.testing.assert_close(t.cov_sqrt @ t.cov_sqrt, t.cov, atol=1e-5, rtol=1e-4)
    flat = g.detach().flatten(2)
    cov = torch.stack([torch.cov(fi, correction=0) for fi in flat]) + EPS * torch.eye(8)
    torch.testing.assert_close(t.cov, cov, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(t.energy, m.pow(2).mean(-1) + cov.diagonal(dim1=-2, dim2=-1).mean(-1))
    zero = moments_to_target(torch.zeros(1, 4), torch.zeros(1, 4, 4), eps=0.0)
    assert zero.energy.item() > 0  # floored: a relative loss never divides by 0


def test_w2_autocast_runs_fp32() -> None:
    """Under autocast the matmuls inside would run in bf16 (~3 digits) unless w2 turns it off."""
    m, srm = _moments(_feats(2, 16, 10, 20))
    mt, srmt = _moments(_feats(2, 16, 10, 21))
    want = w2_loss(m, srm, moments_to_target(mt, srmt))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = moments_to_target(mt, srmt)
        got = w2_loss(m, srm, t)
    assert got.dtype == torch.float32 and t.cov_sqrt.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=1e-5)


def test_w2_gradient_descent_matches_target() -> None:
    torch.manual_seed(0)
    t = moments_to_target(*_moments(_feats(1, 8, 16, 22) * 2))
    x = _feats(1, 8, 16, 23).requires_grad_()
    opt = torch.optim.Adam([x], lr=0.05)
    first = w2_loss(*_moments(x), t).item()
    for _ in range(40):  # ~98 % down after 25 steps here
        loss = w2_loss(*_moments(x), t).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = w2_loss(*_moments(x), t).item()
    assert first > 0.1 and last < 0.1 * first, (first, last)
