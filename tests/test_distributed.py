"""Data-parallel products on torch.distributed (gloo, CPU, loopback).

Every multi-process test starts one process per rank (forked from a
forkserver that has imported torch) with torchrun's environment (RANK,
WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT); each rank runs a
scenario and saves what it computed, and the test compares that against
single-process results computed here.  Each job runs under a hard timeout (the
processes are killed and the test fails), so a hang can never stall CI.  A
scenario also runs under torchrun by hand:
``torchrun --nproc_per_node=2 tests/test_distributed.py products /tmp/out``.

Tolerances: products, gradients and per-sample values differ from the
single-process ones only by the order of float64 additions (per rank first,
then across ranks), ~1e-16 relative per operation: 1e-10 leaves ample margin
but catches a wrong weight (an uneven shard weighted as an even one is off by
~1e-1).  Extremes: 1e-6 relative (the brief's bound); the solver runs the same
steps on products that agree to ~1e-15, so they agree far closer than that.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import curvlab  # noqa: E402
from curvlab import HessianOperator  # noqa: E402
from curvlab.curvature import build_curvature  # noqa: E402
from curvlab.data import as_batches  # noqa: E402
from curvlab.functional import batch_size_of  # noqa: E402
from curvlab.distributed import (DataParallel, PreSharded, global_positions, presharded,  # noqa: E402
                                 shard)

D = torch.float64
N = 13          # samples: 13 over 2 ranks gives shards of 7 and 6
BATCH = 4       # cuts the shards into 4 + 3 and 4 + 2: neither shards nor batches are even
RTOL = 1e-10
EXTREMES_RTOL = 1e-6
JOB_TIMEOUT = 120  # seconds per job, start-up included (2 shared cores: torch imports are slow)


# -- the problem, built identically in every process ---------------------------------

def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


def make_data(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=D)
    X[:, 0] = torch.arange(n, dtype=D)  # feature 0 is the sample's index: lets tests track order
    Y = torch.randint(0, 3, (n,), generator=g)
    return X, Y


def make_block(n_params, k=3, seed=2):
    return torch.randn(k, n_params, generator=torch.Generator().manual_seed(seed), dtype=D)


def list_of_batches(X, Y, size=BATCH):
    return [(X[i:i + size], Y[i:i + size]) for i in range(0, len(X), size)]


def loader(X, Y, size=3, sampler=None):
    ds = torch.utils.data.TensorDataset(X, Y)
    return torch.utils.data.DataLoader(ds, batch_size=size, shuffle=False, sampler=sampler)


def data_kinds(X, Y):
    """The data forms a user may pass; all hold the same N samples."""
    return {"tensors": (X, Y), "batches": list_of_batches(X, Y), "loader": loader(X, Y)}


EXTREMES_KW = dict(dtype=D, batch_size=BATCH, tol=1e-9, tol_min=1e-9, floor=0.0, max_hvps=200)


# -- scenarios (run on every rank; return what the test checks) ----------------------

def _error(fn):
    try:
        fn()
    except Exception as exc:  # recorded for the test to check
        return (type(exc).__name__, str(exc))
    return None


def scenario_products(rank, world):
    model = make_model()
    X, Y = make_data()
    out = {}
    for kind, data in data_kinds(X, Y).items():
        H = HessianOperator(model, F.cross_entropy, data, batch_size=BATCH)
        V = make_block(H.n)
        loss, g = H.loss_and_gradient()
        out[kind] = dict(enabled=H.parallel.enabled, scheme=H.parallel.scheme, N=H.num_samples,
                         local_counts=H.parallel.local_counts, block=H.matvec(V), vec=H.matvec(V[0]),
                         loss=loss, grad=g, curv=H.per_sample_curvature(V[0]),
                         cost=(H.cost.hvps, H.cost.samples, H.cost.passes, H.cost.grad_samples),
                         rank_cost=(H.cost.forward_samples, H.cost.load_passes),
                         ids=H.parallel.gather(lambda: [x[:, 0].clone() for x, _ in H.parallel.local], D))
    # the strided scheme, through the reducer itself
    dp = DataParallel(as_batches((X, Y), BATCH), scheme="strided")
    out["strided_ids"] = dp.gather(lambda: [x[:, 0].clone() for x, _ in dp.local], D)
    # data that each rank already split itself, in the data set's order
    lo, hi = (0, 7) if rank == 0 else (7, N)
    H = HessianOperator(model, F.cross_entropy, presharded((X[lo:hi], Y[lo:hi]), BATCH))
    out["presharded"] = dict(block=H.matvec(make_block(H.n)), scheme=H.parallel.scheme,
                             full_pass=_error(lambda: list(H.batches)))
    # a DataLoader with a DistributedSampler (used as it is when it neither pads nor drops)
    X12, Y12 = make_data(12)
    sampler = torch.utils.data.distributed.DistributedSampler(
        torch.utils.data.TensorDataset(X12, Y12), shuffle=False)
    H = HessianOperator(model, F.cross_entropy, loader(X12, Y12, sampler=sampler))
    out["sampler12"] = dict(block=H.matvec(make_block(H.n)), scheme=H.parallel.scheme, N=H.num_samples,
                            full_pass=_error(lambda: H.batches.subset(torch.arange(3))))
    out["extremes"] = _extremes_summary(curvlab.extremes(model, F.cross_entropy, (X, Y), **EXTREMES_KW))
    out.update(_modes(model, X, Y))
    out["approximations"] = _approximations(model, X, Y)
    out["fingerprints"] = _fingerprints_of_a_multilevel_call(model, X, Y)
    out["failures"] = _failures(rank)
    return out


APPROX = [("diag", {}), ("diag", {"method": "hutchinson", "probes": 6}), ("ggn", {}), ("kfac", {})]
APPROX_SAMPLES = (None, 6, 1)  # all; the first whole batches (4 + 4 = 8); one batch, on rank 0 only


def _approximations(model, X, Y):
    """Each approximation built from the call's data (all of it, or its first batches) on a
    block, and how many samples this rank read: distributed, each rank reads its shard."""
    out = {}
    H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=BATCH)
    for samples in APPROX_SAMPLES:
        for name, options in APPROX:
            A = build_curvature(name, H.fmodel, F.cross_entropy, H.parallel, max_samples=samples, **options)
            out[(name, options.get("method"), samples)] = dict(
                matvec=A.matvec(make_block(H.n)), m=A.num_samples, grad_samples=A.cost.grad_samples,
                local=sum(batch_size_of(x) for x, _ in A.loop.parallel.local))
    return out


def _fingerprints_of_a_multilevel_call(model, X, Y) -> int:
    """How many times a multilevel call with a curvature flag computes the weights' fingerprint
    (the agreement all-gather): once, for the call's operator; its subsets skip it."""
    import curvlab.distributed as cd
    calls = []
    original = cd._fingerprint
    cd._fingerprint = lambda fm: calls.append(1) or original(fm)
    try:
        curvlab.extremes(model, F.cross_entropy, (X, Y), sampling="multilevel", sample_size=4,
                         curvature="kfac", approx_samples=6, **EXTREMES_KW)
    finally:
        cd._fingerprint = original
    return len(calls)


def _modes(model, X, Y):
    """The multilevel regime and every curvature flag, as each rank runs them."""
    out = {"multilevel": _extremes_summary(curvlab.extremes(
        model, F.cross_entropy, (X, Y), sampling="multilevel", sample_size=4, **EXTREMES_KW))}
    for c in ("diag", "ggn", "kfac"):
        out[c] = _extremes_summary(curvlab.extremes(model, F.cross_entropy, (X, Y), curvature=c,
                                                    approx_samples=8, approx_rank=2, **EXTREMES_KW))
    return out


def _extremes_summary(r):
    return dict(lambda_max=r.lambda_max, lambda_min=r.lambda_min, vector_max=r.vector_max,
                vector_min=r.vector_min, hvps=r.cost.hvps, num_samples=r.num_samples,
                history=[dict(e) for e in r.history], levels=len(r.levels))


def _failures(rank):
    """Errors that all ranks see at the same collective: the job stays usable."""
    model = make_model()
    X, Y = make_data()
    out = {}

    def loss_raising_on_rank1(output, target):
        if rank == 1:
            raise ArithmeticError("boom on rank 1")
        return F.cross_entropy(output, target)

    H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=BATCH)
    H.loss_fn = loss_raising_on_rank1  # after the construction-time loss check: the products raise
    out["raise_matvec"] = _error(lambda: H.matvec(make_block(H.n)))
    out["raise_gradient"] = _error(H.loss_and_gradient)
    out["raise_curvature"] = _error(lambda: H.per_sample_curvature(make_block(H.n)[0]))
    Xbad = X.clone()
    Xbad[N - 1, 1] = float("nan")  # sample 12: in rank 1's contiguous shard [7, 13)
    H = HessianOperator(model, F.cross_entropy, (Xbad, Y), batch_size=BATCH)
    out["nan_matvec"] = _error(lambda: H.matvec(make_block(H.n)))
    out["nan_curvature"] = _error(lambda: H.per_sample_curvature(make_block(H.n)[0]))
    # data or model that differ across ranks
    out["sizes_differ"] = _error(
        lambda: HessianOperator(model, F.cross_entropy, (X[:N - rank], Y[:N - rank])))
    other = make_model(seed=rank)
    out["params_differ"] = _error(lambda: HessianOperator(other, F.cross_entropy, (X, Y)))
    g = torch.Generator().manual_seed(rank)  # an unseeded shuffle: different order per rank
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=3,
                                           shuffle=True, generator=g)
    out["order_differs"] = _error(lambda: HessianOperator(model, F.cross_entropy, shuffled))
    sampler = torch.utils.data.distributed.DistributedSampler(
        torch.utils.data.TensorDataset(X, Y), shuffle=False)  # 13 over 2: pads one duplicate
    out["sampler_pads"] = _error(lambda: HessianOperator(model, F.cross_entropy, loader(X, Y, sampler=sampler)))
    # after all that, the process group still works
    H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=BATCH)
    out["after"] = H.matvec(make_block(H.n))
    return out


def scenario_world(rank, world):
    """Extremes and a product: compared across world sizes."""
    model = make_model()
    X, Y = make_data()
    H = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=2)
    return dict(block=H.matvec(make_block(H.n)), local_counts=H.parallel.local_counts,
                extremes=_extremes_summary(curvlab.extremes(model, F.cross_entropy, (X, Y), **EXTREMES_KW)))


def scenario_crash(rank, world):
    """A loss that raises on rank 1 inside ``curvlab.extremes``; nothing catches it."""
    def loss(output, target):
        if rank == 1:
            raise ArithmeticError("boom on rank 1")
        return F.cross_entropy(output, target)
    curvlab.extremes(make_model(), loss, make_data(), **EXTREMES_KW)


def scenario_death(rank, world):
    """Rank 1 dies outright in the middle of a data pass; rank 0 must not hang."""
    def loss(output, target):
        if rank == 1:
            os._exit(3)
        return F.cross_entropy(output, target)
    curvlab.extremes(make_model(), loss, make_data(), **EXTREMES_KW)


SCENARIOS = {f.__name__[len("scenario_"):]: f for f in
             (scenario_products, scenario_world, scenario_crash, scenario_death)}


def _worker_main(name: str, outdir: str) -> None:
    """One rank: torchrun's environment variables are set; run ``name``, save its result."""
    from curvlab.distributed import init_from_env
    torch.set_num_threads(1)
    info = init_from_env(backend="gloo", timeout=20)
    try:
        result = SCENARIOS[name](info.rank, info.world_size)
    except BaseException as exc:
        torch.save({"error": (type(exc).__name__, str(exc))}, Path(outdir) / f"rank{info.rank}.pt")
        raise
    torch.save(result, Path(outdir) / f"rank{info.rank}.pt")
    torch.distributed.destroy_process_group()


def _rank_process(name: str, outdir: str, rank: int, world: int, port: int) -> None:
    """Entry of a forked rank: torchrun's environment, output to ``outdir/rank<r>.log``."""
    log = os.open(Path(outdir) / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    _worker_main(name, outdir)


# -- launching ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    """Ranks are forked from a forkserver that imported torch and curvlab once (and ran
    nothing, so forking it is safe): starting a rank costs milliseconds, not a torch import.
    torch._dynamo is imported lazily by the first torch.func.grad: preloading it saves seconds
    per rank."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "curvlab", __name__])
    return ctx


def launch(name: str, world: int, outdir: Path, timeout: float = JOB_TIMEOUT):
    """Run scenario ``name`` on ``world`` local processes; returns per rank (exitcode, log, result).

    Every rank is killed when the job has not ended after ``timeout`` seconds.
    """
    ctx, port = _context(), _free_port()
    procs = [ctx.Process(target=_rank_process, args=(name, str(outdir), rank, world, port))
             for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.exitcode is None]
    for rank in hung:
        procs[rank].kill()
        procs[rank].join()
    logs = [(outdir / f"rank{r}.log").read_text() if (outdir / f"rank{r}.log").exists() else ""
            for r in range(world)]
    if hung:
        pytest.fail(f"distributed job {name!r}: ranks {hung} of {world} did not end within "
                    f"{timeout} s; rank 0 said:\n{logs[0][-2000:]}")
    results = []
    for rank in range(world):
        f = outdir / f"rank{rank}.pt"
        results.append(torch.load(f, weights_only=False) if f.exists() else None)
    return [(p.exitcode, log, r) for p, log, r in zip(procs, logs, results)]


def _ok(job):
    for rank, (rc, output, result) in enumerate(job):
        assert rc == 0, f"rank {rank} exited with {rc}:\n{output[-3000:]}"
    return [r for _, _, r in job]


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    return _ok(launch("products", 2, tmp_path_factory.mktemp("products")))


@pytest.fixture(scope="module")
def failures(products):
    return [r["failures"] for r in products]


@pytest.fixture(scope="module")
def reference():
    """Single-process results (this pytest process has no process group)."""
    model = make_model()
    X, Y = make_data()
    out = {}
    for kind, data in data_kinds(X, Y).items():
        H = HessianOperator(model, F.cross_entropy, data, batch_size=BATCH)
        assert not H.parallel.enabled
        V = make_block(H.n)
        loss, g = H.loss_and_gradient()
        out[kind] = dict(block=H.matvec(V), vec=H.matvec(V[0]), loss=loss, grad=g,
                         curv=H.per_sample_curvature(V[0]),
                         cost=(H.cost.hvps, H.cost.samples, H.cost.passes, H.cost.grad_samples),
                         rank_cost=(H.cost.forward_samples, H.cost.load_passes))
    X12, Y12 = make_data(12)
    H12 = HessianOperator(model, F.cross_entropy, (X12, Y12))
    out["sampler12"] = H12.matvec(make_block(H12.n))
    out["extremes"] = _extremes_summary(curvlab.extremes(model, F.cross_entropy, (X, Y), **EXTREMES_KW))
    out.update(_modes(model, X, Y))
    out["approximations"] = _approximations(model, X, Y)
    out["dense"] = _dense_hessian(model, X, Y)
    return out


def _dense_hessian(model, X, Y):
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]

    def f(flat):
        p = {n: c.view(params[n].shape) for n, c in zip(names, torch.split(flat, sizes))}
        return F.cross_entropy(torch.func.functional_call(model, p, (X,)), Y)

    return torch.func.hessian(f)(torch.cat([p.reshape(-1) for p in params.values()]))


def _rel(a, b):
    a, b = torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D)
    return float((a - b).norm() / b.norm())


# -- equality with one process ------------------------------------------------------

KINDS = ["tensors", "batches", "loader"]


@pytest.mark.parametrize("kind", KINDS)
def test_sharding_is_on_with_uneven_shards(products, kind):
    expected = {"tensors": ("contiguous", [7, 6]),   # 13 samples split 7 + 6
                "batches": ("batches", [8, 5]),      # batches 4,4,4,1: rank 0 takes 0 and 2
                "loader": ("batches", [7, 6])}       # batches 3,3,3,3,1: rank 0 takes 0, 2, 4
    for r in products:
        assert r[kind]["enabled"] and r[kind]["N"] == N
        assert (r[kind]["scheme"], r[kind]["local_counts"]) == expected[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_hvp_block_equals_single_process_and_dense(products, reference, kind):
    V = make_block(reference["dense"].shape[0])
    for r in products:
        assert _rel(r[kind]["block"], reference[kind]["block"]) < RTOL
        assert _rel(r[kind]["block"], V @ reference["dense"]) < RTOL
        assert _rel(r[kind]["vec"], reference["dense"] @ V[0]) < RTOL


@pytest.mark.parametrize("kind", KINDS)
def test_loss_and_gradient_equal_single_process(products, reference, kind):
    for r in products:
        assert abs(r[kind]["loss"] - reference[kind]["loss"]) <= RTOL * abs(reference[kind]["loss"])
        assert _rel(r[kind]["grad"], reference[kind]["grad"]) < RTOL


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_curvature_gathered_in_global_order(products, reference, kind):
    for r in products:
        assert r[kind]["curv"].shape == (N,)
        # elementwise: a value in the wrong place would fail even if the mean were right
        assert torch.allclose(r[kind]["curv"], reference[kind]["curv"], rtol=RTOL, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_gather_restores_sample_order(products, kind):
    for r in products:
        assert torch.equal(r[kind]["ids"], torch.arange(N, dtype=D))


def test_strided_shards_gather_in_order(products):
    for r in products:
        assert torch.equal(r["strided_ids"], torch.arange(N, dtype=D))


@pytest.mark.parametrize("kind", KINDS)
def test_cost_counts_all_ranks(products, reference, kind):
    for r in products:
        assert r[kind]["cost"] == reference[kind]["cost"]


@pytest.mark.parametrize("kind", KINDS)
def test_loss_check_and_counting_pass_count_this_rank(products, reference, kind):
    """forward_samples and load_passes are per rank (documented), unlike the fields above."""
    expected = {"tensors": (8, 0), "batches": (8, 1), "loader": (6, 0)}[kind]  # first batch 4, 4, 3
    assert reference[kind]["rank_cost"] == expected
    for r in products:  # every rank's first batch has the one process's size: not summed over ranks
        assert r[kind]["rank_cost"] == expected


def test_products_bit_identical_across_ranks(products):
    a, b = products
    for kind in KINDS:
        for key in ("block", "vec", "grad", "curv"):
            assert torch.equal(a[kind][key], b[kind][key]), (kind, key)
        assert a[kind]["loss"] == b[kind]["loss"]


def test_presharded_data_reduced_without_resharding(products, reference):
    for r in products:
        assert r["presharded"]["scheme"] == "presharded"
        assert _rel(r["presharded"]["block"], reference["tensors"]["block"]) < RTOL


def test_distributed_sampler_used_as_given(products, reference):
    for r in products:
        assert r["sampler12"]["scheme"] == "presharded" and r["sampler12"]["N"] == 12
        assert _rel(r["sampler12"]["block"], reference["sampler12"]) < RTOL


@pytest.mark.parametrize("kind", ["presharded", "sampler12"])
def test_shard_only_data_refuses_full_data_reads(products, kind):
    # subsampling / curvature approximations would otherwise read a different shard per rank
    for r in products:
        assert r[kind]["full_pass"][0] == "ValueError"
        assert "pass the full data on every rank" in r[kind]["full_pass"][1]


def _check_extremes(results, ref):
    for r in results:
        for key in ("lambda_max", "lambda_min"):
            assert abs(r[key] - ref[key]) <= EXTREMES_RTOL * abs(ref[key]), key
        assert r["num_samples"] == N


def test_extremes_equal_single_process(products, reference):
    _check_extremes([r["extremes"] for r in products], reference["extremes"])
    ev = torch.linalg.eigvalsh(reference["dense"])
    assert abs(reference["extremes"]["lambda_max"] - ev[-1]) <= EXTREMES_RTOL * abs(ev[-1])
    assert abs(reference["extremes"]["lambda_min"] - ev[0]) <= EXTREMES_RTOL * abs(ev[0])


@pytest.mark.parametrize("mode", ["multilevel", "diag", "ggn", "kfac"])
def test_multilevel_and_curvature_flags_under_two_ranks(products, reference, mode):
    # the subsampled regime (its subsets sharded over the ranks, holdout statistics
    # reduced) and each approximation (built data-parallel: each rank reads its shard)
    # give the single process's extremes, and the same bits on both ranks
    _check_extremes([r[mode] for r in products], reference[mode])
    a, b = (r[mode] for r in products)
    assert mode != "multilevel" or a["levels"] == reference[mode]["levels"] >= 1  # a subsample level ran
    assert a["history"] == b["history"] and torch.equal(a["vector_min"], b["vector_min"])
    ev = torch.linalg.eigvalsh(reference["dense"])
    assert abs(reference[mode]["lambda_max"] - ev[-1]) <= EXTREMES_RTOL * abs(ev[-1])
    assert abs(reference[mode]["lambda_min"] - ev[0]) <= EXTREMES_RTOL * abs(ev[0])


@pytest.mark.parametrize("name,method", [(n, o.get("method")) for n, o in APPROX])
@pytest.mark.parametrize("samples", APPROX_SAMPLES)
def test_approximations_built_data_parallel(products, reference, name, method, samples):
    # built from H.parallel, an approximation uses the same samples as one process (all, or the
    # first whole batches), divides its data pass over the ranks (each reads its shard; with
    # one batch, rank 1 reads nothing and still agrees) and equals the single process's
    key = (name, method, samples)
    ref = reference["approximations"][key]
    m = {None: N, 6: 8, 1: BATCH}[samples]
    assert ref["m"] == ref["local"] == m
    for r in products:
        got = r["approximations"][key]
        assert got["m"] == m and got["grad_samples"] == ref["grad_samples"]
        assert torch.allclose(got["matvec"], ref["matvec"], rtol=RTOL, atol=RTOL * ref["matvec"].abs().max())
    shares = sorted(r["approximations"][key]["local"] for r in products)
    assert shares == {None: [6, 7], 6: [4, 4], 1: [0, BATCH]}[samples]


def test_subsets_do_not_repeat_the_agreement_checks(products):
    assert [r["fingerprints"] for r in products] == [1, 1]


def test_extremes_bit_identical_across_ranks(products):
    a, b = (r["extremes"] for r in products)
    assert a["history"] == b["history"]
    assert (a["lambda_max"], a["lambda_min"], a["hvps"]) == (b["lambda_max"], b["lambda_min"], b["hvps"])
    assert torch.equal(a["vector_max"], b["vector_max"]) and torch.equal(a["vector_min"], b["vector_min"])


def test_four_processes_agree_with_one(tmp_path, reference):
    results = _ok(launch("world", 4, tmp_path))
    assert results[0]["local_counts"] == [4, 3, 3, 3]
    for r in results:
        assert _rel(r["block"], reference["tensors"]["block"]) < RTOL
        assert torch.equal(r["block"], results[0]["block"])
    _check_extremes([r["extremes"] for r in results], reference["extremes"])


# -- failures -------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["raise_matvec", "raise_gradient", "raise_curvature"])
def test_raising_rank_reported_on_all_ranks(failures, what):
    own, other = failures[1][what], failures[0][what]
    assert own == ("ArithmeticError", "boom on rank 1")  # the failing rank: its own error
    assert other == ("RuntimeError", "curvlab: rank 1 failed: ArithmeticError: boom on rank 1")


@pytest.mark.parametrize("what, text", [("nan_matvec", "loss is not finite"),
                                        ("nan_curvature", "per-sample curvature is not finite")])
def test_nonfinite_data_on_one_shard_reported_on_all_ranks(failures, what, text):
    assert failures[1][what][0] == "ValueError" and text in failures[1][what][1]
    assert failures[0][what][0] == "RuntimeError"
    assert failures[0][what][1].startswith("curvlab: rank 1 failed: ValueError: ") and text in failures[0][what][1]


@pytest.mark.parametrize("what, text", [("sizes_differ", "pass the FULL data on every rank"),
                                        ("params_differ", "parameters or buffers differ"),
                                        ("order_differs", "shuffle=False"),
                                        ("sampler_pads", "pads with repeats of 1 sample")])
def test_inconsistent_ranks_rejected_on_all_ranks(failures, what, text):
    for r in failures:
        assert r[what][0] == "ValueError" and text in r[what][1], r[what]


def test_process_group_usable_after_failures(failures, reference):
    for r in failures:
        assert _rel(r["after"], reference["tensors"]["block"]) < RTOL


def test_raising_rank_ends_the_job(tmp_path):
    job = launch("crash", 2, tmp_path)
    (rc0, out0, res0), (rc1, out1, res1) = job
    assert rc0 != 0 and rc1 != 0
    assert res1["error"] == ("ArithmeticError", "boom on rank 1")
    assert res0["error"] == ("RuntimeError", "curvlab: rank 1 failed: ArithmeticError: boom on rank 1")
    assert "curvlab: rank 1 failed" in out0


def test_dead_rank_ends_the_job(tmp_path):
    t0 = time.monotonic()
    (rc0, out0, res0), (rc1, _, _) = launch("death", 2, tmp_path)
    assert rc1 == 3
    assert rc0 != 0 and res0 is not None and "error" in res0, out0[-2000:]
    assert time.monotonic() - t0 < JOB_TIMEOUT


# -- single-process pieces ------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["contiguous", "strided"])
@pytest.mark.parametrize("world", [1, 2, 3, 5, 20])
def test_tensor_shards_cover_each_sample_once(scheme, world):
    X, Y = make_data()
    batches = as_batches((X, Y), BATCH)
    parts = [shard(batches, r, world, scheme) for r in range(world)]
    ids = [torch.cat([x[:, 0] for x, _ in p.local]) if len(p.local.X) else torch.zeros(0, dtype=D)
           for p in parts]
    assert sorted(torch.cat(ids).long().tolist()) == list(range(N))
    assert max(map(len, ids)) - min(map(len, ids)) <= 1  # balanced to one sample
    sizes = [[len(x) for x, _ in p.local] for p in parts]
    for pos, got in zip(global_positions(scheme, sizes), ids):
        assert torch.equal(pos.to(D), got)  # positions say where each sample came from


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_batch_shards_round_robin(world):
    X, Y = make_data()
    for data in (list_of_batches(X, Y), loader(X, Y), iter(list_of_batches(X, Y))):
        batches = as_batches(data)
        parts = [shard(batches, r, world) for r in range(world)]
        ids = [[x[:, 0].long().tolist() for x, _ in p.local] for p in parts]
        all_batches = [x[:, 0].long().tolist() for x, _ in batches]
        for r in range(world):
            assert ids[r] == all_batches[r::world]
        sizes = [[len(b) for b in i] for i in ids]
        for pos, i in zip(global_positions("batches", sizes), ids):
            assert pos.tolist() == [s for b in i for s in b]


def test_distributed_true_needs_process_group():
    model = make_model()
    with pytest.raises(ValueError, match="init_process_group"):
        HessianOperator(model, F.cross_entropy, make_data(), distributed=True)


def test_bad_distributed_argument():
    with pytest.raises(TypeError, match="distributed must be None, True or False"):
        HessianOperator(make_model(), F.cross_entropy, make_data(), distributed="yes")


def test_bad_scheme_and_rank():
    batches = as_batches(make_data())
    with pytest.raises(ValueError, match="scheme"):
        shard(batches, 0, 2, "random")
    with pytest.raises(ValueError, match="rank"):
        shard(batches, 2, 2)


def test_presharded_alone_is_plain_data():
    model = make_model()
    X, Y = make_data()
    H = HessianOperator(model, F.cross_entropy, presharded((X, Y), BATCH))
    ref = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=BATCH)
    V = make_block(H.n)
    assert H.num_samples == N and _rel(H.matvec(V), ref.matvec(V)) < RTOL


def test_presharded_cannot_be_subsampled():
    with pytest.raises(ValueError, match="full data"):
        PreSharded(make_data()).subset(torch.arange(3))
    with pytest.raises(ValueError, match="full data"):
        list(PreSharded(make_data()))


def test_presharded_takes_keys():
    """Keys reach a presharded source's batches, or are refused by name for (X, Y) tensors."""
    model = make_model()
    X, Y = make_data()
    ref = HessianOperator(model, F.cross_entropy, (X, Y), batch_size=BATCH)
    V = make_block(ref.n)
    dicts = [{"pixel_values": X[s:s + BATCH], "labels": Y[s:s + BATCH]} for s in range(0, N, BATCH)]
    H = HessianOperator(model, F.cross_entropy, presharded(dicts), input_key="pixel_values",
                        target_key="labels")
    assert H.num_samples == N and _rel(H.matvec(V), ref.matvec(V)) < RTOL
    b = as_batches(presharded((X, Y), BATCH), input_key=0, target_key=1)  # what (X, Y) is anyway
    assert isinstance(b, PreSharded) and sum(len(x) for x, _ in b.part) == N
    with pytest.raises(ValueError, match=r"data is \(X, Y\) tensors.*input_key='x'.*drop input_key"):
        as_batches(presharded((X, Y), BATCH), input_key="x", target_key="y")
    with pytest.raises(ValueError, match=r"made with input_key='pixel_values'"):
        as_batches(presharded(as_batches(dicts, input_key="pixel_values", target_key="labels")),
                   input_key="image", target_key="labels")


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
