"""Smoke test of the HVP benchmark script on a tiny configuration (no timing assertions).

Timings are machine- and load-dependent, so only the shape and the internal
consistency of the report are checked; the one exact check is on FLOP counts,
which are deterministic.
"""

import json
import math

import pytest

from experiments import bench_hvp

# One thread: on a shared two-core machine two threads can make this tiny run ~50x slower.
TINY = ["--model", "resnet20", "--width", "0.125", "--batch", "4", "--rounds", "2", "--ks", "1,2",
        "--threads", "1"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    return bench_hvp.main(TINY + ["--json", str(out)]), out


def test_rows_cover_every_configuration(result):
    res, _ = result
    names = [r["name"] for r in res["rows"]]
    assert names == ["grad (torch.func)", "grad (autograd)",
                     "single HVP rev-rev", "block k=1 rev-rev", "block k=2 rev-rev",
                     "single HVP fwd-rev", "block k=1 fwd-rev", "block k=2 fwd-rev"]


def test_numbers_are_well_formed(result):
    res, _ = result
    batch = res["meta"]["batch"]
    for r in res["rows"]:
        assert len(r["times"]) == res["meta"]["rounds"]
        assert all(t > 0 and math.isfinite(t) for t in r["times"])
        assert r["seconds"] > 0
        # throughput is images * vectors / median time, by definition
        assert r["images_vectors_per_s"] == pytest.approx(batch * r["k"] / r["seconds"])
        assert 0 < r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert r["ratio_best"] > 0 and math.isfinite(r["ratio_best"])


def test_reference_gradient_has_ratio_one(result):
    res, _ = result
    (threads, name), = res["meta"]["references"].items()
    ref = [r for r in res["rows"] if r["name"] == name]
    assert len(ref) == 1 and ref[0]["kind"] == "grad" and str(ref[0]["threads"]) == threads
    assert ref[0]["ratio"] == pytest.approx(1.0) and ref[0]["flop_ratio"] == pytest.approx(1.0)


def test_flop_counts_are_consistent(result):
    # Both gradient paths run the same kernels; an HVP does strictly more matmul/conv
    # work per vector than a gradient (its own forward+backward plus a second-order
    # pass), and a block of k costs more than a single product but at most k of them.
    res, _ = result
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["grad (torch.func)"]["flops"] == rows["grad (autograd)"]["flops"] > 0
    for m in ("rev-rev", "fwd-rev"):
        single, k2 = rows[f"single HVP {m}"]["flops"], rows[f"block k=2 {m}"]["flops"]
        assert single == rows[f"block k=1 {m}"]["flops"]
        assert single > rows["grad (torch.func)"]["flops"]
        assert single < k2 <= 2 * single


def test_json_and_table(result):
    res, out = result
    assert json.loads(out.read_text())["rows"][0]["name"] == res["rows"][0]["name"]
    table = bench_hvp.markdown_table(res)
    assert table.count("\n| ") == len(res["rows"]) + 1  # header row plus one row per configuration


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="rounds"):
        bench_hvp.run_benchmark(width=0.125, batch=2, rounds=0, verbose=False)
    with pytest.raises(ValueError, match="methods"):
        bench_hvp.run_benchmark(width=0.125, batch=2, methods=("vmap",), verbose=False)
    with pytest.raises(ValueError, match="ks"):
        bench_hvp.run_benchmark(width=0.125, batch=2, ks=(0,), verbose=False)
    with pytest.raises(ValueError, match="threads"):
        bench_hvp.run_benchmark(width=0.125, batch=2, threads=(0,), verbose=False)
    with pytest.raises(ValueError, match="--ks"):
        bench_hvp.main(["--ks", "4,x"])


def test_thread_counts_are_timed_side_by_side_and_restored(monkeypatch):
    # torch.set_num_threads is replaced by a recorder that really sets one thread: the test
    # checks which count each call asks for without running on several threads (slow on a
    # busy two-core machine).
    import torch
    real, default = torch.set_num_threads, torch.get_num_threads()
    calls = []

    def record(n):
        calls.append(n)
        real(1)

    monkeypatch.setattr(torch, "set_num_threads", record)
    try:
        res = bench_hvp.run_benchmark(width=0.125, batch=2, rounds=1, ks=(2,), methods=("rev-rev",),
                                      flops=False, threads=(1, 3), verbose=False)
    finally:
        real(default)
    names = ("grad (torch.func)", "grad (autograd)", "single HVP rev-rev", "block k=2 rev-rev")
    assert [(r["threads"], r["name"]) for r in res["rows"]] == [(t, n) for t in (1, 3) for n in names]
    # warm-up plus one round, each call set to its own group's count, then the default restored
    assert sorted(calls[:-1]) == [1] * 8 + [3] * 8 and calls[-1] == default
    assert all(r["flops"] is None and r["flop_ratio"] is None for r in res["rows"])


def test_profile_names_a_configuration():
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = bench_hvp.profile_config("single HVP rev-rev", width=0.125, batch=2, ks=(1,),
                                         methods=("rev-rev",))
        assert "convolution" in table  # a ResNet's HVP runs convolution kernels
        with pytest.raises(ValueError, match="no configuration"):
            bench_hvp.profile_config("block k=3 rev-rev", width=0.125, batch=2, ks=(1,))
    finally:
        torch.set_num_threads(before)


def test_explicit_data_folder_that_is_missing_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        bench_hvp.load_batch(2, data=str(tmp_path / "nowhere"))
