"""Data, losses and models as users have them (issue 11): accepted right, or rejected loudly.

Positive cases are checked against dense float64 Hessians; every rejection
checks that the message names the problem and the fix, and that the model is
untouched afterwards (parameters, buffers, requires_grad, training flags, grads).
"""

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import curvlab
from curvlab.data import Batches, as_batches
from curvlab.hvp import HessianOperator
from curvlab.functional import FunctionalModel

from conftest import classification_data, dense_hessian, tiny_mlp

D = torch.float64
TOL = 1e-8
TIGHT = dict(tol=TOL, tol_min=TOL, floor=0.0)


def _dense_extremes(model, X, Y, loss_fn=F.cross_entropy):
    ev = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, X, Y))
    return float(ev[0]), float(ev[-1])


def _check_dense(r, model, X, Y, tol=TOL):
    lmin, lmax = _dense_extremes(model, X, Y)
    slack = 1e-12 * max(abs(lmin), abs(lmax))
    assert r.converged_max and r.converged_min
    assert abs(r.lambda_max - lmax) <= tol * abs(lmax) + slack
    assert abs(r.lambda_min - lmin) <= tol * abs(lmin) + slack
    assert r.interval_max[0] - slack <= lmax <= r.interval_max[1] + slack
    assert r.interval_min[0] - slack <= lmin <= r.interval_min[1] + slack


# -------------------------------------------------------------------- model state

def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: v.dtype for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            [m.training for m in model.modules()], [p.grad for p in model.parameters()])


def _assert_same(model, snap):
    state, dtypes, flags, modes, grads = snap
    for k, v in model.state_dict().items():
        assert v.dtype == dtypes[k], k
        assert torch.equal(v, state[k]), k
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters()) and all(g is None for g in grads)


def _user_model():
    """A model in a state a caller might leave it in: training, one frozen bias, BatchNorm stats."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[1].running_mean.normal_(0, 0.3)
    model.train()
    model[1].eval()
    model[0].bias.requires_grad_(False)
    return model


# -------------------------------------------------------------------- data sets users have

class Augmented(Dataset):
    """Adds fresh noise to every access (random augmentation)."""

    def __init__(self, X, Y, noise=0.1):
        self.X, self.Y, self.noise = X, Y, noise

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i] + self.noise * torch.randn_like(self.X[i]), self.Y[i]


class Dicts(Dataset):
    def __init__(self, X, Y):
        self.X, self.Y = X, Y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return {"pixel_values": self.X[i], "labels": self.Y[i]}


class ListInputs(Dataset):
    """``([x_a, x_b], y)``: default_collate makes the input a list of two tensors."""

    def __init__(self, X, Y):
        self.X, self.Y = X, Y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return [self.X[i, :2], self.X[i, 2:]], self.Y[i]


class Triples(Dataset):
    def __init__(self, X, Y):
        self.X, self.Y = X, Y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.Y[i], i


class Stream(IterableDataset):
    def __init__(self, X, Y, batch=8):
        self.X, self.Y, self.batch = X, Y, batch

    def __iter__(self):
        for s in range(0, len(self.X), self.batch):
            yield self.X[s:s + self.batch], self.Y[s:s + self.batch]


class TwoInputs(nn.Module):
    """Takes a list ``[x_a, x_b]`` (as default_collate gives it); the same function as ``inner``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, xs):
        return self.inner(torch.cat(list(xs), dim=1))


class WithExtra(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out, out.pow(2).sum()


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class DataclassOut(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return Output(self.inner(x), x)


# -------------------------------------------------------------------- accepted, right

def test_shuffled_loader_without_drop_last_gives_the_dense_extremes():
    model = tiny_mlp()
    X, Y = classification_data(40, (5,))
    loader = DataLoader(TensorDataset(X, Y), batch_size=7, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    r = curvlab.extremes(model, F.cross_entropy, loader, **TIGHT)
    _check_dense(r, model, X, Y)
    assert r.cost.passes >= 3  # many passes, each in another order: no false "data changed"
    assert r.cost.load_passes == 0  # N = len(sampler), no counting pass
    assert r.cost.forward_samples == 2 * 7  # the mean-loss check: one batch and its halves


def test_output_fn_picks_the_logits():
    inner = tiny_mlp()
    X, Y = classification_data(30, (5,))
    r = curvlab.extremes(WithExtra(inner), F.cross_entropy, (X, Y), output_fn=lambda out: out[0],
                         batch_size=8, **TIGHT)
    _check_dense(r, inner, X, Y)
    r = curvlab.extremes(DataclassOut(inner), F.cross_entropy, (X, Y),
                         output_fn=lambda out: out.logits, batch_size=8, **TIGHT)
    _check_dense(r, inner, X, Y)


def test_output_fn_in_float32_reaches_the_rounding_probe():
    # a float32 model is checked against float64 products on a few samples: that probe
    # builds its own float64 copy of the model, which must apply output_fn too
    inner = tiny_mlp().float()
    X, Y = classification_data(30, (5,))
    r = curvlab.extremes(WithExtra(inner), F.cross_entropy, (X.float(), Y), output_fn=lambda out: out[0],
                         batch_size=8, tol=1e-4, tol_min=1e-4)
    ev = torch.linalg.eigvalsh(dense_hessian(inner.double(), F.cross_entropy, X, Y))
    assert r.converged_max and r.interval_max[0] <= float(ev[-1]) <= r.interval_max[1]


def test_dict_batches_with_named_keys():
    model = tiny_mlp()
    X, Y = classification_data(30, (5,))
    loader = DataLoader(Dicts(X, Y), batch_size=8)
    r = curvlab.extremes(model, F.cross_entropy, loader, input_key="pixel_values",
                         target_key="labels", **TIGHT)
    _check_dense(r, model, X, Y)
    batches = [{"pixel_values": X[s:s + 8], "labels": Y[s:s + 8], "id": s} for s in range(0, 30, 8)]
    r = curvlab.extremes(model, F.cross_entropy, batches, input_key="pixel_values",
                         target_key="labels", **TIGHT)
    _check_dense(r, model, X, Y)


def test_default_dict_keys_and_integer_positions():
    model = tiny_mlp()
    X, Y = classification_data(20, (5,))
    r = curvlab.extremes(model, F.cross_entropy, [{"input": X, "target": Y}], **TIGHT)
    _check_dense(r, model, X, Y)
    idx = torch.arange(20)
    r = curvlab.extremes(model, F.cross_entropy, [(idx[:9], X[:9], Y[:9]), (idx[9:], X[9:], Y[9:])],
                         input_key=1, target_key=2, **TIGHT)
    _check_dense(r, model, X, Y)


def test_list_inputs_from_default_collate():
    inner = tiny_mlp()
    X, Y = classification_data(30, (5,))
    loader = DataLoader(ListInputs(X, Y), batch_size=8)
    x0, _ = next(iter(loader))
    assert isinstance(x0, list) and len(x0) == 2  # what default_collate makes of it
    r = curvlab.extremes(TwoInputs(inner), F.cross_entropy, loader, **TIGHT)
    _check_dense(r, inner, X, Y)


class TwoArgs(nn.Module):
    """``forward(x_a, x_b)`` (a tuple input is unpacked) or ``forward({"a": x_a, "b": x_b})``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, a, b=None):
        if b is None:
            a, b = a["a"], a["b"]
        return self.inner(torch.cat([a, b], dim=1))


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
def test_whole_data_with_several_input_tensors(kind):
    """``(X, Y)`` whose X is a tuple, list or dict of tensors, cut into batches like tensors."""
    inner = tiny_mlp()
    X, Y = classification_data(30, (5,))
    parts = (X[:, :2], X[:, 2:])
    Xs = {"tuple": parts, "list": list(parts), "dict": dict(a=parts[0], b=parts[1])}[kind]
    model = TwoInputs(inner) if kind == "list" else TwoArgs(inner)
    b = as_batches((Xs, Y), batch_size=8)
    assert b.num_samples == 30 and [len(y) for _, y in b] == [8, 8, 8, 6]
    r = curvlab.extremes(model, F.cross_entropy, (Xs, Y), batch_size=8, **TIGHT)
    _check_dense(r, inner, X, Y)


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_holdout_groups_cut_nested_batches_like_tensors(kind):
    """A holdout's groups (its standard error's degrees of freedom) do not depend on whether a
    batch's input is one tensor or several: before, a batch of a tuple or dict input stayed one
    group (2 groups for a holdout of 64 in batches of 32, against 8)."""
    inner = tiny_mlp()
    X, Y = classification_data(64, (5,))
    parts = (X[:, :2], X[:, 2:])
    Xs = {"tuple": parts, "dict": dict(a=parts[0], b=parts[1])}[kind]
    H1 = HessianOperator(inner, F.cross_entropy, (X, Y), batch_size=32)
    H2 = HessianOperator(TwoArgs(inner), F.cross_entropy, (Xs, Y), batch_size=32)
    V = torch.randn(2, H1.n, generator=torch.Generator().manual_seed(0), dtype=D)
    a1, a2 = H1.holdout_statistics(V, group_size=8), H2.holdout_statistics(V, group_size=8)
    assert a1.groups == a2.groups == 8
    torch.testing.assert_close(a2.P1, a1.P1)
    torch.testing.assert_close(a2.P2, a1.P2)
    assert a2.W1 == a1.W1 and a2.W2 == a1.W2


def test_mapping_inputs_are_counted_and_moved():
    """A ``UserDict``-like input (``BatchEncoding``) is a dict to curvlab: counted, cast, moved."""
    from collections import UserDict
    from curvlab.functional import batch_size_of
    inner = tiny_mlp()
    X, Y = classification_data(30, (5,))
    batches = [(UserDict(a=X[s:s + 8, :2].float(), b=X[s:s + 8, 2:].float()), Y[s:s + 8])
               for s in range(0, 30, 8)]
    assert batch_size_of(batches[0][0]) == 8
    x = FunctionalModel(inner).to_input(batches[0][0])
    assert x["a"].dtype == D and x["b"].dtype == D
    r = curvlab.extremes(TwoArgs(inner), F.cross_entropy, batches, tol=1e-5, tol_min=1e-5, floor=0.0)
    _check_dense(r, inner, X.float().double(), Y, tol=1e-5)


def test_namedtuple_inputs_keep_their_type():
    from collections import namedtuple
    Pair = namedtuple("Pair", "a b")
    X, Y = classification_data(30, (5,))
    xs = Pair(X[:, :2].float(), X[:, 2:].float())
    moved = FunctionalModel(tiny_mlp()).to_input(xs)
    assert type(moved) is Pair and moved.a.dtype == D and torch.equal(moved.b, X[:, 2:].float().double())
    b = as_batches((xs, Y), batch_size=8)  # cut by rows
    x0, _ = next(iter(b))
    assert type(x0) is Pair and len(x0.a) == 8
    assert type(b.subset(torch.tensor([3, 1])).X) is Pair
    loaded = Batches([(Pair(xs.a[s:s + 8], xs.b[s:s + 8]), Y[s:s + 8]) for s in range(0, 30, 8)])
    Xm, Ym = loaded.materialize()  # concatenated, e.g. for subsampling
    assert type(Xm) is Pair and torch.equal(Xm.a, xs.a) and torch.equal(Ym, Y)


def test_namedtuple_inputs_through_extremes():
    # a model taking two tensors, fed as a namedtuple (positional arguments of forward);
    # the mean-loss check and the rounding probe cut such batches into rows
    from collections import namedtuple
    Pair = namedtuple("Pair", "a b")

    class TwoInputs(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, a, b):
            return self.inner(torch.cat([a, b], dim=1))

    inner = tiny_mlp()
    X, Y = classification_data(30, (5,))
    batches = [(Pair(X[i:i + 8, :2], X[i:i + 8, 2:]), Y[i:i + 8]) for i in range(0, 30, 8)]
    r = curvlab.extremes(TwoInputs(inner), F.cross_entropy, batches, **TIGHT)
    _check_dense(r, inner, X, Y)


def test_index_triples():
    model = tiny_mlp()
    X, Y = classification_data(30, (5,))
    r = curvlab.extremes(model, F.cross_entropy, DataLoader(Triples(X, Y), batch_size=8), **TIGHT)
    _check_dense(r, model, X, Y)


def _multilevel(model, data, **kw):
    return curvlab.extremes(model, F.cross_entropy, data, sampling="multilevel", sample_size=16,
                            max_hvps=40, **kw)


def test_multilevel_reads_dict_list_and_shuffled_loaders_like_tensors():
    # subsets of a loader go through its dataset (or one materialized pass): the same samples
    # in the same batches as the (X, Y) tensors, so the same answer to rounding
    inner = tiny_mlp()
    X, Y = classification_data(160, (5,))
    ref = _multilevel(inner, (X, Y), batch_size=8)
    assert ref.levels  # the multilevel path ran
    runs = {
        "dict loader": _multilevel(inner, DataLoader(Dicts(X, Y), batch_size=8),
                                   input_key="pixel_values", target_key="labels"),
        "dict list": _multilevel(inner, [{"pixel_values": X[s:s + 8], "labels": Y[s:s + 8]}
                                         for s in range(0, 160, 8)],
                                 input_key="pixel_values", target_key="labels"),
        "list inputs": _multilevel(TwoInputs(inner), DataLoader(ListInputs(X, Y), batch_size=8)),
        "shuffled": _multilevel(inner, DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True)),
        "triples": _multilevel(inner, [(X[s:s + 8], Y[s:s + 8], torch.arange(s, s + 8))
                                       for s in range(0, 160, 8)]),
    }
    for name, r in runs.items():
        assert len(r.levels) == len(ref.levels), name
        for a, b in ((r.lambda_max, ref.lambda_max), (r.lambda_min, ref.lambda_min)):
            assert math.isclose(a, b, rel_tol=1e-9), (name, a, b)


def test_bfloat16_model_computes_in_float32():
    # the bf16 model's parameters are exactly representable in float32, so computing in
    # float32 on copies is the same arithmetic as on a float32 copy of the model: the two
    # agree to float32 rounding of the solver (1e-6 of lambda_max is ample: they are in fact
    # identical).  Against the float64 dense Hessian of the same (bf16-valued) parameters, the
    # float32 answer is within its residual interval plus float32 rounding of the products,
    # about n * eps32 * ||H|| (n = 57 parameters): 1e3 * eps32 * lambda_max leaves a margin.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.bfloat16)
    X, Y = classification_data(40, (5,))
    X = X.float()
    snap = _snapshot(model)
    kw = dict(tol=1e-4, tol_min=1e-4, floor=0.0, batch_size=16)
    r = curvlab.extremes(model, F.cross_entropy, (X, Y), **kw)
    _assert_same(model, snap)  # still bfloat16, untouched
    assert r.options["dtype"] == "torch.float32"
    assert r.vector_max.dtype == torch.float32 and r.vector_min.dtype == torch.float32
    ref = curvlab.extremes(copy.deepcopy(model).float(), F.cross_entropy, (X, Y), **kw)
    scale = abs(ref.lambda_max)
    assert abs(r.lambda_max - ref.lambda_max) <= 1e-6 * scale
    assert abs(r.lambda_min - ref.lambda_min) <= 1e-6 * scale
    lmin, lmax = _dense_extremes(copy.deepcopy(model).double(), X.double(), Y)
    slack = 1e3 * torch.finfo(torch.float32).eps * abs(lmax)
    assert r.interval_max[0] - slack <= lmax <= r.interval_max[1] + slack
    assert r.interval_min[0] - slack <= lmin <= r.interval_min[1] + slack
    assert abs(r.lambda_max - lmax) <= 1e-4 * abs(lmax) + slack


def test_float16_model_and_hessian_operator_default_to_float32():
    model = tiny_mlp().half()
    X, Y = classification_data(10, (5,))
    H = HessianOperator(model.eval(), F.cross_entropy, (X, Y))
    assert H.dtype == torch.float32 and next(model.parameters()).dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in H.fmodel.params.values())


# -------------------------------------------------------------------- costs

def test_counting_pass_is_avoided_or_reported():
    model = tiny_mlp()
    X, Y = classification_data(30, (5,))

    class Reiterable:
        def __iter__(self):
            return iter([(X[s:s + 8], Y[s:s + 8]) for s in range(0, 30, 8)])

    sources = {
        "sequential loader": (DataLoader(TensorDataset(X, Y), batch_size=8), 0),
        "subset-random loader": (DataLoader(TensorDataset(X, Y), batch_size=8,
                                            sampler=torch.utils.data.SubsetRandomSampler(range(30))), 0),
        "iterable dataset": (DataLoader(Stream(X, Y), batch_size=None), 1),
        "re-iterable": (Reiterable(), 1),
        "tensors": ((X, Y), 0),
    }
    for name, (data, loads) in sources.items():
        r = curvlab.extremes(model, F.cross_entropy, data, batch_size=8, **TIGHT)
        assert r.cost.load_passes == loads, name
        assert r.num_samples == 30, name
        _check_dense(r, model, X, Y)


def test_loss_check_runs_once_per_call_and_is_counted():
    model = tiny_mlp()
    X, Y = classification_data(160, (5,))
    r = _multilevel(model, (X, Y), batch_size=10)
    assert r.levels
    assert r.cost.forward_samples == 2 * 10  # not again for each subsample or holdout operator
    fm = FunctionalModel(model.eval())
    H1 = HessianOperator(None, F.cross_entropy, (X, Y), batch_size=10, fmodel=fm)
    H2 = HessianOperator(None, F.cross_entropy, (X[:20], Y[:20]), batch_size=10, fmodel=fm)
    assert H1.cost.forward_samples == 20 and H2.cost.forward_samples == 0


def test_data_changed_between_materialize_and_a_later_pass():
    X, Y = classification_data(12, (5,))

    class Drifting:
        calls = 0

        def __iter__(self):
            Drifting.calls += 1
            shift = 0.0 if Drifting.calls == 1 else 1e-3
            return iter([(X[:6] + shift, Y[:6]), (X[6:], Y[6:])])

    b = as_batches(Drifting())
    b.materialize()
    with pytest.raises(ValueError, match="data changed between passes"):
        for _ in b:
            pass


def test_same_samples_in_other_batches_pass_the_fingerprint():
    X, Y = classification_data(50, (3, 2))
    orders = [torch.randperm(50, generator=torch.Generator().manual_seed(s)) for s in range(4)]

    class Reshuffled:
        calls = 0

        def __iter__(self):
            p = orders[Reshuffled.calls % 4]
            size = 7 + Reshuffled.calls
            Reshuffled.calls += 1
            return iter([(X[p[s:s + size]], Y[p[s:s + size]]) for s in range(0, 50, size)])

    b = Batches(Reshuffled())
    for _ in range(4):
        assert sum(len(x) for x, _ in b) == 50


# -------------------------------------------------------------------- rejected, loudly

def _shuffled_drop_last(X, Y):
    return DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True, drop_last=True)


def _weighted_ce(out, y):
    return F.cross_entropy(out, y, weight=torch.tensor([1.0, 5.0, 0.2], dtype=out.dtype))


X0, Y0 = classification_data(30, (5,))

# (id, model wrapper, data, kwargs, exception, message regex): each a distinct kind of bad input
BAD = [
    ("loss with reduction='sum'", None, (X0, Y0),
     dict(loss_fn=lambda o, y: F.cross_entropy(o, y, reduction="sum")), ValueError,
     r"not a mean over the batch.*reduction='mean'"),
    ("class-weighted mean loss", None, (X0, Y0), dict(loss_fn=_weighted_ce), ValueError,
     r"not a mean over the batch.*[Cc]lass weights"),
    ("augmenting dataset", None, DataLoader(Augmented(X0, Y0), batch_size=8), {}, ValueError,
     r"data changed between passes.*augmentation"),
    ("shuffle with drop_last", None, _shuffled_drop_last(X0, Y0), {}, ValueError,
     r"data changed between passes.*drop_last=True with shuffle=True"),
    ("augmenting dataset, multilevel", None, DataLoader(Augmented(X0, Y0), batch_size=8),
     dict(sampling="multilevel", sample_size=8), ValueError, r"data changed between passes"),
    ("shuffle with drop_last, multilevel", None, _shuffled_drop_last(X0, Y0),
     dict(sampling="multilevel", sample_size=8), ValueError, r"data changed between passes"),
    ("tuple output without output_fn", WithExtra, (X0, Y0), {}, TypeError,
     r"output is a tuple, not a tensor: pass output_fn="),
    ("dataclass output without output_fn", DataclassOut, (X0, Y0), {}, TypeError,
     r"output is a Output, not a tensor: pass output_fn=.*out\.logits"),
    ("output_fn that fails", None, (X0, Y0), dict(output_fn=lambda out: out.logits), ValueError,
     r"the model \(with output_fn\) raised AttributeError on batch 0.*output_fn does not fit"),
    ("dict batches, no keys given", None, [{"pixel_values": X0, "labels": Y0}], {}, ValueError,
     r"keys 'pixel_values', 'labels' and no 'input', 'target': pass input_key= and target_key="),
    ("dict batches, wrong key", None, [{"pixel_values": X0, "labels": Y0}],
     dict(input_key="image", target_key="labels"), ValueError, r"no 'image'.*input_key="),
    ("string keys on tuple batches", None, [(X0, Y0)], dict(input_key="x", target_key="y"),
     ValueError, r"need dict batches or integer positions"),
    ("input_key of a wrong type", None, (X0, Y0), dict(input_key=["a", "b"]), TypeError,
     r"input_key must be None, a key"),
    ("(X, Y) of different lengths", None, (X0, Y0[:20]), {}, ValueError,
     r"\(X, Y\) with 30 inputs but 20 targets"),
    ("0-dim X", None, (torch.tensor(1.0, dtype=D), Y0), {}, ValueError, r"X is a 0-dim tensor"),
    ("0-dim batch input", None, [(torch.tensor(1.0, dtype=D), Y0[:1])], {}, ValueError,
     r"batch 0: a batch input is a 0-dim tensor.*leading batch dimension"),
    ("targets with other rows than inputs", None, [(X0, Y0[:20])], {}, ValueError,
     r"output has 30 rows but the target 20"),
    ("float class labels", None, (X0, Y0.double()), {}, ValueError,
     r"batch 0 .*target shape \(8,\), torch.float64.*integer targets, e\.g\. Y\.long\(\)"),
    ("class label out of range", None, (X0, Y0 + 3), {}, ValueError,
     r"IndexError on batch 0.*out of range.*number of classes"),
    ("dtype=float16", None, (X0, Y0), dict(dtype=torch.float16), ValueError,
     r"half precision.*torch\.float32 or torch\.float64"),
    ("dtype=bfloat16", None, (X0, Y0), dict(dtype=torch.bfloat16), ValueError, r"half precision"),
    ("integer dtype", None, (X0, Y0), dict(dtype=torch.int64), TypeError, r"dtype must be a floating"),
    ("dtype as a string", None, (X0, Y0), dict(dtype="float64"), TypeError,
     r"dtype must be a torch dtype such as torch\.float32"),
    ("unknown sampling", None, (X0, Y0), dict(sampling="subsample"), ValueError,
     r"sampling must be one of \('auto', 'exact', 'multilevel'\)"),
    ("negative tol_min", None, (X0, Y0), dict(tol_min=-0.1), ValueError,
     r"tol_min must be a finite number > 0"),
    ("nan tol", None, (X0, Y0), dict(tol=float("nan")), ValueError, r"tol must be a finite number > 0"),
    ("infinite tol", None, (X0, Y0), dict(tol=math.inf), ValueError, r"tol must be a finite number > 0"),
    ("nan max_hvps", None, (X0, Y0), dict(max_hvps=float("nan")), ValueError,
     r"max_hvps must be a finite number > 0"),
    ("fractional max_basis", None, (X0, Y0), dict(max_basis=2.5), ValueError,
     r"max_basis must be an int >= 1"),
    ("max_basis 0", None, (X0, Y0), dict(max_basis=0), ValueError, r"max_basis must be an int >= 1"),
    ("sample_size 1", None, (X0, Y0), dict(sample_size=1), ValueError,
     r"sample_size must be an int >= 2.*or None"),
    ("confidence above 1", None, (X0, Y0), dict(confidence=1.5), ValueError,
     r"confidence must be a number in \(0, 1\)"),
    ("confidence as a string", None, (X0, Y0), dict(confidence="high"), ValueError,
     r"confidence must be a number in \(0, 1\)"),
    ("negative floor", None, (X0, Y0), dict(floor=-1e-5), ValueError, r"floor must be a finite number >= 0"),
    ("nan floor", None, (X0, Y0), dict(floor=float("nan")), ValueError, r"floor must be a finite number >= 0"),
    ("loss_fn not callable", None, (X0, Y0), dict(loss_fn="cross_entropy"), TypeError,
     r"loss_fn must be callable.*cross_entropy"),
    ("batch_size 0", None, (X0, Y0), dict(batch_size=0), ValueError, r"batch_size must be an int >= 1"),
    ("fractional batch_size", None, (X0, Y0), dict(batch_size=2.5), ValueError,
     r"batch_size must be an int >= 1"),
    ("bool tol", None, (X0, Y0), dict(tol=True), ValueError, r"tol must be a finite number > 0.*True"),
    ("bool max_basis", None, (X0, Y0), dict(max_basis=True), ValueError, r"max_basis must be an int"),
    ("bool floor", None, (X0, Y0), dict(floor=False), ValueError, r"floor must be a finite number"),
    ("bool batch_size", None, (X0, Y0), dict(batch_size=True), ValueError, r"batch_size must be an int"),
    ("unknown which", None, (X0, Y0), dict(which="max"), ValueError, r"which must be 'both', 'LA' or 'SA'"),
    ("unknown curvature", None, (X0, Y0), dict(curvature="fisher"), ValueError, r"curvature must be one of"),
    ("unknown method", None, (X0, Y0), dict(method="forward"), ValueError, r"method must be one of"),
    ("init of the wrong type", None, (X0, Y0), dict(init={"lambda_max": 1.0}), TypeError,
     r"init must be a previous ExtremesResult"),
    ("output_fn not callable", None, (X0, Y0), dict(output_fn=0), TypeError, r"output_fn must be callable"),
    ("fractional seed", None, (X0, Y0), dict(seed=1.5), ValueError, r"seed must be an int"),
    ("callback not callable", None, (X0, Y0), dict(callback="print"), TypeError, r"callback must be callable"),
    ("progress not a bool", None, (X0, Y0), dict(progress="yes"), TypeError, r"progress must be True or False"),
    ("approx_rank 0", None, (X0, Y0), dict(approx_rank=0), ValueError, r"approx_rank must be an int >= 1"),
    ("keys with (X, Y) tensors", None, (X0, Y0), dict(input_key="pixel_values", target_key="labels"),
     ValueError, r"data is \(X, Y\) tensors.*input_key='pixel_values'.*drop input_key"),
    ("(X, Y) with X a tuple of different lengths", None, ((X0[:, :2], X0[:20, 2:]), Y0), {}, ValueError,
     r"data is \(X, Y\) and the tensors of X have different numbers of samples: \[20, 30\]"),
    ("(X, Y) with X a dict, of other length than Y", None, ({"a": X0}, Y0[:20]), {}, ValueError,
     r"\(X, Y\) with 30 inputs but 20 targets"),
    ("whole data as a dict", None, {"x": X0, "y": Y0}, {}, TypeError, r"data is a dict: pass a DataLoader"),
]


@pytest.mark.parametrize("name, wrap, data, kwargs, exc, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_and_the_model_untouched(name, wrap, data, kwargs, exc, match):
    model = _user_model()
    net = wrap(model) if wrap is not None else model
    snap = _snapshot(model)
    kwargs = dict(kwargs)
    loss_fn = kwargs.pop("loss_fn", F.cross_entropy)
    with pytest.raises(exc, match=match):
        curvlab.extremes(net, loss_fn, data, batch_size=kwargs.pop("batch_size", 8), **kwargs)
    _assert_same(model, snap)


def test_bad_input_suite_covers_at_least_25_kinds():
    assert len({b[0] for b in BAD}) == len(BAD) >= 25


def test_model_errors_are_chained_and_name_the_batch():
    model = _user_model()
    X, Y = classification_data(30, (5,))
    Y = Y.double()  # floating labels: cross_entropy wants class indices
    with pytest.raises(ValueError, match=r"loss_fn raised RuntimeError on batch 0") as info:
        curvlab.extremes(model, F.cross_entropy, (X, Y), batch_size=8)
    assert isinstance(info.value.__cause__, RuntimeError)
    # on a later batch (the check reads the first one only): named by its index
    batches = [(X[:8], Y[:8].long()), (X[8:16], Y[8:16].long()), (X[16:], Y[16:] + 0.5)]
    with pytest.raises(ValueError, match=r"on batch 2 .*target shape \(14,\), torch.float64"):
        curvlab.extremes(model, F.cross_entropy, batches)


def test_a_users_own_exception_passes_unchanged():
    class Mine(Exception):
        pass

    def loss(out, y):
        raise Mine("stop")

    with pytest.raises(Mine, match="stop"):
        curvlab.extremes(tiny_mlp(), loss, classification_data(10, (5,)))


def test_collate_that_changes_the_batch_size_is_named():
    X, Y = classification_data(12, (5,))

    def pairs_only(items):  # drops every other sample: the sampler's count is no longer true
        xs, ys = zip(*items[::2])
        return torch.stack(xs), torch.stack(ys)

    loader = DataLoader(TensorDataset(X, Y), batch_size=4, collate_fn=pairs_only)
    b = as_batches(loader)
    assert b.num_samples == 12  # what the sampler says, before any pass
    with pytest.raises(ValueError, match=r"sampler promises 12 samples, but a pass yielded 6.*collate_fn"):
        for _ in b:
            pass


@pytest.mark.parametrize("curvature", ["ggn", "kfac"])
def test_output_fn_and_keys_reach_the_curvature_approximations(curvature):
    inner = tiny_mlp()
    X, Y = classification_data(40, (5,))
    r = curvlab.extremes(WithExtra(inner), F.cross_entropy, DataLoader(Dicts(X, Y), batch_size=8),
                         output_fn=lambda out: out[0], input_key="pixel_values", target_key="labels",
                         curvature=curvature, **TIGHT)
    _check_dense(r, inner, X, Y)


def test_loss_check_skips_batches_it_cannot_split():
    # one sample: mean and sum agree, nothing to compare (no error, one forward counted)
    model = tiny_mlp()
    X, Y = classification_data(6, (5,))
    total = lambda o, y: F.cross_entropy(o, y, reduction="sum")  # noqa: E731
    H = HessianOperator(model.eval(), total, [(X[:1], Y[:1]), (X[1:], Y[1:])])
    assert H.cost.forward_samples == 1
    # an input whose tensors do not all count the samples (a shared mask): not split, not failed

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_mlp()

        def forward(self, x, mask):
            return self.inner(x * mask)

    mask = torch.ones(5, dtype=D)
    H = HessianOperator(Masked().eval(), F.cross_entropy, [((X, mask), Y)])
    assert H.cost.forward_samples == 6


# -------------------------------------------------------------------- dynamic padding

class Sequences(Dataset):
    """Samples of different lengths: ``x`` of shape ``(L_i, 2)`` (``(2, L_i)`` channels first)."""

    def __init__(self, n=24, channels_first=False, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.lengths = [int(v) for v in torch.randint(1, 7, (n,), generator=g)]
        self.X = [torch.randn(L, 2, generator=g, dtype=D) for L in self.lengths]
        self.Y = torch.randint(0, 3, (n,), generator=g)
        self.channels_first = channels_first

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        x = self.X[i].T if self.channels_first else self.X[i]
        return x, self.Y[i]

    def padded(self, length=6):
        """All samples padded with zeros to one fixed length (what the model sees, up to padding)."""
        return torch.stack([F.pad(x, (0, 0, 0, length - len(x))) for x in self.X]), self.Y


def _pad_collate(value=0.0, dim=0):
    """Pads every sample to the longest of its batch (dim ``dim`` of a sample), as NLP collates do."""
    def collate(items):
        longest = max(x.shape[dim] for x, _ in items)
        xs = []
        for x, _ in items:
            pad = [0, 0] * x.dim()
            pad[2 * (x.dim() - 1 - dim) + 1] = longest - x.shape[dim]
            xs.append(F.pad(x, pad, value=value))
        return torch.stack(xs), torch.stack([y for _, y in items])
    return collate


class SumPool(nn.Module):
    """Per-position features without bias, summed over positions: zero padding changes nothing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Sequential(nn.Linear(2, 4, bias=False), nn.Tanh()).double()
        self.head = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.head(self.inner(x).sum(1))


def _padded_loader(ds, value=0.0, dim=0, seed=0):
    return DataLoader(ds, batch_size=5, shuffle=True, collate_fn=_pad_collate(value, dim),
                      generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels_first", [False, True])
def test_dynamic_padding_passes_the_fingerprint(channels_first):
    """A shuffled loader padding each batch to its own longest sample is the same data each pass."""
    ds = Sequences(channels_first=channels_first)
    b = as_batches(_padded_loader(ds, dim=1 if channels_first else 0))
    widths = set()
    for _ in range(5):
        widths |= {x.shape[2 if channels_first else 1] for x, _ in b}
        assert sum(len(x) for x, _ in b) == len(ds)
    assert len(widths) > 1  # the padding did change from batch to batch


def test_dynamic_padding_gives_the_dense_extremes():
    ds = Sequences()
    model = SumPool()
    r = curvlab.extremes(model, F.cross_entropy, _padded_loader(ds), **TIGHT)
    _check_dense(r, model, *ds.padded())


def test_padding_that_changes_the_fingerprint_is_named_and_can_be_waived():
    ds = Sequences()
    b = as_batches(_padded_loader(ds, value=-1.0))  # a pad value that is not zero
    with pytest.raises(ValueError, match=r"data changed between passes.*pads? .*zero.*check_data=False"):
        for _ in range(5):
            for _ in b:
                pass
    b = as_batches(_padded_loader(ds, value=-1.0), check_data=False)
    for _ in range(5):
        assert sum(len(x) for x, _ in b) == len(ds)
    X, Y = classification_data(12, (5,))
    passes = iter([[(X, Y)], [(X[:6], Y[:6])]])

    class Shrinking:
        def __iter__(self):
            return iter(next(passes))

    b = as_batches(Shrinking(), check_data=False)  # the sample count is still compared
    assert sum(len(x) for x, _ in b) == 12
    with pytest.raises(ValueError, match=r"data changed between passes: 12 samples .* 6 in this"):
        for _ in b:
            pass


# -------------------------------------------------------------------- one check per argument

def test_each_argument_is_validated_once(monkeypatch):
    """Keys and dtype are checked where they are used (Batches, FunctionalModel), not again upstream."""
    import sys
    import curvlab.data
    import curvlab.functional
    api = sys.modules["curvlab.extremes"]  # the module (curvlab.extremes is the function)
    calls = {"keys": 0, "dtype": 0}

    def counted(name, check):
        def wrapper(*args):
            calls[name] += 1
            return check(*args)
        return wrapper

    keys, dtype = counted("keys", curvlab.data.check_keys), counted("dtype", curvlab.functional.check_dtype)
    monkeypatch.setattr(curvlab.data, "check_keys", keys)
    monkeypatch.setattr(curvlab.functional, "check_dtype", dtype)
    monkeypatch.setattr(api, "check_keys", keys, raising=False)
    monkeypatch.setattr(api, "check_dtype", dtype, raising=False)
    X, Y = classification_data(20, (5,))
    batches = [(X[s:s + 8], Y[s:s + 8]) for s in range(0, 20, 8)]
    curvlab.extremes(tiny_mlp(), F.cross_entropy, batches, input_key=0, target_key=1,
                     dtype=torch.float64, max_hvps=2)
    assert calls == {"keys": 1, "dtype": 1}
    calls.update(keys=0, dtype=0)
    curvlab.extremes(tiny_mlp(), F.cross_entropy, (X, Y), input_key=0, target_key=1, max_hvps=2)
    assert calls == {"keys": 1, "dtype": 0}
