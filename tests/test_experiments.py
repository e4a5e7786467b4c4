"""experiments.train_cifar, plot and bench_gpu on a tiny synthetic CIFAR-shaped data set.

The data set is written by the test in torchvision's ``cifar-10-batches-py``
layout (pickled dicts with ``b"data"`` uint8 ``(N, 3072)`` and ``b"labels"``),
so the scripts read it exactly as they read CIFAR-10.  Runs are tiny (ResNet-20
at width 1/8, 40 training images, a Hessian over 16 of them, a few HVPs) and
single-threaded, and are made in-process through ``main(argv)`` except for the
one test that kills a real process.
"""

import math
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import curvlab
import experiments
from experiments import bench_gpu, plot, train_cifar
from experiments.cifar import ENV, load_cifar10, normalize
from experiments.models import build_model

PER_FILE = 40
TINY = ["--width", "0.125", "--subset", "40", "--test-subset", "20", "--batch-size", "20",
        "--extremes-subset", "16", "--max-hvps", "4", "--threads", "1", "--quiet"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    """One thread (as ``--threads 1`` in every run sets): faster on a shared machine, and
    bitwise the same reductions in every run, which the resume tests compare."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """A CIFAR-shaped data set of 5 x 40 training and 40 test images, in the batch-file layout."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (PER_FILE, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, PER_FILE).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def _train(out, data, *extra):
    assert train_cifar.main([*TINY, "--data", str(data), "--out", str(out), *extra]) == 0
    return train_cifar.read_log(Path(out) / "log.jsonl")


def _without_time(records):
    return [{k: v for k, v in r.items() if k not in train_cifar.TIME_KEYS} for r in records]


@pytest.fixture(scope="module")
def straight(cifar_dir, tmp_path_factory):
    """An uninterrupted two-epoch run: its folder and its log."""
    out = tmp_path_factory.mktemp("straight")
    records = _train(out, cifar_dir, "--epochs", "2")
    return out, records


# --------------------------------------------------------------------------- the run and its log

@pytest.mark.parametrize("curvature", curvlab.CURVATURES)
def test_two_epoch_run_logs_one_line_per_epoch(cifar_dir, tmp_path, curvature):
    approx = [] if curvature == "none" else ["--approx-samples", "8", "--approx-rank", "2"]
    records = _train(tmp_path, cifar_dir, "--epochs", "2", "--curvature", curvature, *approx)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert tuple(r) == train_cifar.LOG_KEYS
        assert r["num_train"] == 40 and r["num_test"] == 20 and r["num_hessian"] == 16
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1
        assert r["lambda_min"] <= r["lambda_max"]
        # Ritz values err inward: each estimate is the inner end of its interval; an end
        # that did not converge in the tiny budget has its outward side open (null in JSON)
        lo, hi = r["interval_max"]
        assert lo <= r["lambda_max"] <= (math.inf if hi is None else hi)
        assert hi is not None or not r["converged_max"]
        lo, hi = r["interval_min"]
        assert (-math.inf if lo is None else lo) <= r["lambda_min"] <= hi
        assert lo is not None or not r["converged_min"]
        assert r["hvps"] > 0
        if curvature == "none":  # (building an approximation is counted on top of the solver's budget)
            assert r["hvps"] <= 4 + 1e-9  # within the --max-hvps budget
        assert r["samples"] == pytest.approx(r["hvps"] * 16)
        assert r["cost_epochs_samples"] == pytest.approx(r["samples"] / 40)
        assert r["cost_epochs_time"] == pytest.approx(r["extremes_seconds"] / r["train_seconds"])
        trace = json.loads((tmp_path / f"trace_epoch{r['epoch']}.json").read_text())
        assert trace["history"] and trace["lambda_max"] == r["lambda_max"]
        assert trace["options"]["curvature"] == curvature
    assert [r["warm_start"] for r in records] == [False, True]
    # cosine schedule: the second epoch runs at lr * (1 + cos(pi / 2)) / 2
    assert records[0]["lr"] == pytest.approx(0.1)
    assert records[1]["lr"] == pytest.approx(0.05)
    assert (tmp_path / "checkpoint.pt").is_file()


def test_extremes_every_k_leaves_other_epochs_empty(cifar_dir, tmp_path):
    records = _train(tmp_path, cifar_dir, "--epochs", "2", "--extremes-every", "2")
    assert records[0]["lambda_max"] is None and records[0]["hvps"] is None
    assert records[1]["lambda_max"] is not None
    assert not records[1]["warm_start"]
    assert not (tmp_path / "trace_epoch1.json").exists()


def test_logged_lambda_max_is_that_of_the_unaugmented_subset_in_eval_mode(cifar_dir, tmp_path):
    """The logged interval contains lambda_max of the checkpointed model's Hessian over the
    first 8 unaugmented training images, computed independently in float64."""
    # a loose --tol-min: only lambda_max is checked here, and lambda_min would cost most of the HVPs
    records = _train(tmp_path, cifar_dir, "--epochs", "1", "--tol", "1e-3", "--tol-min", "1",
                     "--max-hvps", "40", "--extremes-subset", "8")
    r = records[0]
    assert r["converged_max"]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    model = build_model("resnet20", 0.125)
    model.load_state_dict(ckpt["model"])
    X, Y = load_cifar10(cifar_dir, limit=8)
    ref = curvlab.extremes(model.double(), F.cross_entropy, (normalize(X, torch.float64), Y), which="LA",
                           tol=1e-5, max_hvps=60)
    assert ref.converged_max
    # the float64 reference is exact to 1e-5 relative; the float32 run's Rayleigh quotient
    # carries rounding of order sqrt(n) * eps32 * |lambda| ~ 1e-5 relative: allow 1e-4
    slack = 1e-4 * abs(ref.lambda_max)
    lo, hi = r["interval_max"]
    assert lo - slack <= ref.lambda_max <= hi + slack


# --------------------------------------------------------------------------- resume

def test_resumed_run_writes_the_same_log(cifar_dir, tmp_path, straight):
    _, expected = straight
    first = _train(tmp_path, cifar_dir, "--epochs", "2", "--until", "1")
    assert [r["epoch"] for r in first] == [1]
    resumed = _train(tmp_path, cifar_dir, "--epochs", "2", "--resume")
    assert [r["epoch"] for r in resumed] == [1, 2]
    assert _without_time(resumed) == _without_time(expected)
    assert resumed[1]["warm_start"]


def test_resume_truncates_log_lines_beyond_the_checkpoint(cifar_dir, tmp_path, straight):
    """A kill between the log write and the checkpoint write leaves one line too many."""
    _, expected = straight
    _train(tmp_path, cifar_dir, "--epochs", "2", "--until", "1")
    log = tmp_path / "log.jsonl"
    line = json.loads(log.read_text().splitlines()[0])
    with open(log, "a") as f:
        f.write(json.dumps(dict(line, epoch=2, lambda_max=123.0)) + "\n")
    resumed = _train(tmp_path, cifar_dir, "--resume")
    assert [r["epoch"] for r in resumed] == [1, 2]
    assert _without_time(resumed) == _without_time(expected)


def test_resume_after_sigkill_gives_the_same_log(cifar_dir, tmp_path, straight):
    """Kill a real run (SIGKILL) as soon as its first epoch is logged, then resume it."""
    _, expected = straight
    root = Path(experiments.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "experiments.train_cifar", *TINY, "--data", str(cifar_dir),
           "--out", str(tmp_path), "--epochs", "2"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "log.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and log.read_text().count("\n") >= 1:
            proc.kill()
            break
        time.sleep(0.02)
    rc = proc.wait(timeout=60)
    assert rc in (0, -9), proc.stderr.read().decode()
    assert log.read_text().count("\n") >= 1
    resumed = _train(tmp_path, cifar_dir, "--epochs", "2", "--resume")
    assert _without_time(resumed) == _without_time(expected)


def test_resume_refuses_a_changed_option(cifar_dir, tmp_path):
    _train(tmp_path, cifar_dir, "--epochs", "2", "--until", "1")
    with pytest.raises(train_cifar.ConfigError, match=r"--lr 0\.2 \(the run has 0\.1\)"):
        _train(tmp_path, cifar_dir, "--resume", "--lr", "0.2")


def test_existing_run_needs_resume_or_overwrite(cifar_dir, tmp_path):
    _train(tmp_path, cifar_dir, "--epochs", "1")
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        _train(tmp_path, cifar_dir, "--epochs", "1")
    assert len(_train(tmp_path, cifar_dir, "--epochs", "1", "--overwrite")) == 1


def test_extremes_subset_larger_than_training_set_is_refused(cifar_dir, tmp_path):
    with pytest.raises(train_cifar.ConfigError, match="exceeds the 40 training images"):
        _train(tmp_path, cifar_dir, "--epochs", "1", "--extremes-subset", "41")


# --------------------------------------------------------------------------- data

def test_missing_data_names_the_path_and_the_variable(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(ENV, str(missing))
    with pytest.raises(FileNotFoundError) as err:
        train_cifar.main([*TINY, "--out", str(tmp_path / "run")])
    assert str(missing) in str(err.value) and ENV in str(err.value)


def test_cli_reports_missing_data_without_traceback(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc = train_cifar.cli([*TINY, "--data", str(missing), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(missing) in err and ENV in err and "Traceback" not in err


def test_demo_falls_back_to_synthetic_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    out = tmp_path / "demo"
    assert train_cifar.main(["--demo", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert str(tmp_path / "nowhere") in said and "synthetic" in said
    assert len(train_cifar.read_log(out / "log.jsonl")) == 1


def test_augment_is_a_crop_of_the_padded_image_and_a_flip():
    x = torch.randn(16, 3, 32, 32)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    out = train_cifar.augment(x, g)
    g.set_state(state)  # replay the draws: offsets y, offsets x, flips
    oy = torch.randint(0, 9, (16,), generator=g)
    ox = torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    padded = F.pad(x, (4, 4, 4, 4))
    for b in range(16):
        ref = padded[b, :, oy[b]:oy[b] + 32, ox[b]:ox[b] + 32]
        torch.testing.assert_close(out[b], ref.flip(2) if flip[b] else ref, rtol=0, atol=0)
    assert flip.any() and (~flip).any() and ((oy != 4) | (ox != 4)).any()  # the draws did something


@pytest.mark.parametrize("schedule,factors", [
    ("cosine", [1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4))]),
    ("multistep", [1.0, 1.0, 0.1, 0.01]),  # milestones at round(0.5 * 4) = 2 and round(0.75 * 4) = 3
    ("constant", [1.0, 1.0, 1.0, 1.0]),
])
def test_lr_factor(schedule, factors):
    got = [train_cifar.lr_factor(e, 4, schedule) for e in range(4)]
    assert got == pytest.approx(factors)


# --------------------------------------------------------------------------- plots

def test_plot_curves_writes_a_png(straight, tmp_path):
    run_dir, _ = straight
    png = tmp_path / "curves.png"
    assert plot.main([str(run_dir / "log.jsonl"), "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_trace_writes_a_png(straight, tmp_path):
    run_dir, _ = straight
    png = tmp_path / "trace.png"
    assert plot.main([str(run_dir), "--trace", "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert plot.find_trace(run_dir).name == "trace_epoch2.json"


def test_plot_refuses_an_empty_log(tmp_path):
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        plot.main([str(tmp_path / "log.jsonl"), "--out", str(tmp_path / "x.png")])


# --------------------------------------------------------------------------- GPU benchmark (smoke)

def test_bench_smoke_writes_its_figures(cifar_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_gpu.main(["--smoke", "--device", "cpu", "--model", "resnet20", "--data", str(cifar_dir),
                           "--subset", "16", "--max-hvps", "4", "--threads", "1", "--out", str(out),
                           "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "SMOKE TEST" in printed and "extremes s" in printed
    report = json.loads(out.read_text())
    assert report["smoke"] and report["device"] == "cpu" and report["num_train"] == 16
    assert report["config"]["width"] == 0.125
    assert [r["start"] for r in report["rows"]] == ["cold", "warm"]
    for r in report["rows"]:
        assert r["lambda_min"] <= r["lambda_max"] and 0 < r["hvps"] <= 4 + 1e-9
        assert r["cost_epochs_time"] == pytest.approx(r["extremes_seconds"] / r["train_seconds"])
    assert report["ratio"] == report["rows"][-1]["cost_epochs_time"]


def test_bench_traps_counts_wrong_intervals():
    # one spectrum of experiments.bench_traps where the floor once lay between the bottom's
    # spacing and its depth (a deep eigenvalue, floor 1 %: 24 of 30 seeds wrong before the
    # guard settled under the floor); its rows count what they say
    from experiments import bench_traps
    rows = bench_traps.run([0.01], 4, spectra=["deep"])
    (row,) = rows.values()
    assert row["spectrum"] == "deep" and row["seeds"] == 4 and row["converged"] == 4
    assert row["wrong"] == 0 and row["lambda_min"] == pytest.approx(-1.0, abs=1e-9)


def test_bench_half_reads_the_half_level_decision_from_the_levels():
    # the tests' MLP at floor 0.03, sample_size 100, seed 7: the level of 400 leaves lambda_min
    # short, the forced half level (1,500 of 3,000) follows; the row's figures are the level
    # records' and the stub stops the call where its exact stage would begin
    from curvlab import multilevel
    from experiments import bench_half
    from experiments.bench_cnn50k import policy
    from experiments.models import noisy_mlp
    model, X, Y = noisy_mlp()
    kw = dict(sampling="multilevel", sample_size=100, tol=0.05, tol_min=0.05, floor=0.03, seed=7)
    real = multilevel._exact
    with policy(half_margin=math.inf), bench_half.stubbed_exact():
        r = curvlab.extremes(model, F.cross_entropy, (X, Y), **kw)
    assert multilevel._exact is real
    rows = bench_half.decisions(r, 2.0, len(X))
    assert rows and all(d["half_size"] == len(X) // 2 for d in rows)
    (lv,) = [i for i, x in enumerate(r.levels) if x["sample_size"] == rows[0]["level"]]
    half = r.levels[lv + 1]
    assert half.get("half_level")
    for d in rows:
        e, h = r.levels[lv]["ends"][d["end"]], half["ends"][d["end"]]
        lo, hi = h["interval"]
        assert d["predicted"] == e["half_prediction"] and d["passed"] == h["accepted"]
        assert d["found"] == pytest.approx((hi - lo) / 2 / h["target"])
        assert d["found_over_predicted"] == pytest.approx((hi - lo) / 2 / (e["half_prediction"] * e["target"]))
        assert d["half_epochs"] == pytest.approx(2.0 * (half["hvps_so_far"] - r.levels[lv]["hvps_so_far"]))
    # an end the half level left short (seed 3, sample_size 150) went to the stub: no value,
    # the half level's interval, not converged, nothing spent after that level
    with policy(half_margin=math.inf), bench_half.stubbed_exact():
        s = curvlab.extremes(model, F.cross_entropy, (X, Y), **dict(kw, sample_size=150, seed=3))
    assert s.levels[-1].get("half_level") and not s.levels[-1]["ends"]["min"]["accepted"]
    assert not s.converged_min and math.isnan(s.lambda_min)
    assert s.interval_min == tuple(s.levels[-1]["ends"]["min"]["interval"])
    assert s.cost.hvps == pytest.approx(s.levels[-1]["hvps_so_far"])
