"""curvlab.CurvatureTracker: warm-started extremes per epoch, one JSON line each, resumable."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import curvlab
from curvlab.tracker import RECORD_KEYS, plot_log, read_log, result_record

from conftest import classification_data, tiny_mlp

OPTS = dict(sampling="exact", tol=1e-6, tol_min=1e-6, max_hvps=200)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(model, data, steps=5, lr=0.2):
    """A few SGD steps (the 'epoch' of the tests)."""
    X, Y = data
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(X), Y).item()


@pytest.fixture
def problem():
    return tiny_mlp(), classification_data(30, (5,))


def _run(tracker, model, data, epochs):
    """Train and step; return the model snapshot each step saw."""
    seen = []
    for epoch in epochs:
        loss = _train(model, data)
        seen.append(copy.deepcopy(model))
        tracker.step(epoch, train_loss=loss)
    return seen


def test_three_epochs_log_three_warm_started_lines_equal_to_direct_calls(problem, tmp_path):
    model, data = problem
    log = tmp_path / "run" / "curvature.jsonl"
    tracker = curvlab.CurvatureTracker(model, F.cross_entropy, data, log=log, seed=7, **OPTS)
    seen = _run(tracker, model, data, [1, 2, 3])
    records = read_log(log)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        assert tuple(r) == (*RECORD_KEYS, "train_loss")
        assert r["interval_max"][0] <= r["lambda_max"] <= r["interval_max"][1]
        assert r["interval_min"][0] <= r["lambda_min"] <= r["interval_min"][1]
        assert r["converged_max"] and r["converged_min"] and r["hvps"] > 0 and r["seconds"] > 0
        assert r["num_samples"] == 30 and r["num_params"] == sum(p.numel() for p in model.parameters())
    assert [r["warm_start"] for r in records] == [False, True, True]
    assert records == tracker.records
    # the same chain by hand: init = the previous result, seed = seed + epoch
    previous = None
    for epoch, snapshot, r in zip([1, 2, 3], seen, records):
        direct = curvlab.extremes(snapshot, F.cross_entropy, data, init=previous, seed=7 + epoch, **OPTS)
        assert direct.options["warm_start"] == (previous is not None)
        assert r["lambda_max"] == pytest.approx(direct.lambda_max, rel=1e-12)
        assert r["lambda_min"] == pytest.approx(direct.lambda_min, rel=1e-12)
        assert r["hvps"] == pytest.approx(direct.cost.hvps)
        previous = direct
    assert tracker.result.lambda_max == pytest.approx(previous.lambda_max, rel=1e-12)
    assert (tmp_path / "run" / "curvature.state.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["curvature.jsonl", "curvature.state.pt"]


def test_a_new_tracker_on_the_log_and_state_resumes_warm(problem, tmp_path):
    model, data = problem
    straight_model = copy.deepcopy(model)
    straight = curvlab.CurvatureTracker(straight_model, F.cross_entropy, data, log=tmp_path / "a.jsonl", **OPTS)
    _run(straight, straight_model, data, [1, 2, 3])

    log = tmp_path / "b.jsonl"
    first = curvlab.CurvatureTracker(model, F.cross_entropy, data, log=log, **OPTS)
    _run(first, model, data, [1, 2])
    first_guards = dict(first.result.guard_vectors)
    del first  # "the process ends"
    again = curvlab.CurvatureTracker(model, F.cross_entropy, data, log=log, **OPTS)
    assert again.epoch == 2 and len(again.records) == 2
    assert again.result is not None and again.result.vector_max is not None
    # the guard vectors come back too (a warm start with POLICY.warm_guard uses them)
    assert again.result.guard_vectors and all(torch.equal(again.result.guard_vectors[e], v.cpu())
                                              for e, v in first_guards.items())
    _train(model, data)
    result = again.step()  # epoch 3 by default
    assert result.options["warm_start"]
    records = read_log(log)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[2]["warm_start"]
    expect = read_log(tmp_path / "a.jsonl")[2]
    assert records[2]["lambda_max"] == pytest.approx(expect["lambda_max"], rel=1e-12)
    assert records[2]["lambda_min"] == pytest.approx(expect["lambda_min"], rel=1e-12)
    assert records[2]["hvps"] == pytest.approx(expect["hvps"])


def test_resume_without_state_starts_cold_and_a_torn_line_is_dropped(problem, tmp_path):
    model, data = problem
    log = tmp_path / "c.jsonl"
    tracker = curvlab.CurvatureTracker(model, F.cross_entropy, data, log=log, **OPTS)
    _run(tracker, model, data, [1])
    (tmp_path / "c.state.pt").unlink()
    with open(log, "ab") as f:
        f.write(b'{"epoch": 2, "lambda_m')  # killed in mid-write
    with pytest.warns(RuntimeWarning, match="incomplete last line"):
        again = curvlab.CurvatureTracker(model, F.cross_entropy, data, log=log, **OPTS)
    assert again.epoch == 1 and again.result is None
    assert again.step(2).options["warm_start"] is False
    assert [r["epoch"] for r in read_log(log)] == [1, 2]
    (tmp_path / "c.state.pt").write_bytes(b"not a state file")
    with pytest.warns(RuntimeWarning, match="cannot warm-start"):
        cold = curvlab.CurvatureTracker(model, F.cross_entropy, data, log=log, **OPTS)
    assert cold.result is None and cold.epoch == 2


def test_open_interval_sides_are_null_and_every_skips_epochs(problem, tmp_path):
    model, data = problem
    tracker = curvlab.CurvatureTracker(model, F.cross_entropy, data, log=tmp_path / "d.jsonl", every=2,
                                       sampling="exact", tol=1e-12, tol_min=1e-12, max_hvps=2)
    assert tracker.step() is None and tracker.epoch == 1
    assert not (tmp_path / "d.jsonl").exists()
    result = tracker.step()
    [r] = read_log(tmp_path / "d.jsonl")
    assert r["epoch"] == 2 and not r["warm_start"]
    opened = 0
    for end in ("max", "min"):
        assert r[f"converged_{end}"] == getattr(result, f"converged_{end}")
        for got, want in zip(r[f"interval_{end}"], getattr(result, f"interval_{end}")):
            if math.isfinite(want):
                assert got == want
            else:
                assert got is None
                opened += 1
    assert opened > 0  # the tiny budget leaves an outward side open
    assert "Infinity" not in (tmp_path / "d.jsonl").read_text()


def test_without_a_log_the_tracker_keeps_records_in_memory(problem, tmp_path, monkeypatch):
    model, data = problem
    monkeypatch.chdir(tmp_path)
    tracker = curvlab.CurvatureTracker(model, F.cross_entropy, data, which="LA", **OPTS)
    assert tracker.state is None
    tracker()
    tracker()
    assert [r["epoch"] for r in tracker.records] == [1, 2]
    assert tracker.records[1]["lambda_min"] is None  # an end not asked for
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_refused(problem):
    model, data = problem
    with pytest.raises(TypeError, match="init"):
        curvlab.CurvatureTracker(model, F.cross_entropy, data, init=None)
    with pytest.raises(ValueError, match="every"):
        curvlab.CurvatureTracker(model, F.cross_entropy, data, every=0)
    tracker = curvlab.CurvatureTracker(model, F.cross_entropy, data, **OPTS)
    with pytest.raises(ValueError, match="overwrite"):
        tracker.step(1, hvps=3)


def test_plot_writes_a_png(problem, tmp_path):
    pytest.importorskip("matplotlib")
    model, data = problem
    log = tmp_path / "e.jsonl"
    tracker = curvlab.CurvatureTracker(model, F.cross_entropy, data, log=log, **OPTS)
    _run(tracker, model, data, [1, 2])
    out = tracker.plot(tmp_path / "plots" / "curvature.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert plot_log(log, tmp_path / "again.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no records"):
        plot_log([], tmp_path / "empty.png")


def test_result_record_is_json_ready(problem):
    model, data = problem
    r = curvlab.extremes(model, F.cross_entropy, data, which="SA", **OPTS)
    rec = result_record(r)
    assert set(rec) == set(RECORD_KEYS) - {"epoch", "time"}
    assert rec["lambda_max"] is None and rec["interval_max"] == [None, None]
    json.dumps(rec, allow_nan=False)
