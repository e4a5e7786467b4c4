"""Stratified subsamples and holdouts (:mod:`curvlab.strata`, ``extremes(strata=...)``).

The estimator (:func:`curvlab.sampling.stratified_estimate`) is checked on synthetic
populations of dense per-sample matrices with a known mean, heavy-tailed along one direction
(a few samples carry most of the curvature, as on a well-fit network) and stratified by a
noisy proxy of that weight: exact when the holdout is everything, unbiased with calibrated
standard errors otherwise, and its subsample spread is that of the stratified subsample's
quadratic form.  End to end, ``extremes`` with strata is checked against dense Hessians.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import curvlab
from curvlab.sampling import HoldoutAccumulator, span_subsample_se, stratified_estimate
from curvlab.strata import Design, StratifiedOperator

D = torch.float64
Z95 = 1.959964


def _population(N=6000, n=6, seed=0):
    """``A_d = w_d u u^T + noise_d``: ``w_d`` heavy-tailed (5 % of the samples carry most of
    it), and a proxy of ``w_d`` with multiplicative noise (what a per-sample loss gives)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(n, dtype=D)
    u[0] = 1.0
    heavy = torch.rand(N, generator=g, dtype=D) < 0.05
    w = torch.where(heavy, 40.0, 0.5) * torch.empty(N, dtype=D).exponential_(1.0, generator=g)
    B = torch.randn(N, n, n, generator=g, dtype=D) * 0.3
    A = (B + B.transpose(1, 2)) / 2 + w[:, None, None] * torch.outer(u, u)
    proxy = w * torch.empty(N, dtype=D).uniform_(0.5, 2.0, generator=g)
    return A, proxy, u


def _estimate(A, design, alloc, V, holdout_total, population_forms=None, forms_of=None, z=Z95):
    """One stratified estimate of row 0 of ``V`` from per-stratum holdout groups drawn and
    grouped as :func:`curvlab.multilevel._certify` draws them (from all of each stratum)."""
    from curvlab.multilevel import POLICY, _group_sizes
    taken = design.holdout_allocation(holdout_total, alloc, [0] * len(alloc), POLICY.stratum_holdout)
    accs = []
    for h, (t, group) in enumerate(zip(taken, _group_sizes(design, taken))):
        idx = design.holdout_part(h, alloc, 0, t)
        acc = HoldoutAccumulator(V)
        for s in range(0, len(idx), group):
            part = idx[s:s + group]
            c = None if forms_of is None else forms_of(part)
            acc.add(V @ A[part].mean(0), len(part), c)
        accs.append(acc)
    return stratified_estimate(accs, 0, alloc, design.sizes, population_forms, z=z)


def test_stratified_estimate_is_exact_when_the_holdout_is_every_stratum():
    A, proxy, u = _population(N=2000)
    H = A.mean(0)
    design = Design.by_proxy(proxy, 8, torch.Generator().manual_seed(0))
    alloc = design.allocate(400, spreads=[0.1, 0.1, 0.2, 0.3, 0.5, 1, 3, 20])  # far from proportional
    assert len(set(alloc)) > 2 and sum(alloc) == 400
    v = torch.randn(A.shape[1], generator=torch.Generator().manual_seed(1), dtype=D)
    v = v / v.norm()
    est = _estimate(A, design, alloc, v[None], 2000)
    r = float(v @ H @ v)
    res = float((H @ v - r * v).norm())
    assert est.value == pytest.approx(r, rel=1e-12) and est.se == 0.0
    assert est.residual == pytest.approx(res, rel=1e-9)  # no noise left to take out
    assert est.holdout == 2000 and len(est.stratum_std) == 8
    # a partial holdout: the residual is the norm of the stratified mean product off v (the
    # noise left in) plus the margin for the noise's direction (an upper confidence bound)
    from curvlab.multilevel import POLICY
    est = _estimate(A, design, alloc, v[None], 600)
    taken = design.holdout_allocation(600, alloc, [0] * len(alloc), POLICY.stratum_holdout)
    a = sum(w * A[design.holdout_part(h, alloc, 0, t)].mean(0) @ v
            for h, (w, t) in enumerate(zip(design.weights, taken)))
    norm = float((a - float(a @ v) * v).norm())
    assert est.residual_parts[1] == pytest.approx(norm ** 2, rel=1e-9)
    assert est.residual == pytest.approx(norm + est.residual_parts[3], rel=1e-9)
    assert 0 < est.residual_parts[3] < math.inf


def test_post_stratified_holdout_outside_a_uniform_subsample():
    # a uniform S of 400 and a holdout stratified over the samples outside it, grouped as the
    # policy groups it: exact when the holdout is all of them (S's part is m theta_S), and
    # unbiased and covering over 300 draws otherwise (bias within 4 se; coverage at least
    # 91 %: binomial sd 1.3 points around 95 %)
    from curvlab.multilevel import POLICY, _group_sizes
    A, proxy, u = _population(N=3000)
    H = A.mean(0)
    N, m = 3000, 400
    q = torch.einsum("i,dij,j->d", u, A, u)
    truth = float(q.mean())
    values, covered = [], 0
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        S = torch.randperm(N, generator=g)[:m]
        HS = A[S].mean(0)
        theta, res_s = float(u @ HS @ u), float((HS @ u - float(u @ HS @ u) * u).norm())
        strata = Design.by_proxy(proxy, 8, g).outside(S)
        shape = strata.allocate(m)
        assert sum(strata.pools(shape)) == N - m
        taken = strata.holdout_allocation(N if seed == 0 else 600, shape, [0] * 8, POLICY.stratum_holdout)
        accs = []
        for h, (t, group) in enumerate(zip(taken, _group_sizes(strata, taken))):
            idx = strata.holdout_part(h, shape, 0, t)
            assert not bool(torch.isin(idx, S).any())
            acc = HoldoutAccumulator(u[None])
            for s in range(0, len(idx), group):
                acc.add(u[None] @ A[idx[s:s + group]].mean(0), len(idx[s:s + group]))
            accs.append(acc)
        est = stratified_estimate(accs, 0, shape, strata.sizes, pools=strata.pools(shape),
                                  subsample=(m, theta, res_s), z=Z95)
        if seed == 0:  # (the residual: the triangle inequality over S and the rest)
            assert est.value == pytest.approx(truth, rel=1e-12) and est.se == 0.0
            res = float((H @ u - truth * u).norm())
            assert res - 1e-12 <= est.residual <= res + 2 * m / N * res_s
            continue
        values.append(est.value)
        covered += abs(est.value - truth) <= Z95 * est.se
    vals = torch.tensor(values, dtype=D)
    assert abs(float(vals.mean()) - truth) <= 4 * float(vals.std()) / math.sqrt(len(vals))
    assert covered / len(values) >= 0.91, covered


def test_span_spread_is_the_largest_stratified_estimates_over_the_span():
    # span_subsample_se against its definition: for each direction w of the span of two
    # (non-orthogonal) rows, one-row holdouts of w in every stratum and stratified_estimate's
    # subsample_se; the largest over the same grid of angles.  For a stratified S (allocation
    # ms) and a uniform S of m (post-stratified: the population's spread put together from the
    # strata)
    from curvlab.multilevel import POLICY, _group_sizes
    A, proxy, u = _population(N=3000)
    g = torch.Generator().manual_seed(5)
    other = torch.randn(len(u), generator=g, dtype=D)
    V = torch.stack([other / other.norm(), u])  # (the found vector, then one nearer the heavy u)
    perp = V[1] - (V[1] @ V[0]) * V[0]
    perp = perp / perp.norm()
    design = Design.by_proxy(proxy, 6, g)
    alloc = design.allocate(400)
    taken = design.holdout_allocation(900, alloc, [0] * 6, POLICY.stratum_holdout)

    def holdouts(W, cross):
        accs = []
        for h, (t, group) in enumerate(zip(taken, _group_sizes(design, taken))):
            idx = design.holdout_part(h, alloc, 0, t)
            acc = HoldoutAccumulator(W, cross=cross)
            for s in range(0, len(idx), group):
                acc.add(W @ A[idx[s:s + group]].mean(0), len(idx[s:s + group]))
            accs.append(acc)
        return accs

    accs = holdouts(V, True)
    angles = 12
    for kw, sub in ((dict(ms=alloc), None), (dict(m=400), (400, 1.0, 0.0))):
        best = 0.0
        for k in range(angles):
            phi = k * math.pi / angles
            w = math.cos(phi) * V[0] + math.sin(phi) * perp
            est = stratified_estimate(holdouts(w[None], False), 0, alloc, design.sizes, subsample=sub, z=Z95)
            best = max(best, est.subsample_se)
        wide = span_subsample_se(accs, 0, 1, design.sizes, z=Z95, angles=angles, **kw)
        assert wide == pytest.approx(best, rel=1e-9), kw
        own = stratified_estimate([a.row(0) for a in accs], 0, alloc, design.sizes, subsample=sub, z=Z95)
        assert wide > 1.05 * own.subsample_se  # (the span holds u, which spreads more)


def test_post_stratified_residual_bound_covers():
    # v = the top Ritz vector of a uniform S of 400 (of 3,000); a holdout of 600 stratified
    # over the rest, as the policy draws and groups it.  The residual is an upper confidence
    # bound at z = 1.96 (one-sided 2.5 %: 5 of 200 expected, binomial sd 2.2); the norm of
    # the stratified mean product alone (noise left in) is none.
    # Measured: bound below the truth in 0 of 200 (2.0 times it on average); the norm alone in 58.
    from curvlab.multilevel import POLICY, _group_sizes
    A, proxy, u = _population(N=3000, seed=2)
    H = A.mean(0)
    N, m = 3000, 400
    below, below_norm, ratios = 0, 0, []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        S = torch.randperm(N, generator=g)[:m]
        HS = A[S].mean(0)
        vals, vecs = torch.linalg.eigh(HS)
        v = vecs[:, -1]
        strata = Design.by_proxy(proxy, 8, g).outside(S)
        shape = strata.allocate(m)
        taken = strata.holdout_allocation(600, shape, [0] * 8, POLICY.stratum_holdout)
        accs = []
        for h, (t, group) in enumerate(zip(taken, _group_sizes(strata, taken))):
            idx = strata.holdout_part(h, shape, 0, t)
            acc = HoldoutAccumulator(v[None])
            for s in range(0, len(idx), group):
                acc.add(v[None] @ A[idx[s:s + group]].mean(0), len(idx[s:s + group]))
            accs.append(acc)
        est = stratified_estimate(accs, 0, shape, strata.sizes, pools=strata.pools(shape),
                                  subsample=(m, float(vals[-1]), 0.0), z=Z95)
        truth = float((H @ v - float(v @ H @ v) * v).norm())
        below += est.residual < truth
        below_norm += math.sqrt(est.residual_parts[1]) < truth
        ratios.append(est.residual / truth)
    assert below <= 12, below
    assert below_norm >= 15, below_norm
    assert sum(ratios) / len(ratios) < 3.0, sum(ratios) / len(ratios)


@pytest.mark.parametrize("cut", ["equal", "optimal"])
def test_stratified_estimate_is_unbiased_and_its_intervals_cover(cut):
    # 400 draws of a Neyman-allocated subsample of 600 of 6,000 and a holdout of 1,200 in
    # proportion, groups of 4 per stratum.  Bias: within 4 standard errors of the mean of the
    # draws.  Coverage of value +- z se: binomial sd over 400 draws is 1.1 points, so 91-99 %
    # leaves more than 3 sd either side of 95 % (measured: 94.5 %).  The subsample spread
    # (the stratified subsample's quadratic form about the truth) against its empirical sd
    # over the draws: within 15 % (the group estimates have about 12 % relative sd at 4
    # groups per stratum, averaged over 400 draws).  Against uniform sampling of the same
    # 600, the stratified subsample's sd is at least 2x lower on this heavy-tailed population.
    A, proxy, u = _population()
    H = A.mean(0)
    N = A.shape[0]
    truth = float(u @ H @ u)
    q = torch.einsum("i,dij,j->d", u, A, u)
    values, covered, sub_forms, sub_se = [], 0, [], []
    strata = Design.by_proxy(proxy, 8, torch.Generator().manual_seed(0), cut=cut, min_size=32)
    sigma = [float(q[o].std()) for o in strata.orders]
    for seed in range(400):
        design = Design.by_proxy(proxy, 8, torch.Generator().manual_seed(seed), cut=cut, min_size=32)
        alloc = design.allocate(600, spreads=sigma)
        est = _estimate(A, design, alloc, u[None], 1200)
        values.append(est.value)
        covered += abs(est.value - truth) <= Z95 * est.se
        sub_forms.append(sum(w * float(q[design.part(h, 0, a)].mean())
                             for h, (w, a) in enumerate(zip(design.weights, alloc))))
        sub_se.append(est.subsample_se)
    vals = torch.tensor(values, dtype=D)
    assert abs(float(vals.mean()) - truth) <= 4 * float(vals.std()) / math.sqrt(len(vals))
    assert 0.91 <= covered / 400 <= 0.99, covered
    sd_sub = float(torch.tensor(sub_forms, dtype=D).std())
    assert float(torch.tensor(sub_se).mean()) == pytest.approx(sd_sub, rel=0.15)
    uniform_sd = float(q.std()) / math.sqrt(600) * math.sqrt(1 - 600 / N)
    assert uniform_sd >= 2 * sd_sub, (uniform_sd, sd_sub)


def test_optimal_strata_follow_a_heavy_tail_better_than_equal_ones():
    # where 5 % of the samples carry most of the curvature, strata cut where Neyman
    # allocation by the (noisy) proxy gains most lower the Neyman variance (sum_h W_h S_h)^2
    # of the quadratic form itself below that of equal strata (measured: 97x below uniform
    # sampling's against 8.7x), as on the well-fit CNN (BENCHMARKS.md, "Where to cut the strata")
    A, proxy, u = _population()
    q = torch.einsum("i,dij,j->d", u, A, u)

    def neyman_var(cut):
        d = Design.by_proxy(proxy, 8, torch.Generator().manual_seed(0), cut=cut, min_size=32)
        return sum(w * float(q[o].std()) for w, o in zip(d.weights, d.orders)) ** 2
    assert neyman_var("equal") > 3 * neyman_var("optimal"), (neyman_var("equal"), neyman_var("optimal"))


def test_stratified_control_variate_is_unbiased():
    # a variate c_d that follows q_d = u^T A_d u up to noise of sd 0.3 (as the Gauss-Newton
    # part follows the top's quadratic form), with its exact mean over each stratum's rest:
    # the estimate stays unbiased (bias within 4 se of 200 draws), covers (200 draws: binomial
    # sd 1.5 points, so at least 89 %), and its se is far below the plain estimate's
    A, proxy, u = _population(N=3000)
    H = A.mean(0)
    truth = float(u @ H @ u)
    q = torch.einsum("i,dij,j->d", u, A, u)
    c = q - 0.3 * torch.randn(len(q), generator=torch.Generator().manual_seed(5), dtype=D)
    values, covered, ses, plain_ses = [], 0, [], []
    for seed in range(200):
        design = Design.by_proxy(proxy, 4, torch.Generator().manual_seed(seed))
        alloc = design.allocate(300)
        pops = [float(c[o].mean()) for o in design.orders]  # the exact mean per stratum
        est = _estimate(A, design, alloc, u[None], 400, population_forms=pops,
                        forms_of=lambda part: c[part].mean().reshape(1))
        plain = _estimate(A, design, alloc, u[None], 400)
        values.append(est.value)
        covered += abs(est.value - truth) <= Z95 * est.se
        ses.append(est.se)
        plain_ses.append(plain.se)
    vals = torch.tensor(values, dtype=D)
    assert abs(float(vals.mean()) - truth) <= 4 * float(vals.std()) / math.sqrt(len(vals))
    assert 0.89 <= covered / 200 <= 1.0, covered
    assert sum(ses) * 5 < sum(plain_ses)


def test_design_allocation_and_holdout_allocation():
    proxy = torch.arange(100, dtype=D)
    d = Design.by_proxy(proxy, 4, torch.Generator().manual_seed(0))
    assert d.sizes == [25] * 4 and sorted(torch.cat(d.orders).tolist()) == list(range(100))
    assert all(float(proxy[o].max()) < float(proxy[p].min()) for o, p in zip(d.orders, d.orders[1:]))
    assert d.allocate(20) == [5] * 4  # proportional without spreads
    a = d.allocate(20, spreads=[0.0, 0.0, 3.0, 9.0], minimum=2)
    assert sum(a) == 20 and a[0] >= 2 and a[3] > a[2] > a[0]
    t = d.holdout_allocation(40, a, [0] * 4, 3)
    assert sum(t) >= 40 and all(3 <= x <= 25 for x in t) and t[3] > t[0]
    assert d.holdout_allocation(10 ** 6, a, [0] * 4, 3) == [25] * 4  # every stratum at most
    assert d.holdout_allocation(40, a, [20, 0, 0, 0], 3)[0] == 20  # never below what was drawn
    # the holdout's order is independent of the subsample's (it may overlap S)
    assert d.pools(a) == d.sizes and not torch.equal(d.holdout_part(0, a, 0), d.part(0, 0))
    # the gain of allocate()'s allocation over another: equal spreads, proportional: none; all
    # the spread in one stratum of four, at least 2 draws each: allocate gives (2, 2, 2, 14),
    # so sum W^2 s^2 / m_h is (1/16) 16 / 5 against (1/16) 16 / 14: 2.8x
    assert d.neyman_gain([5] * 4, [1.0] * 4) == pytest.approx(1.0)
    assert d.neyman_gain([5] * 4, [0.0, 0.0, 0.0, 4.0], minimum=2) == pytest.approx(2.8)
    assert d.neyman_gain([5] * 4, [math.inf] * 4) == 1.0
    # one stratum: the uniform design (a permutation; S its first m)
    u = Design.uniform(10, torch.Generator().manual_seed(1))
    assert not u.stratified and u.allocate(4) == [4] and u.take([4]).tolist() == u.orders[0][:4].tolist()
    assert u.pools([4]) == [6] and u.holdout_part(0, [4], 1, 3).tolist() == u.orders[0][5:7].tolist()


def test_stratified_operator_is_the_weighted_sum_of_its_strata(tiny_classifier):
    model, X, Y = tiny_classifier
    H = curvlab.HessianOperator(model, F.cross_entropy, (X, Y), batch_size=50)
    losses = H.per_sample_losses()
    assert torch.allclose(losses, F.cross_entropy(model(X), Y, reduction="none"), atol=1e-12)
    d = Design.by_proxy(losses, 3, torch.Generator().manual_seed(0))
    alloc = d.allocate(60, spreads=[1.0, 2.0, 4.0])
    parts = [H.subset(d.part(h, 0, a)) for h, a in enumerate(alloc)]
    S = StratifiedOperator(parts, d.weights)
    V = torch.randn(2, H.n, dtype=D)
    want = sum(w * p.matvec(V) for w, p in zip(d.weights, parts))
    assert torch.allclose(S.matvec(V), want, atol=1e-12) and S.num_samples == 60


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 4, generator=g, dtype=D)
    Y = torch.randint(0, 3, (300,), generator=g)
    return model, X, Y


# -- end to end: extremes with strata against dense Hessians --------------------------------

def _fit_mlp():
    """A classifier fit well (most samples confidently right): its curvature sits on few samples."""
    from test_sampling import _trained_mlp
    return _trained_mlp(noise=0.3, steps=400, adam=True)


@pytest.fixture(scope="module")
def fit_problem():
    from test_sampling import with_truth
    return with_truth(*_fit_mlp())


def _proportional(total, sizes):
    """The allocation without spreads (proportional, with the policy's floor)."""
    from curvlab.estimators import neyman_allocation
    from curvlab.multilevel import POLICY
    return neyman_allocation(list(sizes), torch.ones(len(sizes), dtype=D), total, minimum=POLICY.stratum_min)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_extremes_hold_the_dense_truth(fit_problem, seed):
    # lambda_min's own levels (after lambda_max is certified) are stratified; every interval
    # holds the dense truth.  which="SA": every level is lambda_min's
    from test_sampling import check_end
    model, X, Y, lmin, lmax, slack = fit_problem
    kw = dict(sampling="multilevel", sample_size=200, tol=0.05, tol_min=0.05, seed=seed, batch_size=500)
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), **kw)
    assert r.converged
    check_end(r, "max", lmax, 0.05, slack)
    check_end(r, "min", lmin, 0.05, slack)
    for lv in r.levels:  # stratified exactly where lambda_min is alone
        assert ("allocation" in lv) == (set(lv["ends"]) == {"min"}), lv
        assert "allocation" not in lv or sum(lv["allocation"]) == lv["sample_size"]
    s = curvlab.extremes(model, F.cross_entropy, (X, Y), which="SA", **kw)
    sizes = s.levels[0]["ends"]["min"]["strata_sizes"]  # optimal cuts: the largest losses finest
    assert s.options["strata"] == len(sizes) >= 4 and sum(sizes) == 3000 and sizes[-1] < sizes[0] / 4
    assert s.cost.phases["strata"] == pytest.approx(1000 / 2 / 3000)
    assert all(sum(lv["allocation"]) == lv["sample_size"] for lv in s.levels)
    assert s.levels[0]["allocation"] == _proportional(200, sizes)  # nothing known yet
    check_end(s, "min", lmin, 0.05, slack)


def test_proxies_replace_the_forward_pass_and_bad_ones_raise(fit_problem):
    from test_sampling import check_end
    model, X, Y, lmin, lmax, slack = fit_problem
    kw = dict(sampling="multilevel", sample_size=200, tol_min=0.05, batch_size=500, which="SA")
    losses = F.cross_entropy(model(X), Y, reduction="none").detach()
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), proxies=losses, **kw)
    assert "strata" not in r.cost.phases and r.levels[0]["allocation"]
    check_end(r, "min", lmin, 0.05, slack)
    with pytest.raises(ValueError, match="3000 samples"):
        curvlab.extremes(model, F.cross_entropy, (X, Y), proxies=losses[:10], **kw)
    with pytest.raises(ValueError, match="non-finite"):
        curvlab.extremes(model, F.cross_entropy, (X, Y), proxies=losses * math.nan, **kw)
    with pytest.raises(ValueError, match="1-d tensor"):
        curvlab.extremes(model, F.cross_entropy, (X, Y), proxies=losses[None], **kw)
    with pytest.raises(ValueError, match="strata"):
        curvlab.extremes(model, F.cross_entropy, (X, Y), strata=0, **kw)
    # one stratum: the uniform design, no forward pass
    r1 = curvlab.extremes(model, F.cross_entropy, (X, Y), strata=1, **kw)
    assert r1.options["strata"] == 1 and "strata" not in r1.cost.phases
    assert "allocation" not in r1.levels[0]
    # lambda_max alone never stratifies, and makes no forward pass for it
    r2 = curvlab.extremes(model, F.cross_entropy, (X, Y), **dict(kw, which="LA"))
    assert r2.options["strata"] == 1 and "strata" not in r2.cost.phases


def test_a_warm_start_allocates_by_the_previous_calls_spreads(fit_problem):
    model, X, Y, lmin, lmax, slack = fit_problem
    kw = dict(sampling="multilevel", tol_min=0.05, batch_size=500, which="SA")
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), sample_size=200, **kw)
    sizes = r.levels[0]["ends"]["min"]["strata_sizes"]
    K = len(sizes)
    assert r.levels[0]["allocation"] == _proportional(200, sizes)  # nothing known yet
    spreads = r.levels[-1]["ends"]["min"]["stratum_std"]
    assert K >= 4 and len(spreads) == K and max(spreads) > 3 * min(spreads)  # the curvature sits in a few strata
    r2 = curvlab.extremes(model, F.cross_entropy, (X, Y), init=r, **kw)
    first = r2.levels[0]["allocation"]
    assert first != _proportional(sum(first), sizes) and sum(first) == r2.levels[0]["sample_size"]
    # the stratum with the largest share N_h S_h in the previous call gets the most, or all
    # of itself; the top stratum (the largest losses) is sampled at a higher rate than the bottom
    h = max(range(K), key=lambda h: sizes[h] * spreads[h])
    assert first[h] in (max(first), sizes[h]), (first, spreads)
    assert first[-1] / sizes[-1] > first[0] / sizes[0]


def test_stratified_subsample_bound_keeps_its_spread_when_the_holdout_is_every_stratum(fit_problem,
                                                                                      monkeypatch):
    # as tests/test_sampling.py's uniform case: a holdout of every stratum whole makes the
    # Rayleigh quotient exact, but the subsample bound's spread must stay
    from curvlab import multilevel
    from test_sampling import check_end
    monkeypatch.setattr(multilevel, "POLICY", dataclasses.replace(multilevel.POLICY, first_chunk=10 ** 6))
    model, X, Y, lmin, lmax, slack = fit_problem
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), sampling="multilevel", sample_size=400,
                         tol_min=0.05, batch_size=500, which="SA")
    lv = r.levels[0]["ends"]["min"]
    assert lv["holdout"] == 3000 and lv["standard_error"] == 0.0  # every stratum whole
    lo, hi = lv["interval"]
    assert lo < lv["theta_subsample"] - lv["residual"]  # the subsample side keeps its spread
    check_end(r, "min", lmin, 0.05, slack)


def test_strata_with_nested_targets_and_a_loss_that_cannot_run_per_sample(fit_problem):
    # dict targets: the per-sample losses take them as batches of one; a loss that fails on
    # one sample at a time: a warning, lambda_min's subsamples stay uniform, the answer holds
    from test_sampling import check_end
    model, X, Y, lmin, lmax, slack = fit_problem
    kw = dict(sampling="multilevel", sample_size=200, tol_min=0.05, batch_size=500, which="SA")
    batches = [(X[i:i + 500], {"y": Y[i:i + 500]}) for i in range(0, 3000, 500)]
    r = curvlab.extremes(model, lambda o, t: F.cross_entropy(o, t["y"]), batches, **kw)
    assert r.options["strata"] == len(r.levels[0]["ends"]["min"]["strata_sizes"]) > 1
    check_end(r, "min", lmin, 0.05, slack)

    def batch_only(o, y):  # a loss that needs at least two samples
        if o.shape[0] < 2:
            raise RuntimeError("needs a batch")
        return F.cross_entropy(o, y)
    with pytest.warns(RuntimeWarning, match="per-sample losses unavailable"):
        r = curvlab.extremes(model, batch_only, (X, Y), **kw)
    assert r.options["strata"] == 1 and "strata" not in r.cost.phases
    check_end(r, "min", lmin, 0.05, slack)


def test_a_warm_start_on_other_strata_maps_its_spreads_by_quantile_band(fit_problem):
    # the optimal edges move with the losses from one epoch to the next: a warm start's
    # spreads, measured on strata of other sizes, are mapped onto this call's strata by the
    # quantile bands they cover.  Here the warm start says: all the spread is in the top
    # quarter of the losses (two of eight equal strata); this call's strata in that band get
    # far higher sampling rates than the bottom one (index by index, only the top two would)
    import copy
    model, X, Y, lmin, lmax, slack = fit_problem
    kw = dict(sampling="multilevel", tol_min=0.05, batch_size=500, which="SA")
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), sample_size=200, **kw)
    levels = copy.deepcopy(r.levels)
    for lv in levels:
        if lv["ends"].get("min", {}).get("stratum_std"):
            lv["ends"]["min"]["stratum_std"] = (0.1,) * 6 + (10.0, 10.0)
            lv["ends"]["min"]["strata_sizes"] = [375] * 8
    r2 = curvlab.extremes(model, F.cross_entropy, (X, Y), init=dataclasses.replace(r, levels=levels), **kw)
    sizes = r2.levels[0]["ends"]["min"]["strata_sizes"]
    first = r2.levels[0]["allocation"]
    rate = [a / n for a, n in zip(first, sizes)]
    top = [h for h in range(len(sizes)) if sum(sizes[:h]) >= 0.76 * 3000]  # wholly in the top quarter
    assert len(top) >= 3 and min(rate[h] for h in top) > 3 * rate[0], (sizes, first)


def test_remap_spreads_by_quantile_band():
    from curvlab.strata import remap_spreads
    assert remap_spreads([1.0, 2.0], [50, 50], [50, 50]) == (1.0, 2.0)
    assert remap_spreads([1.0, 3.0], [50, 50], [100]) == pytest.approx((math.sqrt(5.0),))  # variances averaged
    assert remap_spreads([1.0, 3.0], [50, 50], [25, 25, 25, 25]) == pytest.approx((1.0, 1.0, 3.0, 3.0))
    assert remap_spreads([1.0, 3.0], [50, 50], [75, 25]) == pytest.approx((math.sqrt((2 + 9) / 3), 3.0))
    assert remap_spreads([1.0], [50, 50], [100]) == ()  # lengths disagree: nothing known


def test_one_stratum_and_non_finite_losses(fit_problem, monkeypatch):
    # a constant proxy cuts into one stratum: lambda_min's subsamples and holdouts stay uniform
    # (from the level's own order, so the holdout is outside S), and the answer holds
    from test_sampling import check_end
    model, X, Y, lmin, lmax, slack = fit_problem
    kw = dict(sampling="multilevel", sample_size=200, tol_min=0.05, batch_size=500, seed=0)
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), proxies=torch.ones(3000, dtype=D), **kw)
    assert r.options["strata"] == 1 and not any("allocation" in lv for lv in r.levels)
    assert all(not e.get("stratum_std") for lv in r.levels for e in lv["ends"].values())
    check_end(r, "min", lmin, 0.05, slack)
    # per-sample losses with NaN and inf (e.g. all targets ignored): a warning, and the
    # subsamples stay uniform (stratified apart, those samples would fill a stratum whose
    # holdout groups all have a non-finite loss: a crash)
    from curvlab import multilevel
    from curvlab.solve import _Context
    H = curvlab.HessianOperator(model, F.cross_entropy, (X, Y), batch_size=500)
    losses = H.per_sample_losses()
    bad = losses.clone()
    bad[:5] = math.nan
    bad[5:10] = math.inf
    monkeypatch.setattr(type(H), "per_sample_losses", lambda self: bad)
    ctx = _Context(H=H, which="SA", tol=0.01, tol_min=0.05, floor=0.0, max_hvps=100.0, max_basis=40, seed=0,
                   bar=None, callback=None, z=1.96)
    ctx.strata = 8
    with pytest.warns(RuntimeWarning, match="not finite"):
        d = multilevel._min_design(ctx)
    assert d is None and ctx.design is False
    assert "strata" in ctx.phases  # the forward pass was paid for, and is in the record
