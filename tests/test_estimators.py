"""Estimators that beat uniform sampling (curvlab.estimators), on synthetic populations.

The populations mimic per-sample curvatures ``c_d = v^T H_d v`` of a well-fit network: a
proxy ``s_d`` (think ``1 - p_y``) that is near zero for most samples, and ``c_d`` whose size
grows with ``s_d`` times a heavy-tailed (log-normal) factor, so that the top 5 % of samples
carry about half of ``sum |c_d|``.  ``top``: positive values (an outlier direction); ``bottom``:
signed values with a small negative mean (``lambda_min`` near zero).  The truth is the exact
population mean.

Each estimator is drawn ``R = 2000`` times (seed fixed).  Unbiasedness: the mean of the
estimates lies within 4 Monte-Carlo standard errors of the truth (a false alarm has
probability 6e-5 per check).  Calibration: the share of nominal 95 % intervals
``value +- 1.96 se`` that cover the truth lies in ``[0.925, 0.975]``: the binomial sd of a
coverage share over 2000 draws is 0.5 %, so the band allows 5 sd around 0.95 for noise and
the normal approximation's small-sample error on these skewed populations (measured:
0.932-0.956; plain uniform sampling covers 0.92-0.95 on them).
"""

import math

import pytest
import torch

from curvlab.estimators import (control_variate_mean, defensive_probabilities, importance_mean,
                                neyman_allocation, proxy_strata, stratified_draw, stratified_mean)

D = torch.float64
R = 2000
Z = 1.959964


def _population(kind: str, N: int = 4000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(N, generator=g, dtype=D) ** 4                   # most samples nearly fit
    heavy = torch.exp(torch.randn(N, generator=g, dtype=D))         # log-normal factor
    if kind == "top":
        c = 50 * s * heavy + 0.01 * torch.rand(N, generator=g, dtype=D)
    else:
        c = 20 * s * heavy * torch.randn(N, generator=g, dtype=D) - 0.3 * s
    control = c * 0.8 + 0.3 * c.std() * torch.randn(N, generator=g, dtype=D)  # correlated z
    return s, c, control


def _top_share(c):
    a = c.abs()
    return float(a.topk(len(a) // 20).values.sum() / a.sum())


def _summary(estimates, truth):
    vals = torch.tensor([e.value for e in estimates], dtype=D)
    se = torch.tensor([e.se for e in estimates], dtype=D)
    bias_z = float((vals.mean() - truth) / (vals.std() / math.sqrt(len(vals))))
    cover = float(((vals - truth).abs() <= Z * se).double().mean())
    return bias_z, cover, float(vals.var())


def _uniform(c, t, g):
    idx = torch.randperm(len(c), generator=g)[:t]
    x = c[idx]
    N = len(c)
    return x, float(x.std()) / math.sqrt(t) * math.sqrt(1 - t / N)


@pytest.mark.parametrize("kind", ["top", "bottom"])
def test_population_is_heavy_tailed(kind):
    s, c, _ = _population(kind)
    assert _top_share(c) > 0.35  # a few samples carry most of the curvature


@pytest.mark.parametrize("kind", ["top", "bottom"])
def test_stratified_neyman_is_unbiased_calibrated_and_beats_uniform(kind):
    s, c, _ = _population(kind)
    N, t, truth = len(c), 240, float(c.mean())
    strata = proxy_strata(s, 8)
    sizes = [len(i) for i in strata]
    # spreads from a pilot population (another seed: a previous call's spreads, not the truth)
    s_pilot, c_pilot, _ = _population(kind, seed=1)
    spreads = torch.stack([c_pilot[i].std() for i in proxy_strata(s_pilot, 8)])
    alloc = neyman_allocation(sizes, spreads, t)
    g = torch.Generator().manual_seed(7)
    est = [stratified_mean([c[i] for i in stratified_draw(strata, alloc, g)], sizes) for _ in range(R)]
    bias_z, cover, var = _summary(est, truth)
    assert abs(bias_z) < 4, bias_z
    assert 0.925 <= cover <= 0.975, cover
    var_uniform = float(c.var()) / t * (1 - t / N)
    # the proxy predicts where curvature lives (measured: 2.5x for the signed population, more
    # for the positive one); 2x leaves room for the pilot's stale spreads
    assert var_uniform / var > 2, var_uniform / var


@pytest.mark.parametrize("kind", ["top", "bottom"])
def test_defensive_importance_sampling_is_unbiased_calibrated_and_beats_uniform(kind):
    s, c, _ = _population(kind)
    N, t, truth = len(c), 240, float(c.mean())
    q = defensive_probabilities(s, alpha=0.1)
    assert torch.isclose(q.sum(), torch.tensor(1.0, dtype=D))
    assert float((1 / (N * q)).max()) <= 1 / 0.1 + 1e-9  # weights bounded by 1/alpha
    g = torch.Generator().manual_seed(8)
    est = []
    for _ in range(R):
        idx = torch.multinomial(q, t, replacement=True, generator=g)
        est.append(importance_mean(c[idx], q[idx], N))
    bias_z, cover, var = _summary(est, truth)
    assert abs(bias_z) < 4, bias_z
    assert 0.925 <= cover <= 0.975, cover
    assert float(c.var()) / t / var > 2, float(c.var()) / t / var  # with replacement vs with


@pytest.mark.parametrize("kind", ["top", "bottom"])
def test_control_variate_with_a_fixed_slope_is_unbiased_and_calibrated(kind):
    s, c, z = _population(kind)
    N, t, truth = len(c), 240, float(c.mean())
    # the slope fixed beforehand: fit on a pilot population (another seed)
    _, cp, zp = _population(kind, seed=1)
    beta = float(((zp - zp.mean()) * (cp - cp.mean())).sum() / ((zp - zp.mean()) ** 2).sum())
    g = torch.Generator().manual_seed(9)
    fixed, fitted = [], []
    for _ in range(R):
        idx = torch.randperm(N, generator=g)[:t]
        fixed.append(control_variate_mean(c[idx], z[idx], float(z.mean()), population=N, beta=beta))
        fitted.append(control_variate_mean(c[idx], z[idx], float(z.mean()), population=N))
    bias_z, cover, var = _summary(fixed, truth)
    assert abs(bias_z) < 4, bias_z
    assert 0.925 <= cover <= 0.975, cover
    rho = float(torch.corrcoef(torch.stack([c, z]))[0, 1])
    var_uniform = float(c.var()) / t * (1 - t / N)
    assert var_uniform / var > 0.8 / (1 - rho ** 2), (var_uniform / var, 1 / (1 - rho ** 2))
    # the slope fitted on the draw: biased by O(1/t), a small fraction of the standard error
    vals = torch.tensor([e.value for e in fitted], dtype=D)
    assert abs(float(vals.mean()) - truth) < 0.25 * float(vals.std())


def test_uniform_reference_coverage_for_comparison():
    # the uniform estimator on the same populations: the band above is not looser than what
    # plain sampling achieves (it under-covers a little on the heavy tails)
    for kind in ("top", "bottom"):
        s, c, _ = _population(kind)
        g = torch.Generator().manual_seed(10)
        cover = 0
        for _ in range(R):
            x, se = _uniform(c, 240, g)
            cover += abs(float(x.mean()) - float(c.mean())) <= Z * se
        assert 0.9 <= cover / R <= 0.975, (kind, cover / R)


def test_neyman_allocation_rules():
    sizes = [100, 100, 100, 10]
    spreads = torch.tensor([0.0, 1.0, 3.0, 50.0], dtype=D)
    # N_h S_h with the zero spread floored at 0.1 x pooled (2.90): [29, 100, 300, 500]; the last
    # stratum's share (32.3) is capped at its size 10, the other 50 re-shared: [3.4, 11.7, 35.0]
    assert neyman_allocation(sizes, spreads, 60) == [3, 12, 35, 10]
    # uncapped: proportional to N_h S_h
    assert neyman_allocation([100, 100], torch.tensor([1.0, 3.0], dtype=D), 40, minimum=0) == [10, 30]
    # a floor binds: [2, 2, 6] is Neyman [0.6, 0.6, 8.8] with two strata raised to 2
    assert neyman_allocation([50, 50, 50], torch.tensor([0.1, 0.1, 10.0], dtype=D), 10,
                             spread_floor=0.0) == [2, 2, 6]
    # everything: every stratum whole
    assert neyman_allocation(sizes, spreads, 310) == sizes
    # fewer draws than the minimum allows: one each first, the rest by N_h S_h; sums to total
    t = neyman_allocation(sizes, spreads, 5)
    assert sum(t) == 5 and min(t) >= 1, t
    # no spread anywhere and no floor: proportional to the sizes
    assert neyman_allocation([30, 10], torch.zeros(2, dtype=D), 8, spread_floor=0.0) == [6, 2]
    # floors and caps at once: a 32-sample stratum with a huge spread is capped, the seven
    # others are held at their floor of 8; the total is kept (it once came back as 88)
    t = neyman_allocation([100] * 7 + [32], torch.tensor([1.0] * 7 + [1000.0], dtype=D), 64, minimum=8)
    assert t == [8] * 8, t
    # any sizes, spreads and totals: the sum is the total, every stratum within its floor and size
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        K = int(torch.randint(2, 9, (1,), generator=g))
        n = torch.randint(1, 60, (K,), generator=g).tolist()
        sd = torch.empty(K, dtype=D).exponential_(1.0, generator=g) ** 3
        total = int(torch.randint(K, sum(n) + 1, (1,), generator=g))
        low = 6 if 6 * K <= total else 1
        t = neyman_allocation(n, sd, total, minimum=low, spread_floor=0.0)
        assert sum(t) == total and all(min(low, nh) <= th <= nh for th, nh in zip(t, n)), (n, total, t)
    with pytest.raises(ValueError, match="one draw per stratum"):
        neyman_allocation(sizes, spreads, 3)
    with pytest.raises(ValueError, match="total"):
        neyman_allocation(sizes, spreads, 311)
    with pytest.raises(ValueError, match="spreads"):
        neyman_allocation(sizes, spreads[:2], 10)


def test_importance_and_control_variate_exact_values():
    c = torch.tensor([1.0, 4.0, 2.0, 8.0], dtype=D)
    q = torch.tensor([0.1, 0.4, 0.2, 0.2], dtype=D)
    e = importance_mean(c, q, 10)
    y = c / (10 * q)                                  # [1, 1, 1, 4]
    assert e.value == pytest.approx(1.75) and e.se == pytest.approx(float(y.std()) / 2)
    z = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=D)
    vals = torch.tensor([1.0, 3.0, 4.0, 8.0], dtype=D)
    fixed = control_variate_mean(vals, z, 1.0, population=40, beta=2.0)
    r = vals - 2.0 * z                                # [1, 1, 0, 2]: variance 2/3 (ddof 1)
    assert fixed.value == pytest.approx(4.0 - 2.0 * (1.5 - 1.0))
    assert fixed.se == pytest.approx(math.sqrt(float(r.var()) / 4 * (1 - 4 / 40)))
    fitted = control_variate_mean(vals, z, 1.0)        # slope 2.2, residuals over t - 2
    zc = z - z.mean()
    beta = float((zc * (vals - vals.mean())).sum() / (zc * zc).sum())
    resid = vals - vals.mean() - beta * zc
    assert beta == pytest.approx(2.2) and fitted.value == pytest.approx(4.0 - beta * 0.5)
    assert fitted.se == pytest.approx(math.sqrt(float((resid ** 2).sum()) / 2 / 4))


def test_stratified_mean_formula_and_whole_strata():
    a = torch.tensor([1.0, 2.0, 4.0], dtype=D)
    b = torch.tensor([10.0, 14.0], dtype=D)
    e = stratified_mean([a, b], [30, 10])
    assert e.value == pytest.approx(0.75 * a.mean().item() + 0.25 * b.mean().item())
    var = 0.75 ** 2 * (1 - 3 / 30) * a.var().item() / 3 + 0.25 ** 2 * (1 - 2 / 10) * b.var().item() / 2
    assert e.se == pytest.approx(math.sqrt(var)) and e.samples == 5
    whole = stratified_mean([a, b], [3, 2])   # every stratum drawn whole: the exact mean
    assert whole.se == 0 and whole.value == pytest.approx((a.sum() + b.sum()).item() / 5)
    assert stratified_mean([a, b[:1]], [30, 10]).se == math.inf  # one draw: spread unknown
    with pytest.raises(ValueError, match="at least one draw"):
        stratified_mean([a, b[:0]], [30, 10])
    with pytest.raises(ValueError, match="without replacement"):
        stratified_mean([a, b], [30, 1])


def test_proxy_strata_cover_each_sample_once_in_proxy_order():
    s = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3, 0.7, 0.2], dtype=D)
    parts = proxy_strata(s, 3)
    assert sorted(torch.cat(parts).tolist()) == list(range(7))
    assert max(s[parts[0]]) <= min(s[parts[1]]) and max(s[parts[1]]) <= min(s[parts[2]])
    with pytest.raises(ValueError, match="strata"):
        proxy_strata(s, 8)


def _neyman_sd(s, parts):
    """``sum_h W_h sd_h(s)``: what optimal strata minimise."""
    return sum(len(p) / len(s) * float(s[p].std(unbiased=False)) for p in parts)


def test_optimal_strata_are_the_best_cuts_of_the_proxy():
    g = torch.Generator().manual_seed(0)
    # small N: the grid holds every cut point, so dynamic programming must match brute force
    s = torch.empty(40, dtype=D).exponential_(1.0, generator=g) ** 2
    parts = proxy_strata(s, 3, cut="optimal", min_size=4)
    assert sorted(torch.cat(parts).tolist()) == list(range(40))
    assert all(float(s[a].max()) <= float(s[b].min()) for a, b in zip(parts, parts[1:]))
    assert all(len(p) >= 4 for p in parts) and len(parts) <= 3
    order = torch.sort(s, stable=True).indices
    brute = min(_neyman_sd(s, [order[:i], order[i:j], order[j:]])
                for i in range(4, 37) for j in range(i + 4, 37))
    assert _neyman_sd(s, parts) == pytest.approx(brute, rel=1e-12)
    # tied, ordinal values and every K: the least cost over all cuts into at most K runs
    import itertools
    for trial in range(20):
        x = torch.randint(0, 4, (12,), generator=g).to(D)
        xs = torch.sort(x, stable=True).values
        for K in (2, 3, 4):
            got = proxy_strata(x, K, cut="optimal", min_size=2)
            assert len(got) <= K and all(len(p) >= 2 for p in got)
            assert sorted(torch.cat(got).tolist()) == list(range(12))
            want = min(_neyman_sd(xs, [torch.arange(a, b) for a, b in zip((0,) + c, c + (12,))])
                       for k in range(K) for c in itertools.combinations(range(2, 11), k)
                       if all(b - a >= 2 for a, b in zip((0,) + c, c + (12,))))
            assert _neyman_sd(x, got) == pytest.approx(want, abs=1e-12), (x, K)
    # large N: never worse than equal strata (they are among the candidates: 512 % K == 0),
    # and far better where a few samples carry most of the proxy, which it cuts finest
    heavy = torch.where(torch.rand(50000, generator=g, dtype=D) < 0.05, 40.0, 0.5) * \
        torch.empty(50000, dtype=D).exponential_(1.0, generator=g)
    for x in (torch.rand(50000, generator=g, dtype=D), heavy):
        for K in (2, 4, 8):
            best = proxy_strata(x, K, cut="optimal", min_size=32)
            assert _neyman_sd(x, best) <= _neyman_sd(x, proxy_strata(x, K)) * (1 + 1e-12)
    best = proxy_strata(heavy, 8, cut="optimal", min_size=32)
    assert _neyman_sd(heavy, best) < 0.5 * _neyman_sd(heavy, proxy_strata(heavy, 8))
    assert len(best) == 8 and min(len(p) for p in best) >= 32 and sum(len(p) for p in best[-4:]) < 0.1 * 50000
    # a constant proxy: one stratum (more would not lower anything); too few samples: one
    assert len(proxy_strata(torch.ones(1000, dtype=D), 8, cut="optimal", min_size=32)) == 1
    assert len(proxy_strata(s, 8, cut="optimal", min_size=32)) == 1
    with pytest.raises(ValueError, match="optimal"):
        proxy_strata(s, 3, cut="halving")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="non-negative"):
        defensive_probabilities(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="alpha"):
        defensive_probabilities(torch.tensor([1.0, 1.0]), alpha=0)
    assert torch.equal(defensive_probabilities(torch.zeros(4, dtype=D)), torch.full((4,), 0.25, dtype=D))
    with pytest.raises(ValueError, match="probabilities"):
        importance_mean(torch.ones(3), torch.tensor([0.5, 0.0, 0.5]), 3)
    with pytest.raises(ValueError, match="same length"):
        control_variate_mean(torch.ones(4), torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        proxy_strata(torch.tensor([1.0, float("nan")]), 1)
