"""``python -m l2lab.bench`` end to end, tiny: the JSON is complete and the sides agree.

No timing is asserted (machines are noisy), nor is the bench's own arithmetic recomputed; what must
hold everywhere is that every side trains the same thing as the others and as ``l2lab.train``,
which is what makes the timing comparison meaningful.
"""

from __future__ import annotations

import json

import pytest
from conftest import make_cfg, run_cli

from l2lab.bench import parse_args
from l2lab.train import train

SIDES = ("harness", "harness_no_mlflow", "plain")
PER_SIDE = ("median_s", "min_s", "s_per_epoch", "steps_per_s", "times_s", "peak_rss_mib",
            "final_train_ce", "final_val_ce")


@pytest.mark.slow
def test_bench_prints_one_json_object_and_every_side_trains_what_train_trains(tmp_path, store):
    """The three sides end with the numbers of each other and of ``l2lab.train`` run on the
    bench's own overrides, so the times it reports compare like with like."""
    out, cwd = tmp_path / "bench.json", tmp_path / "bench"
    cwd.mkdir()
    r = run_cli("l2lab.bench", "--epochs", "2", "--train-size", "100", "--batch-size", "32",
                "--repeats", "2", "--hidden", "16", "--device", "cpu", "--out", str(out),
                cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)  # stdout is exactly one JSON document
    assert json.loads(out.read_text()) == result

    assert result["settings"] == {"epochs": 2, "train_size": 100, "val_size": 597,
                                  "batch_size": 32, "hidden": [16], "steps_per_epoch": 4,
                                  "repeats": 2, "device": "cpu"}
    assert "trainer.max_epochs=2" in result["overrides"]
    assert "regularization.lam=1e-3" in result["overrides"]
    for side in SIDES:
        s = result[side]
        assert set(PER_SIDE) <= set(s), side
        assert len(s["times_s"]) == 2 and min(s["times_s"]) == s["min_s"] > 0
        assert s["min_s"] <= s["median_s"] <= max(s["times_s"]) and s["peak_rss_mib"] > 0
    assert {"ratio_harness_over_plain", "ratio_harness_no_mlflow_over_plain",
            "ratio_harness_over_plain_min"} <= set(result)

    # Agreement: the harness with and without MLflow and the plain loop end equal (weights and
    # val/ce), and the harness equals an ordinary `l2lab.train` run of the bench's overrides.
    assert result["same_result"] is True, result["agreement"]
    # the harness writes its metrics as a train run does on a SQLite store: with sqlite3, not
    # through MLflow's client (~0.3 ms a row: 100 epochs' flush took 0.39 s profiled, not 0.025)
    assert result["store_writer"] == "sqlite"
    for side in ("harness", "harness_no_mlflow"):
        assert result[side]["final_train_ce"] == pytest.approx(
            result["plain"]["final_train_ce"], rel=1e-5)
        assert result[side]["final_val_ce"] == pytest.approx(
            result["plain"]["final_val_ce"], rel=1e-5)
    assert result["harness"]["final_val_ce"] == result["harness_no_mlflow"]["final_val_ce"]
    ordinary = train(make_cfg(*result["overrides"], f"tracking.uri={store}", tiny=False),
                     output_dir=tmp_path / "run")
    assert result["harness"]["final_train_ce"] == ordinary["train/ce"]
    assert result["harness"]["final_val_ce"] == ordinary["val/ce"]
    env = result["env"]
    assert {"torch", "lightning", "device_name", "cpu_count", "torch_threads",
            "cpu_capability"} <= set(env)
    assert not (cwd / "mlruns").exists()  # the bench's store is temporary


@pytest.mark.parametrize("argv", [["--hidden", "16,x"], ["--hidden", "0"], ["--epochs", "0"],
                                  ["--device", "tpu"], ["--widths", "2,x"], ["--widths", "0"],
                                  ["--lams", "-1"]])
def test_bench_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_sweep_times_every_side_and_they_train_the_same_thing(tmp_path):
    r = run_cli("l2lab.bench", "--sweep", "--repeats", "1", "--", "trainer.max_epochs=2",
                "data.train_size=60", "model.hidden=[16]",
                "regularization.lam=0,0.5", "seed=0,1",
                cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    s = result["settings"]
    assert s["lams"] == [0.0, 0.5] and s["seeds"] == [0, 1] and s["jobs"] == 4
    assert s["epochs"] == 2 and s["train_size"] == 60 and s["hidden"] == [16]
    sides = ("vectorized", "basic", "plain", "plain_stacked", "single", "single_plain")
    assert set(result["sides"]) == set(sides)
    for side in sides:
        assert len(result[side]["times_s"]) == 1 and result[side]["median_s"] > 0
    for side in ("vectorized", "basic"):  # MLflow's share was measured inside the sweep
        assert 0 < result[side]["mlflow_s"] < result[side]["median_s"]
    assert {"vectorized_over_plain", "basic_over_vectorized"} <= set(result["ratios"])
    # every side trained the same jobs to the same final val/ce (per λ, mean over seeds): the
    # stacked sweep, the job-by-job sweep, the plain loop and the torch.func stack
    plain = result["plain"]["final_val_ce_per_lam"]
    assert set(plain) == {"0", "0.5"} and plain["0"] != plain["0.5"]
    for side in ("vectorized", "basic", "plain_stacked"):
        got = result[side]["final_val_ce_per_lam"]
        assert got == pytest.approx(plain, rel=1e-4), side


@pytest.mark.slow
def test_bench_per_job_and_vs_run_time_whole_sweeps_and_report_their_ratios(tmp_path):
    """The two scale benchmarks at toy sizes: per-job cost from sweeps of 5 and 10 jobs (with
    the plain loop's compute per job beside it), and a 2 λ × 1 seed sweep against one run."""
    tiny = ["data.train_size=100", "trainer.max_epochs=1"]
    r = run_cli("l2lab.bench", "--per-job", "5", "10", "--", *tiny, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    per_job = json.loads(r.stdout)
    assert per_job["settings"]["sizes"] == [5, 10]
    assert set(per_job["median_s"]) == {"5", "10"}
    assert "repeat 0, 5 jobs" in r.stderr and "repeat 0, 10 jobs" in r.stderr
    assert {"per_job_ms", "plain_ms_per_job", "bookkeeping_ms_per_job"} <= set(per_job)
    assert per_job["plain_ms_per_job"] > 0
    r = run_cli("l2lab.bench", "--vs-run", "2", "1", "--", *tiny, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    vs = json.loads(r.stdout)
    assert vs["settings"]["jobs"] == 2 and len(vs["seconds"]["run"]) == 1
    assert "repeat 0, run" in r.stderr and "repeat 0, sweep" in r.stderr
    assert vs["median_s"]["sweep"] > 0 and vs["median_s"]["run"] > 0 and "ratio" in vs
    assert not list(tmp_path.glob("mlruns"))  # the benchmarks' stores are temporary


@pytest.mark.slow
def test_bench_two_factor_times_one_stack_against_one_stack_per_lr(tmp_path):
    """``bench --sweep --two-factor``: the λ × seed × lr grid as one stack and as one stack per
    lr, whole processes; both train the same numbers."""
    r = run_cli("l2lab.bench", "--sweep", "--two-factor", "--repeats", "1", "--",
                "trainer.max_epochs=2", "data.train_size=60", "model.hidden=[16]",
                "regularization.lam=0,0.5", "seed=0,1", "optimizer.lr=0.01,0.05",
                cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["settings"]["lrs"] == [0.01, 0.05] and result["settings"]["jobs"] == 8
    med = result["median_s"]
    assert result["ratio_per_lr_over_one_stack"] == pytest.approx(
        med["per_lr"] / med["one_stack"])
    assert result["same_final_val_ce"] is True
    assert len(result["final_val_ce"]) == 4  # 2 lr × 2 λ rows
    assert "max_models=4" in result["sides"]["per_lr"]


@pytest.mark.slow
def test_bench_widths_times_one_padded_stack_against_one_stack_per_width(tmp_path):
    """``bench --sweep --width-stack``: the λ × seed × width grid as one padded stack and as one
    stack per width, whole processes; on CPU both train the same numbers."""
    r = run_cli("l2lab.bench", "--sweep", "--width-stack", "--repeats", "1", "--",
                "trainer.max_epochs=2", "data.train_size=60", "model.hidden=[8],[12]",
                "regularization.lam=0,0.5", "seed=0,1", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["settings"]["widths"] == "[8],[12]" and result["settings"]["jobs"] == 8
    assert result["same_final_val_ce"] is True
    assert len(result["final_val_ce"]) == 4  # 2 widths × 2 λ rows
    assert "max_models=4" in result["sides"]["per_width"]


@pytest.mark.slow
def test_bench_dead_times_a_stack_with_diverged_networks_removed_and_kept(tmp_path):
    """``bench --dead``: the grid alone, with as many diverging jobs again (removed from the
    stack) and with them kept as zeros, whole processes; the healthy runs end with the same
    numbers on every side, and the diverged ones are in no summary row."""
    r = run_cli("l2lab.bench", "--dead", "--repeats", "1", "--",
                "trainer.max_epochs=2", "data.train_size=60", "model.hidden=[16]",
                "regularization.lam=0,0.5", "seed=0,1", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["settings"]["dying_lams"] == [1e8, 1e9]
    assert set(result["median_s"]) == {"healthy", "dropped", "kept"}
    assert result["same_final_val_ce"] is True
    assert sorted(result["final_val_ce"]) == ["lam=0.0", "lam=0.5"]
    assert "L2Module.drop_dead = False" in result["sides"]["kept"]


@pytest.mark.slow
def test_bench_double_descent_times_the_preset_against_the_notebook_loop(tmp_path):
    """``bench --double-descent`` at a toy size (2 widths × 2 λ × 1 epoch, 500 training
    sequences): one JSON object with both sides' times and their ratio, and both sides trained
    the same networks for the same number of optimizer steps."""
    r = run_cli("l2lab.bench", "--double-descent", "--widths", "2,4", "--lams", "0,0.1",
                "--epochs", "1", "--", "data.num_samples=2000", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    s = out["settings"]
    assert (s["widths"], s["lams"], s["epochs"], s["n_train"], s["batch_size"]) == (
        [2, 4], [0.0, 0.1], 1, 500, 100)
    for side in ("harness", "notebook"):
        assert out[side]["median_s"] > 0 and len(out[side]["times_s"]) == 1
        assert out[side]["networks"] == 4
        assert out[side]["steps"] == 4 * 1 * 5  # 4 networks × 1 epoch × 500 / 100 batches
        assert set(out[side]["test_error"]) == {"0/2", "0/4", "0.1/2", "0.1/4"}
        assert all(0 <= e <= 1 for e in out[side]["test_error"].values())
    assert out["ratio"] == pytest.approx(out["harness"]["median_s"] / out["notebook"]["median_s"])
    assert "repeat 0 harness" in r.stderr and "repeat 0 notebook" in r.stderr
    assert not list(tmp_path.glob("mlruns"))  # the bench's store is temporary


@pytest.mark.slow
def test_the_resnet_case_runs_tiny_and_its_sides_train_the_same_networks(tmp_path):
    """``--resnet`` on two CIFAR-shaped images: every field is there, the harness and the plain
    loop end with the same weights, and each stacked network with its ordinary run's (CPU, fp32:
    bf16 applies on CUDA only)."""
    out = tmp_path / "resnet.json"
    r = run_cli("l2lab.bench", "--resnet", "--device", "cpu", "--train-size", "2",
                "--batch-size", "2", "--stack", "2", "--out", str(out), cwd=tmp_path,
                timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert json.loads(out.read_text()) == result
    assert result["settings"] == {
        "case": "resnet18", "image_shape": [3, 32, 32], "train_size": 2, "batch_size": 2,
        "epochs": 1, "steps_per_epoch": 1, "precision": "32-true", "channels_last": False,
        "stack_k": 2, "stack_lams": [0.0, 0.004], "repeats": 1, "device": "cpu"}
    assert "experiment=cifar10_resnet18" in result["overrides"]
    for side in ("harness", "plain", "stack", "sequential"):
        s = result[side]
        assert len(s["times_s"]) == 1 and s["min_s"] == s["times_s"][0] > 0, side
        assert s["steps_per_s"] > 0 and s["images_per_s"] > 0, side
    assert result["ratio_harness_over_plain"] == pytest.approx(
        result["harness"]["min_s"] / result["plain"]["min_s"])
    assert result["ratio_sequential_over_stack"] == pytest.approx(
        result["sequential"]["min_s"] / result["stack"]["min_s"])
    assert result["harness"]["final_train_ce"] == result["plain"]["final_train_ce"]
    assert result["agreement"]["max_weight_rel_diff"] == 0.0
    assert result["stack_agreement"]["max_weight_rel_diff"] == 0.0
    assert result["env"]["device"] == "cpu"


@pytest.mark.slow
def test_bench_startup_times_the_first_epoch_and_the_whole_run_against_a_plain_script(tmp_path):
    r = run_cli("l2lab.bench", "--startup", "--repeats", "1", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["settings"]["epochs"] == 30 and result["settings"]["data"] == "digits"
    assert set(result["sides"]) == {"harness", "plain_first_epoch", "plain"}
    h = result["harness"]
    assert 0 < h["first_epoch_s"] < h["median_s"] and len(h["times_s"]) == 1
    for side in ("plain_first_epoch", "plain"):
        assert len(result[side]["times_s"]) == 1 and result[side]["median_s"] > 0
    assert result["startup_gap_s"] == pytest.approx(
        h["first_epoch_s"] - result["plain_first_epoch"]["median_s"])
    assert result["ratio_single_over_plain"] == pytest.approx(
        h["median_s"] / result["plain"]["median_s"])
