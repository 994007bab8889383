"""``pscnn bench``: every subcommand in a tiny configuration writes well-formed outputs.

These assert on the outputs' content and consistency, never on speed (the
machines running tests are shared and noisy).  The benchmarks run as
subprocesses, as a user runs them; OPENBLAS_* variables are left alone
(``--keep-openblas-env``).
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cnn_core.model import Model

from helpers import counted_model_builds, error_line, exit_error_line, interrupt_when, popen_taking_ctrl_c

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*argv, timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "pscnn.cli", "bench", *argv, "--no-progress",
                           "--keep-openblas-env"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_png(path: Path) -> None:
    assert path.exists(), f"{path} missing"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, f"{path} is not a plausible PNG"


# --------------------------------------------------------------------------- end to end

def test_scaling_synthetic_workers(tmp_path):
    """--compute-ms: sleeping workers, no MNIST needed; both modes, 1 and 2 workers."""
    out = tmp_path / "scaling"
    proc = bench("scaling", "--workers", "1,2", "--mode", "sync,async", "--compute-ms", "20", "--model", "light",
                 "--seconds", "1.5", "--warmup", "0.5", "--trials", "1", "--out", str(out))
    rows = read_csv(out / "scaling.csv")
    assert len(rows) == 4
    assert {(r["mode"], r["workers"]) for r in rows} == {("sync", "1"), ("sync", "2"), ("async", "1"),
                                                         ("async", "2")}
    for r in rows:
        assert float(r["images_per_second"]) > 0 and float(r["updates_per_second"]) > 0
        assert float(r["compute_ms"]) == 20
        assert float(r["step_compute_ms"]) >= 19          # the worker slept that long per step
        assert int(r["step_records"]) > 0
        if r["mode"] == "sync":
            assert int(r["staleness_max"]) == 0            # BSP: never stale
            # a round of N pushes is one update
            assert float(r["images_per_second"]) == pytest.approx(
                float(r["updates_per_second"]) * 64 * int(r["workers"]), rel=0.05)
    doc = json.loads((out / "scaling.json").read_text())
    assert doc["synthetic"] is True and doc["cores"] >= 1 and doc["machine"]["usable_cores"] >= 1
    summary = {(s["mode"], s["workers"]): s for s in doc["summary"]}
    for s in summary.values():
        assert s["baseline_images_per_second"] == pytest.approx(64 * 1000 / 20)
        assert 0 < s["efficiency"] <= 1.05                # a worker cannot beat its own sleep
        assert s["oversubscribed"] == (s["workers"] > doc["cores"])
        assert s["model_images_per_second"] > 0 and s["model_bound"] in ("workers", "server", "cores")
    assert summary[("async", 1)]["measured_over_model"] == pytest.approx(1.0)   # the model is fit at N=1
    for name in ("scaling_throughput.png", "scaling_efficiency.png", "scaling_time_split.png"):
        assert_png(out / name)
    assert "efficiency" in proc.stdout and "img/s" in proc.stdout
    # every raw figure a researcher reads is documented (none was: the CSV's and JSON's fields were
    # named nowhere, and experiments.md said the CSV held the table)
    doc_text = (ROOT / "docs" / "scaling.md").read_text()
    assert "### The raw figures" in doc_text
    section = doc_text[doc_text.index("### The raw figures"):]
    section = section[:section.index("\n#")]
    named = set(re.findall(r"`([a-z_0-9]+)`", section))
    written = set(rows[0]) | {k for s in doc["summary"] for k in s} | set(doc)
    assert written - named == set(), sorted(written - named)


@pytest.mark.slow
def test_scaling_real_with_baseline_and_ddp(tmp_path, mnist_dir):
    """Real workers on MNIST, the single-process baseline in the same run, DDP when torch is there."""
    out = tmp_path / "scaling"
    bench("scaling", "--workers", "1", "--mode", "async", "--batch", "32", "--model", "light",
                 "--seconds", "1.5", "--warmup", "0.5", "--trials", "1", "--mnist-dir", mnist_dir,
                 "--out", str(out), timeout=300)
    doc = json.loads((out / "scaling.json").read_text())
    assert len(doc["baselines"]) == 1
    b = doc["baselines"][0]
    assert b["batch"] == 32 and b["data"] == "mnist" and b["images_per_second"] > 0
    (s,) = doc["summary"]
    assert s["baseline_images_per_second"] == pytest.approx(b["images_per_second"])
    assert s["efficiency"] == pytest.approx(s["images_per_second"] / b["images_per_second"], rel=1e-6)
    assert s["step_compute_ms"] > 0 and s["comm_ms"] >= 0 and s["wait_ms"] >= 0
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    # DDP is compared with sync points only: an async-only run has none
    assert doc["ddp"] == []
    assert "pscnn_over_ddp" not in s
    assert_png(out / "scaling_throughput.png")
    if has_torch:
        out2 = tmp_path / "scaling-sync"
        bench("scaling", "--workers", "1", "--mode", "sync", "--batch", "32", "--model", "light",
              "--seconds", "1", "--warmup", "0.5", "--trials", "1", "--mnist-dir", mnist_dir, "--ddp", "on",
              "--out", str(out2), timeout=300)
        doc2 = json.loads((out2 / "scaling.json").read_text())
        (d,) = doc2["ddp"]
        assert d["world"] == 1 and d["batch"] == 32 and d["images_per_second"] > 0
        (s2,) = doc2["summary"]
        assert s2["pscnn_over_ddp"] == pytest.approx(s2["images_per_second"] / d["images_per_second"], rel=1e-6)


def test_server_bench_with_echo_and_profile(tmp_path):
    out = tmp_path / "server"
    proc = bench("server", "--clients", "1,3", "--model", "light", "--seconds", "1", "--warmup", "0.5",
                 "--trials", "1", "--profile", "2", "--out", str(out))
    rows = read_csv(out / "server.csv")
    assert {(r["kind"], r["clients"]) for r in rows} == {("pscnn", "1"), ("pscnn", "3"), ("echo", "1"),
                                                         ("echo", "3")}
    for r in rows:
        assert int(r["cycles"]) > 0 and float(r["cycles_per_second"]) > 0
        assert float(r["latency_p99_ms"]) >= float(r["latency_p50_ms"]) > 0
        assert float(r["mb_per_second"]) > 0
        assert json.loads(r["errors"] or "{}") == {}
    doc = json.loads((out / "server.json").read_text())
    payload = doc["payload_bytes"]
    assert payload > 10_000                           # the light model's parameters, float32
    for r in doc["rows"]:                             # every cycle moves the model both ways
        assert r["mb_per_second"] * 1e6 == pytest.approx(2 * payload * r["cycles_per_second"], rel=0.05)
        if r["kind"] == "pscnn":                      # the server applied what the clients counted
            # (its two status answers bracket the clients' window only roughly on a loaded machine)
            assert 0.5 < r["server_updates_per_second"] / r["cycles_per_second"] < 2.0
        # CPU accounting from /proc: the main thread is part of the process; the machine's share is a share
        assert 0 < r["server_main_thread_fraction"] <= r["server_cpu_fraction"] + 0.05     # 10 ms ticks
        assert r["server_main_thread_ms_per_cycle"] == pytest.approx(
            1e3 * r["server_main_thread_fraction"] * r["window_s"] / r["cycles"])
        assert 0 < r["machine_busy_fraction"] <= 1
    for s in doc["summary"]:
        assert s["server_over_echo"] > 0
    assert (out / "server-profile.txt").read_text().count("ncalls") >= 1
    assert_png(out / "server_capacity.png")
    assert "server/echo" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]     # it names every file it wrote (but its lock), the profile's too
    assert [path.name for path in out.glob("[!.]*") if path.name not in last] == [], last


@pytest.mark.slow
def test_time_to_accuracy(tmp_path, mnist_dir):
    out = tmp_path / "tta"
    bench("time-to-accuracy", "--target", "0.5", "--workers", "1,2", "--mode", "async", "--model", "light",
          "--train-limit", "3000", "--test-limit", "500", "--epochs", "3", "--eval-every", "0.5",
          "--max-seconds", "90", "--mnist-dir", mnist_dir, "--out", str(out), timeout=300)
    rows = read_csv(out / "time_to_accuracy.csv")
    assert [(r["mode"], r["workers"]) for r in rows] == [("async", "1"), ("async", "2")]
    doc = json.loads((out / "time_to_accuracy.json").read_text())
    for r in doc["rows"]:
        assert r["evaluations"] >= 1 and r["best_accuracy"] is not None
        if r["reached"]:
            assert r["accuracy_at_target"] >= 0.5
            assert 0 < r["images_to_target"] <= r["images_seen"]
            assert r["seconds_to_target"] >= 0
    assert doc["rows"][0]["reached"], doc["rows"][0]       # one worker, light model, 3000 images: > 50%
    assert set(doc["curves"]) == {"async N=1", "async N=2"}
    assert_png(out / "time_to_accuracy.png")


def test_bad_list_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pscnn.cli", "bench", "scaling", "--workers", "1,x",
                           "--out", str(tmp_path / "x"), "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--workers" in proc.stderr


# --------------------------------------------------------------------------- pieces

def test_split_from_log_window_and_staleness(tmp_path):
    from pscnn.bench.cluster import split_from_log
    path = tmp_path / "metrics.jsonl"
    recs = [{"kind": "join", "seconds": 0.0, "worker": "w"}]
    for v in range(1, 11):
        recs.append({"kind": "step", "seconds": v * 0.1, "version": v, "samples": 64, "staleness": [v % 3],
                     "compute_s": 0.010, "comm_s": 0.002, "wait_s": 0.001 * (v > 5)})
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"kind\": \"st")   # a torn last line
    out = split_from_log(path, 5, 10)                  # versions 6..10
    assert out["step_records"] == 5
    assert out["step_compute_ms"] == pytest.approx(10.0) and out["wait_ms"] == pytest.approx(1.0)
    assert out["staleness_hist"] == {"0": 2, "1": 2, "2": 1}     # 6,9 -> 0; 7,10 -> 1; 8 -> 2
    assert out["staleness_max"] == 2


@pytest.mark.parametrize("trials", [1, 2])
def test_tta_plot_gives_each_configuration_one_colour_in_both_panels(trials, tmp_path, monkeypatch):
    """The bars were blue for sync and orange for every other mode while the curves took colours in
    turn: orange was "sync N=2" on the left and async on the right, and ssp's bars were async's."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from matplotlib.colors import to_rgba

    import pscnn.bench.tta as tta
    figures = {}
    monkeypatch.setattr(tta, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    configs = [(mode, n) for mode in ("sync", "async", "ssp") for n in (1, 2)]
    summary = [{"mode": mode, "workers": n, "seconds_to_target": 10.0 * n} for mode, n in configs]
    curves = {f"{mode} N={n}" + (f" t{t}" if trials > 1 else ""): [[0.0, 0, 0, 0.1], [10.0 * n, 640, 10, 0.95]]
              for t in range(trials) for mode, n in configs}
    tta.plot(summary, curves, tmp_path, target=0.9)
    curves_ax, bars_ax = figures["time_to_accuracy.png"].axes
    line_colours = {line.get_label(): to_rgba(line.get_color()) for line in curves_ax.lines}
    bar_colours = [patch.get_facecolor() for patch in bars_ax.patches]
    plt.close("all")                    # save_figure, which closes them, is replaced
    assert len(set(bar_colours)) == len(configs)
    for (mode, n), bar in zip(configs, bar_colours):
        for t in range(trials):
            assert line_colours[f"{mode} N={n}" + (f" t{t}" if trials > 1 else "")] == bar, (mode, n, t)


def test_tta_plot_of_runs_none_of_which_reached_the_target_has_no_negative_seconds(tmp_path, monkeypatch):
    """Every bar "not reached", all of height 0: the seconds axis ran from -0.05 to 0.05."""
    plt = pytest.importorskip("matplotlib.pyplot")
    import pscnn.bench.tta as tta
    figures = {}
    monkeypatch.setattr(tta, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    summary = [{"mode": "async", "workers": n, "seconds_to_target": None} for n in (1, 2)]
    curves = {f"async N={n}": [[0.0, 0, 0, 0.1], [0.5 * n, 640, 10, 0.6]] for n in (1, 2)}
    tta.plot(summary, curves, tmp_path, target=0.99)
    bars_ax = figures["time_to_accuracy.png"].axes[1]
    limits, texts = bars_ax.get_ylim(), [t.get_text() for t in bars_ax.texts]
    plt.close("all")                    # save_figure, which closes them, is replaced
    assert limits[0] == 0 and limits[1] > 0
    assert texts == ["not\nreached", "not\nreached"]


def test_each_bench_plot_says_what_it_measured_above_its_panels(tmp_path, monkeypatch):
    """Shown alone, "Server capacity", "Throughput vs workers" or "Time to accuracy" said nothing of
    the model, the batch, the mode or optimizer, or how many trials: only the terminal's table did."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from argparse import Namespace

    import pscnn.bench.scaling as scaling
    import pscnn.bench.server_bench as server_bench
    import pscnn.bench.tta as tta
    figures = {}
    for module in (scaling, server_bench, tta):
        monkeypatch.setattr(module, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    server_args = Namespace(model="light", mode="async", optimizer="sgd", trials=1)
    server_bench.plot([{"clients": 1, "pscnn_cycles_per_second": 1439.0, "pscnn_latency_p50_ms": 0.55,
                        "pscnn_latency_p99_ms": 0.86}], tmp_path, server_bench.setting(106792, server_args))
    scaling_args = Namespace(model="light", compute_ms=None, batch="64", seconds=2.0, trials=1)
    scaling.plot([{"mode": "sync", "workers": n, "batch": 64, "compute_ms": None, "oversubscribed": False,
                   "images_per_second": 6000.0 * n, "efficiency": 0.5, "baseline_images_per_second": 12000.0,
                   "step_compute_ms": 7.7, "comm_ms": 2.3, "wait_ms": 0.0} for n in (1, 2)],
                 tmp_path, 2, False, scaling.setting(scaling_args, 2))
    tta_args = Namespace(model="light", batch=64, test_limit=500, optimizer="auto", momentum=None, trials=1)
    tta.plot([{"mode": "sync", "workers": 1, "seconds_to_target": 1.2}], {"sync N=1": [[0.0, 0, 0, 0.1], [1.2, 6400, 100, 0.93]]},
             tmp_path, 0.9, tta.setting(tta_args, ["sync"]))
    titles = {name: fig.get_suptitle() for name, fig in figures.items()}
    plt.close("all")                    # save_figure, which closes them, is replaced
    assert titles["server_capacity.png"].startswith("light model, 0.11 MB each way; mode async, optimizer sgd; "
                                                    "medians of 1 trial, ")
    for name in ("scaling_throughput.png", "scaling_efficiency.png", "scaling_time_split.png"):
        assert titles[name].startswith("model light, batch 64; 2 s windows, medians of 1 trial; 2 cores"), name
    assert titles["time_to_accuracy.png"] == "model light, batch 64, 500 test images, optimizer auto: sgd for sync; 1 trial"


def test_tta_plot_zooms_on_the_accuracies_reached_not_the_untrained_models(tmp_path, monkeypatch):
    """docs/img/time_to_accuracy_099.png: every run's first evaluation (the untrained model, 0.07)
    set the axis' bottom, and the runs' 0.93-0.99, the part that says which reached 0.99 first,
    were a few pixels at its top. The axis spans the later evaluations; a run that stays low
    still sets it (as an async run stuck at 0.11 did). The legend, over the curves there, is beside them."""
    plt = pytest.importorskip("matplotlib.pyplot")
    import pscnn.bench.tta as tta
    figures = {}
    monkeypatch.setattr(tta, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    summary = [{"mode": "sync", "workers": n, "seconds_to_target": None} for n in (1, 2)]
    converging = {f"sync N={n}": [[0.0, 0, 0, 0.07], [12.0, 9000, 140, 0.93 + 0.02 * n], [60.0, 45000, 700, 0.985]]
                  for n in (1, 2)}
    tta.plot(summary, converging, tmp_path, target=0.99)
    fig = figures.pop("time_to_accuracy.png")
    zoomed = fig.axes[0].get_ylim()
    fig.tight_layout()                  # as save_figure does
    fig.canvas.draw()
    # zoomed in, the curves fill every corner: the legend stands beside them, clear of the bars' panel
    curves_box, legend_box = fig.axes[0].get_window_extent(), fig.axes[0].get_legend().get_window_extent()
    assert curves_box.x1 <= legend_box.x0 and legend_box.x1 <= fig.axes[1].get_tightbbox().x0
    stuck = {**converging, "sync N=2": [[0.0, 0, 0, 0.07], [12.0, 9000, 140, 0.11]]}
    tta.plot(summary, stuck, tmp_path, target=0.99)
    whole = figures["time_to_accuracy.png"].axes[0].get_ylim()
    plt.close("all")                    # save_figure, which closes them, is replaced
    assert 0.9 <= zoomed[0] <= 0.95 and zoomed[1] >= 0.99
    assert whole[0] <= 0.11


def test_tta_analysis_uses_version_times():
    from pscnn.bench.tta import analyse
    steps = [{"kind": "step", "seconds": 10.0 + v, "version": v, "samples": 64, "epoch": 0} for v in range(1, 21)]
    evals = [{"kind": "eval", "seconds": 16.5, "version": 5, "test_accuracy": 0.90},
             {"kind": "eval", "seconds": 22.0, "version": 11, "test_accuracy": 0.991},
             {"kind": "eval", "seconds": 28.0, "version": 17, "test_accuracy": 0.993}]
    row, curve = analyse(steps, evals, 0.99, 64)
    assert row["reached"] and row["version_at_target"] == 11
    assert row["seconds_to_target"] == pytest.approx(10.0)     # version 11 at 21 s, first update at 11 s
    assert row["images_to_target"] == 11 * 64
    assert row["best_accuracy"] == 0.993 and len(curve) == 3
    row, _ = analyse(steps, evals, 0.999, 64)
    assert not row["reached"] and row["seconds_to_target"] is None


def test_tta_scoring_time_counts_from_the_first_update():
    """Eval and step records share the run log's clock (eval records were on the training clock,
    and the time the target's score was recorded came out negative: -0.366 s in a real run)."""
    from pscnn.bench.tta import analyse
    steps = [{"kind": "step", "seconds": round(0.884 + 0.013 * v, 3), "version": v, "samples": 64, "epoch": 0}
             for v in range(1, 41)]                      # version 1 at 0.897 s, 40 at 1.404 s of the log
    evals = [{"kind": "eval", "seconds": 0.52, "version": 0, "test_accuracy": 0.135},
             {"kind": "eval", "seconds": 1.45, "version": 40, "test_accuracy": 0.79}]
    row, _ = analyse(steps, evals, 0.5, 64)
    assert row["version_at_target"] == 40 and row["seconds_to_target"] == pytest.approx(0.507)
    assert row["eval_seconds_to_target"] == pytest.approx(1.45 - 0.897)


def test_tta_speedup_is_the_median_of_per_trial_ratios():
    """As every ratio column: trial by trial, the 1-worker run against the N-worker run beside it
    (it was the ratio of the two medians: 10 s / 20 s = 0.5 here, where two trials of three saw 2x)."""
    from pscnn.bench.tta import summarize
    rows = [{"trial": t, "mode": "async", "workers": n, "reached": True, "seconds_to_target": secs,
             "images_to_target": 640, "best_accuracy": 0.99, "version_at_target": 10}
            for t, (one, two) in enumerate([(10.0, 5.0), (10.0, 20.0), (40.0, 20.0)])
            for n, secs in ((1, one), (2, two))]
    rows.append({"trial": 3, "mode": "async", "workers": 2, "reached": True, "seconds_to_target": 1.0,
                 "images_to_target": 64, "best_accuracy": 0.99, "version_at_target": 1})   # no 1-worker run
    one, two = summarize(rows, ["async"], [1, 2])
    assert one["speedup_vs_1"] == 1.0
    assert two["speedup_vs_1"] == pytest.approx(2.0)                  # median of 2, 0.5, 2


def test_tta_table_says_its_speedup_is_not_the_ratio_of_its_seconds(capsys):
    """The table printed 10.0 s for 1 worker, 20.0 s for 2 and a speed-up of 2.00, with no word that
    the speed-up is the median of per-trial ratios."""
    from argparse import Namespace

    from pscnn.bench.tta import report, summarize
    rows = [{"trial": t, "mode": "async", "workers": n, "reached": True, "seconds_to_target": secs,
             "images_to_target": 640, "best_accuracy": 0.99, "version_at_target": 10}
            for t, (one, two) in enumerate([(10.0, 5.0), (10.0, 20.0), (40.0, 20.0)])
            for n, secs in ((1, one), (2, two))]
    args = Namespace(target=0.99, test_limit=0, batch=64, optimizer="adam", lr=None, momentum=None, schedule=None,
                     trials=3)
    report(summarize(rows, ["async"], [1, 2]), args, {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].split()[3:7] == ["20.0", "640", "10", "2.00"], lines          # N=2: seconds, ..., speed-up
    assert lines[-1] == ("speed-up vs 1: the median over trials of (1 worker's seconds / N workers' seconds) "
                         "within each trial, not the ratio of the seconds column's medians")


def test_model_prediction_bounds():
    from pscnn.bench.scaling import _add_model
    pts = [{"mode": "async", "batch": 64, "compute_ms": 10.0, "workers": n, "images_per_second": ips,
            "step_compute_ms": 10.0, "server_cpu_ms_per_push": 2.0, "worker_cpu_ms_per_push": 1.0}
           for n, ips in ((1, 64 * 1000 / 12.5), (4, 64 * 300), (32, 64 * 480))]
    _add_model(pts, ncores=16)
    one, four, many = pts
    assert one["model_r_ms"] == pytest.approx(2.5) and one["measured_over_model"] == pytest.approx(1.0)
    assert four["model_images_per_second"] == pytest.approx(64 * 4 / 12.5e-3) and four["model_bound"] == "workers"
    assert many["model_images_per_second"] == pytest.approx(64 * 500) and many["model_bound"] == "server"
    _add_model(pts, ncores=1)                          # one core: cores / (s + w) = 333 pushes/s
    assert pts[2]["model_bound"] == "cores" and pts[2]["model_images_per_second"] == pytest.approx(64 * 1000 / 3)


def test_the_efficiency_plot_shows_every_point(tmp_path, monkeypatch):
    """An efficiency above 1.15 (a baseline that got less of a core than the workers, on a shared
    machine: 1.35 in a real run) was drawn above the plot's fixed top, out of sight."""
    pytest.importorskip("matplotlib")
    import pscnn.bench.scaling as scaling
    figures = {}
    monkeypatch.setattr(scaling, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    summary = [{"mode": "sync", "workers": n, "batch": 64, "compute_ms": None, "oversubscribed": False,
                "images_per_second": ips, "efficiency": eff, "cpu_efficiency": 0.9,
                "baseline_images_per_second": 1000.0} for n, ips, eff in ((1, 1350.0, 1.35), (2, 760.0, 0.38))]
    scaling.plot(summary, tmp_path, ncores=2, synthetic=False)
    ax = figures["scaling_efficiency.png"].axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 1.35


def test_the_throughput_plot_of_one_worker_count_shows_its_ideal(tmp_path, monkeypatch):
    """--workers 1: the ideal, a dashed line through one point, drew nothing, though the legend named it."""
    plt = pytest.importorskip("matplotlib.pyplot")
    import pscnn.bench.scaling as scaling
    figures = {}
    monkeypatch.setattr(scaling, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    summary = [{"mode": "sync", "workers": 1, "batch": 64, "compute_ms": None, "oversubscribed": False,
                "images_per_second": 6165.0, "efficiency": 0.46, "baseline_images_per_second": 13479.0}]
    scaling.plot(summary, tmp_path, ncores=2, synthetic=False)
    (ideal,) = [line for line in figures["scaling_throughput.png"].axes[0].lines
                if line.get_label().startswith("ideal")]
    plt.close("all")                    # save_figure, which closes them, is replaced
    assert list(ideal.get_ydata()) == [13479.0]
    assert ideal.get_marker() not in (None, "None", "", " ") and ideal.get_markersize() > 0


@pytest.mark.parametrize("synthetic", [True, False])
def test_the_scaling_line_plots_legends_are_beside_their_lines_not_over_them(synthetic, tmp_path, monkeypatch):
    """--compute-ms 2,10 --workers 1,2,4: the throughput legend's seven entries filled the upper
    left corner, over the 2 ms ideal line at 1 and 2 workers; no corner is free of lines with
    several series, so the legend is drawn right of the axes, inside the figure."""
    plt = pytest.importorskip("matplotlib.pyplot")
    import pscnn.bench.scaling as scaling
    figures = {}
    monkeypatch.setattr(scaling, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    computes = (2.0, 10.0) if synthetic else (None,)
    summary = [{"mode": mode, "workers": n, "batch": 64, "compute_ms": c, "oversubscribed": n > 2,
                "images_per_second": 3000.0 * n, "efficiency": 0.5, "cpu_efficiency": 0.7,
                "model_images_per_second": 3500.0 * n,
                "baseline_images_per_second": 64000.0 / c if synthetic else 6400.0}
               for c in computes for mode in ("sync", "async") for n in (1, 2, 4)]
    scaling.plot(summary, tmp_path, ncores=2, synthetic=synthetic)
    try:
        for name in ("scaling_throughput.png", "scaling_efficiency.png"):
            fig = figures[name]
            fig.tight_layout()              # as save_figure does
            fig.canvas.draw()
            (ax,) = fig.axes
            axes_box, legend_box = ax.get_window_extent(), ax.get_legend().get_window_extent()
            assert legend_box.x0 >= axes_box.x1 and legend_box.x1 <= fig.get_window_extent().x1, name
            assert axes_box.width / fig.dpi >= 5.0, name        # inches: the lines keep their room
    finally:
        plt.close("all")                # save_figure, which closes them, is replaced


@pytest.mark.parametrize("synthetic, computes, batches, ideals", [
    (True, (2.0, 10.0), (64,), ["ideal: N x a worker that only sleeps 2 ms",
                                "ideal: N x a worker that only sleeps 10 ms"]),
    (False, (None,), (64, 256), ["ideal: N x single process b64", "ideal: N x single process b256"]),
])
def test_the_throughput_plot_names_each_ideal_line(synthetic, computes, batches, ideals, tmp_path, monkeypatch):
    """--compute-ms: the ideal was labelled "N x single process", which synthetic workers have none
    of, and a second --compute-ms (or --batch) drew a second grey line with no label at all."""
    plt = pytest.importorskip("matplotlib.pyplot")
    import pscnn.bench.scaling as scaling
    figures = {}
    monkeypatch.setattr(scaling, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    summary = [{"mode": mode, "workers": n, "batch": b, "compute_ms": c, "oversubscribed": n > 2,
                "images_per_second": 100.0 * n, "efficiency": 0.9,
                "baseline_images_per_second": 1000.0 * b / c if synthetic else 1000.0}
               for c in computes for b in batches for mode in ("async", "sync") for n in (1, 2)]
    scaling.plot(summary, tmp_path, ncores=2, synthetic=synthetic)
    labels = figures["scaling_throughput.png"].axes[0].get_legend_handles_labels()[1]
    plt.close("all")                    # save_figure, which closes them, is replaced
    assert [t for t in labels if t.startswith("ideal")] == ideals


@pytest.mark.parametrize("trials, label", [(1, "ms per step (mean over the window)"),
                                           (3, "ms per step (window mean, median of trials)")])
def test_the_time_split_plot_says_its_bars_are_medians_of_trials(trials, label, tmp_path, monkeypatch):
    """With several trials a bar is the median of the windows' means; the axis said "mean over the window"."""
    plt = pytest.importorskip("matplotlib.pyplot")
    import pscnn.bench.scaling as scaling
    figures = {}
    monkeypatch.setattr(scaling, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    summary = [{"mode": "async", "workers": n, "batch": 64, "compute_ms": 5.0, "oversubscribed": False,
                "trials": trials, "images_per_second": 1000.0 * n, "efficiency": 0.9, "baseline_images_per_second": 12800.0,
                "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0} for n in (1, 2)]
    scaling.plot(summary, tmp_path, ncores=2, synthetic=True)
    label_drawn = figures["scaling_time_split.png"].axes[0].get_ylabel()
    plt.close("all")                    # save_figure, which closes them, is replaced
    assert label_drawn == label


@pytest.mark.parametrize("computes, batches", [((2.0, 10.0), (64,)), ((10.0,), (64, 256)),
                                               ((2.0, 10.0, 50.0, 100.0), (64,))])
def test_the_time_split_plots_labels_do_not_overlap(computes, batches, tmp_path, monkeypatch):
    """Twelve bars (2 compute times x 2 modes x 3 worker counts) had their labels written over each
    other; many more are turned upright. The labels are 8 pt: at 6 pt (7 pixels high) they could
    not be read projected."""
    pytest.importorskip("matplotlib")
    import pscnn.bench.scaling as scaling
    figures = {}
    monkeypatch.setattr(scaling, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    summary = [{"mode": mode, "workers": n, "batch": b, "compute_ms": c, "oversubscribed": n > 2,
                "images_per_second": 1000.0 * n, "efficiency": 0.9, "baseline_images_per_second": 1000.0,
                "step_compute_ms": c, "comm_ms": 5.0, "wait_ms": 1.0}
               for c in computes for b in batches for mode in ("async", "sync") for n in (1, 2, 4)]
    scaling.plot(summary, tmp_path, ncores=2, synthetic=True)
    fig = figures["scaling_time_split.png"]
    fig.tight_layout()
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in fig.axes[0].get_xticklabels()]
    assert all(t.get_fontsize() >= 8 for t in fig.axes[0].get_xticklabels())
    assert len(boxes) == len(summary)
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))


def _log_axis_labels(ax) -> list[str]:
    """The labels a drawn log y axis shows, major and minor ticks, those inside the axes."""
    low, high = ax.get_ylim()
    return [label.get_text() for tick in ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()
            for label in (tick.label1,) if tick.get_visible() and label.get_text() and low <= tick.get_loc() <= high]


@pytest.mark.parametrize("latencies", [((0.55, 0.86, 0.24, 0.34), (1.99, 4.60, 0.70, 1.97)),    # under a decade
                                       ((2.2, 2.8, 0.9, 1.2), (120.0, 150.0, 66.0, 120.0))])      # over two
def test_the_latency_plot_writes_its_ticks_as_plain_milliseconds(latencies, tmp_path, monkeypatch):
    """Over less than a decade (a 2-client run: 0.24-4.6 ms) every tick read as a power of ten,
    "3x10^-1 ... 4x10^0": hard to read projected; the ticks are plain numbers, as few as before."""
    plt = pytest.importorskip("matplotlib.pyplot")
    import pscnn.bench.server_bench as server_bench
    figures = {}
    monkeypatch.setattr(server_bench, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    summary = [{"clients": n, "pscnn_cycles_per_second": 1500.0, "echo_cycles_per_second": 4000.0,
                "pscnn_latency_p50_ms": p50, "pscnn_latency_p99_ms": p99, "echo_latency_p50_ms": e50,
                "echo_latency_p99_ms": e99} for n, (p50, p99, e50, e99) in zip((1, 4), latencies)]
    server_bench.plot(summary, tmp_path)
    fig = figures["server_capacity.png"]
    fig.canvas.draw()
    labels = _log_axis_labels(fig.axes[1])
    plt.close("all")                    # save_figure, which closes them, is replaced
    assert 2 <= len(labels) <= 12, labels
    assert all(re.fullmatch(r"[0-9,]+(\.[0-9]+)?", text) for text in labels), labels


def test_the_synthetic_throughput_plot_writes_its_ticks_as_plain_numbers(tmp_path, monkeypatch):
    """--compute-ms's throughput is on a log axis; its ticks read "10^4", or "6x10^3" within a decade."""
    plt = pytest.importorskip("matplotlib.pyplot")
    import pscnn.bench.scaling as scaling
    figures = {}
    monkeypatch.setattr(scaling, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    summary = [{"mode": "async", "workers": n, "batch": 64, "compute_ms": 10.0, "oversubscribed": False,
                "images_per_second": ips, "efficiency": 0.9, "baseline_images_per_second": 6400.0}
               for n, ips in ((1, 3900.0), (2, 6900.0))]
    scaling.plot(summary, tmp_path, ncores=2, synthetic=True)
    fig = figures["scaling_throughput.png"]
    fig.canvas.draw()
    labels = _log_axis_labels(fig.axes[0])
    plt.close("all")
    assert 2 <= len(labels) <= 12, labels
    assert all(re.fullmatch(r"[0-9,]+(\.[0-9]+)?", text) for text in labels), labels


def test_parse_list_and_outputs(tmp_path):
    from pscnn.bench.common import parse_list, percentile, write_outputs
    assert parse_list("1, 2,4") == [1, 2, 4]
    assert parse_list("0.5,2", float) == [0.5, 2.0]
    with pytest.raises(ValueError, match="--workers"):
        parse_list("1,,a", int, "--workers")
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5) and percentile([], 50) is None
    csv_path, json_path = write_outputs(tmp_path, "x", [{"a": 1, "h": {"0": 3}}, {"a": 2.5, "b": None}], {"m": 1})
    rows = read_csv(csv_path)
    assert rows[0]["a"] == "1" and json.loads(rows[0]["h"]) == {"0": 3} and rows[1]["b"] == ""
    assert json.loads(json_path.read_text())["rows"][1]["a"] == 2.5


def test_throughput_benchmarks_compare_one_update():
    """The scaling bench's servers and its single-process baseline make the same update, one
    gentle enough that stale async points stay finite (a diverged server loses the point)."""
    import inspect

    from pscnn.bench import baseline, scaling
    from pscnn.bench.cluster import server_flags
    from pscnn.bench.common import THROUGHPUT_LR, THROUGHPUT_MOMENTUM

    flags = server_flags("async", 64, Path("unused"))
    assert flags[flags.index("--optimizer") + 1] == "sgd"
    assert float(flags[flags.index("--lr") + 1]) == THROUGHPUT_LR
    assert float(flags[flags.index("--momentum") + 1]) == THROUGHPUT_MOMENTUM
    assert "--momentum" not in server_flags("async", 64, Path("unused"), optimizer="adam")
    params = inspect.signature(baseline.measure).parameters
    assert (params["lr"].default, params["momentum"].default) == (THROUGHPUT_LR, THROUGHPUT_MOMENTUM)
    cmd = scaling.baseline_command("seed", 64, 1.0, None, 0.003)      # a user's --lr reaches the baseline
    assert float(cmd[cmd.index("--lr") + 1]) == 0.003
    assert float(cmd[cmd.index("--momentum") + 1]) == THROUGHPUT_MOMENTUM


def test_the_benches_hand_their_children_values_that_begin_with_a_dash(monkeypatch):
    """``pscnn bench scaling --out=-b``: its servers got ``--out -b/...``, which the server's parser took for
    a flag of its own ("pscnn bench scaling: error: pscnn server: error: argument --out: expected one
    argument", exit 2); the same for a --mnist-dir or a model file whose name begins with -."""
    from types import SimpleNamespace

    from pscnn.bench import baseline, scaling, tta
    from pscnn.bench.cluster import server_flags, worker_flags
    from pscnn.cli import parse_args

    server = parse_args(["server", *server_flags("async", 64, Path("-b/point"), model="-m.json", mnist_dir="-mnist")], {})
    assert (server.out, server.model, server.mnist_dir) == ("-b/point", "-m.json", "-mnist")
    worker = parse_args(["worker", "--server", "tcp://127.0.0.1:1", *worker_flags(1, None, "-mnist")], {})
    assert worker.mnist_dir == "-mnist"
    run = SimpleNamespace(batch=64, epochs=1, train_limit=0, test_limit=0, model="-m.json", optimizer="sgd", lr=None,
                          momentum=None, schedule=None)
    server = parse_args(["server", *tta.server_flags("async", run, Path("-b/run"), "-mnist")], {})
    assert (server.out, server.model, server.mnist_dir) == ("-b/run", "-m.json", "-mnist")
    run = SimpleNamespace(eval_every=5.0, test_limit=0, threads=1)
    evaluator = parse_args(["evaluator", "--server", "tcp://127.0.0.1:1", *tta.evaluator_flags(run, "-mnist")], {})
    assert evaluator.mnist_dir == "-mnist"
    measured = {}
    monkeypatch.setattr(baseline, "measure", lambda model, *args, **kwargs: measured.update(model=model, args=args) or {})
    assert baseline.main(scaling.baseline_command("-m.json", 64, 1.0, "-mnist", 0.01)[3:]) == 0
    assert (measured["model"], measured["args"][-1]) == ("-m.json", "-mnist")


SHORT = ["--compute-ms", "5", "--workers", "1", "--trials", "1", "--seconds", "0.3", "--warmup", "0"]


@pytest.mark.parametrize("argv, needle", [
    (["scaling", "--workers", "0,2"], "--workers: every value must be >= 1, got 0"),
    (["scaling", "--compute-ms", "5,-1"], "--compute-ms: every value must be >= 0, got -1"),
    (["scaling", "--compute-ms", "nan"], "--compute-ms: every value must be >= 0, got nan"),
    (["scaling", "--mode", "sync,bsp"], "--mode: 'bsp' is not one of sync, async, ssp"),
    (["time-to-accuracy", "--mode", "foo"], "--mode: 'foo' is not one of sync, async, ssp"),
    (["time-to-accuracy", "--workers", "-1"], "--workers: every value must be >= 1, got -1"),
    (["server", "--clients", "4,0"], "--clients: every value must be >= 1, got 0"),
    (["server", "--trials", "0"], "argument --trials: must be >= 1, got 0"),
    (["server", "--clients", "4,10000000000"], "--clients: every value must be at most 1024, got 10000000000"),
    (["server", "--clients", "99999999"], "--clients: every value must be at most 1024, got 99999999"),    # hung
    (["server", "--profile", "99999999"], "argument --profile: must be at most 1024, got 99999999"),     # hung
    (["scaling", "--compute-ms", "5,inf"], "--compute-ms: every value must be at most 1e9, got inf"),
    (["scaling", "--batch", "70000"], "--batch: every value must be at most 60000, got 70000"),   # baseline crashed
    (["scaling", "--compute-ms", "2,1e9", "--workers", "1", "--mode", "async", "--trials", "1", "--seconds", "5",
      "--warmup", "0"], "--compute-ms 1e+09: a step that takes the whole --seconds 5 window or longer measures "
                        "nothing"),
    (["server", "--clients", "4,1,4", "--trials", "1", "--seconds", "0.2", "--warmup", "0", "--no-echo"],
     "--clients: 4 is given twice"),                                  # the table listed 4 clients twice
    (["scaling", "--mode", "async,async", *SHORT], "--mode: async is given twice"),
    # flags that did nothing in the run asked for (--ddp on: also with torch installed; short runs
    # without the checks)
    (["scaling", "--mode", "sync", "--overlap", *SHORT], "--overlap applies to --mode async only, not to --mode sync"),
    (["scaling", "--mode", "sync,async", "--staleness", "1", *SHORT],
     "--staleness bounds --mode ssp points only, not --mode sync,async"),
    (["time-to-accuracy", "--mode", "sync", "--staleness", "1", "--workers", "1", "--model", "light", "--epochs", "1",
      "--max-seconds", "20", "--train-limit", "500", "--test-limit", "100"],
     "--staleness bounds --mode ssp runs only, not --mode sync"),
    (["scaling", "--baseline-seconds", "3", *SHORT], "--baseline-seconds: --compute-ms workers have no single"),
    (["scaling", "--threads", "4", *SHORT], "--threads 4: --compute-ms workers sleep instead of computing, with no "
                                            "BLAS to thread"),             # was ignored
    (["server", "--clients", "1,4", "--processes", "8"], "--processes 8: more client processes than clients "
                                                         "(--clients 1,4); each process runs one client at least"),
    (["scaling", "--mode", "sync", "--ddp", "on", *SHORT],
     "--ddp on: DDP is compared with --mode sync points of real workers, not with --compute-ms"),
    (["scaling", "--mode", "async", "--ddp", "on", *SHORT[2:]], "--ddp on: DDP is compared with --mode sync points "
                                                               "of real workers, not with --mode async"),
    (["server", "--seconds", "-1"], "argument --seconds: must be > 0, got -1"),
    (["scaling", "--threads", "x"], "argument --threads: must be an integer, got 'x'"),
    (["time-to-accuracy", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["time-to-accuracy", "--target", "99"], "argument --target: must be a fraction in (0, 1], got 99"),
    (["time-to-accuracy", "--target", "nan"], "argument --target: must be a fraction in (0, 1], got nan"),
    # more workers than an epoch has batches: the point waited 140 s for 4 pushes, then failed, and
    # time-to-accuracy reported N = 3 for a run in which 2 workers computed
    (["scaling", "--compute-ms", "5", "--workers", "1,4", "--batch", "64,30000", "--mode", "async", "--trials", "1",
      "--seconds", "0.3", "--warmup", "0"],
     "--workers 4 exceeds the 2 batches of an epoch (60,000 training images, --batch 30000): a worker computes "
     "one batch at a time, so 2 of them would have none"),
    (["time-to-accuracy", "--workers", "1,3", "--mode", "sync", "--train-limit", "500", "--batch", "300",
      "--model", "light", "--epochs", "1", "--max-seconds", "20", "--test-limit", "100"],
     "--workers 3 exceeds the 2 batches of an epoch (500 training images, --batch 300)"),
])
def test_bad_bench_flags_are_one_line_usage_errors_before_anything_runs(argv, needle, tmp_path, capsys):
    from pscnn.cli import main
    out = tmp_path / "out"
    try:
        code = main(["bench", *argv, "--out", str(out), "--no-progress"])
    except SystemExit as exc:           # argparse's own errors
        code = exc.code
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()             # nothing ran, nothing written


@pytest.mark.parametrize("bench_name", ["scaling", "server", "time-to-accuracy"])
def test_every_bench_flag_says_what_it_does(bench_name, capsys):
    """`pscnn bench X --help` listed --no-plots and --no-progress with no word, and its description
    in reST markup (``pscnn bench server``: ...)."""
    from pscnn.cli import main
    with pytest.raises(SystemExit) as info:
        main(["bench", bench_name, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and f"pscnn bench {bench_name}: " in " ".join(text.split())
    options = text[text.index("options:"):].splitlines()[1:]
    for i, line in enumerate(options):      # a flag's help follows it on its line or on the next
        if line.lstrip().startswith("--"):
            helped = len(line.strip().split("  ")) > 1 or (i + 1 < len(options) and options[i + 1].startswith(" " * 8))
            assert helped, line
    assert "replaced" in " ".join(text.split()), text           # --out says what happens to an earlier run's


def test_engine_benchmark_runs_and_reports_every_contender(tmp_path):
    """benchmarks/bench_engine.py end to end at a toy size: the JSON it writes (no timing is asserted).
    The batch takes two chunks, as the benchmark's own does: the layer timing wraps a chunked step's calls."""
    out = tmp_path / "engine.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_engine.py", "--trials", "1", "--steps", "1",
                           "--reference-steps", "1", "--batch", str(Model.CPU_CHUNK + 1), "--infer-batch", "16",
                           "--no-torch",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "; medians of 1 trial (ratios: " in proc.stdout, proc.stdout        # it said "1 trials"
    doc = json.loads(out.read_text())
    assert set(doc["images_per_second"]["train"]) == {"pscnn", "pscnn_whole_batch", "reference_f64_loops"}
    assert set(doc["images_per_second"]["infer"]) == {"pscnn"}
    assert all(v > 0 for kind in doc["images_per_second"].values() for v in kind.values())
    assert doc["pscnn_over"]["train"]["pscnn"] == 1.0
    assert {"conv1", "conv2", "fc1", "fc2", "sgd_update", "loss, chunk sums"} <= set(doc["step_breakdown_ms"])
    assert all(v >= 0 for v in doc["step_breakdown_ms"].values())
    bad = subprocess.run([sys.executable, "benchmarks/bench_engine.py", "--trials", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "argument --trials: must be >= 1, got 0" in bad.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--infer-batch", "1000000000"], "argument --infer-batch: must be at most 10000, got 1000000000"),
    (["--batch", "1000000000"], "argument --batch: must be at most 60000, got 1000000000"),
])
def test_engine_benchmark_batches_stop_at_mnists_sizes(argv, needle):
    """A batch larger than MNIST's split is a usage error: a billion images was a numpy MemoryError
    traceback (5.7 TiB) once the flags were read."""
    proc = subprocess.run([sys.executable, "benchmarks/bench_engine.py", "--trials", "1", "--steps", "1",
                           "--reference-steps", "1", "--no-torch", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(needle), proc.stderr


def test_engine_benchmark_interrupted_says_so_in_one_line():
    """Ctrl-C during `make bench` ended in a KeyboardInterrupt traceback."""
    proc = popen_taking_ctrl_c([sys.executable, "benchmarks/bench_engine.py", "--trials", "1000", "--no-torch"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []

    def measuring() -> bool:                    # its progress bar: "trials: ..."
        seen.append(proc.stderr.read(1))
        return "trials" in "".join(seen)
    err = interrupt_when(proc, measuring, 120, "bench_engine.py's progress bar")
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "bench_engine.py: interrupted"


def test_engine_benchmark_without_threadpoolctl_says_so(tmp_path):
    """threadpoolctl comes with the test extra, not with pscnn: without it the script ended in a
    ModuleNotFoundError traceback."""
    fake = tmp_path / "threadpoolctl"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no threadpoolctl here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "benchmarks/bench_engine.py", "--trials", "1", "--no-torch"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: threadpoolctl is not installed: pip install threadpoolctl" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("where, needle", [
    ("missing/engine.json", "argument --json: the folder {tmp}/missing does not exist"),
    ("", "argument --json: {tmp} is a folder, not a file"),
])
def test_engine_benchmark_checks_its_json_path_before_measuring(where, needle, tmp_path):
    """--json into a missing folder (or naming a folder) is a usage error at once: it used to be a
    FileNotFoundError traceback after the whole benchmark had run, its results lost."""
    proc = subprocess.run([sys.executable, "benchmarks/bench_engine.py", "--trials", "1", "--steps", "1",
                           "--reference-steps", "1", "--batch", "8", "--infer-batch", "16", "--no-torch",
                           "--json", str(tmp_path / where) if where else str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(needle.format(tmp=tmp_path)), proc.stderr
    assert "img/s" not in proc.stdout               # nothing was measured


@pytest.mark.parametrize("argv, needle", [
    (["--json", "{tmp}/missing/gpu.json"], "argument --json: the folder {tmp}/missing does not exist"),
    (["--trials", "0"], "argument --trials: must be >= 1, got 0"),
    (["--trials", "-1"], "argument --trials: must be >= 1, got -1"),
])
def test_gpu_check_refuses_bad_flags_before_it_runs(argv, needle, tmp_path):
    """--json into a missing folder was a FileNotFoundError traceback once every check and timing had
    run, the results lost; --trials 0 silently meant the default, and -1 timed nothing."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-dry-run", "--no-torch",
                           *(a.format(tmp=tmp_path) for a in argv)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(needle.format(tmp=tmp_path)), proc.stderr
    assert "correctness checks" not in proc.stdout      # nothing was run


@pytest.mark.parametrize("argv", [
    ["benchmarks/bench_engine.py", "--tri", "x"],
    ["benchmarks/gpu_check.py", "--cpu-dry-run", "--tri", "x"],
    ["-m", "pscnn.bench.baseline", "--bat", "x"],
    ["-m", "pscnn.bench.ddp", "--rank", "0", "--world", "1", "--port", "1", "--result", "r.json", "--bat", "x"],
    ["-m", "pscnn.bench.synth", "clients", "--endpoint", "tcp://127.0.0.1:1", "--result", "r.json", "--cou", "x"],
])
def test_benchmark_scripts_refuse_an_abbreviated_flag(argv):
    """argparse took `--tri 1` for `--trials 1`: an abbreviation changes meaning when a flag sharing
    its start is added, as pscnn's own flags no longer allow.  (The value is bad, so that a script
    that still took the abbreviation stops at its flag's error rather than running.)"""
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(f"error: unrecognized arguments: {' '.join(argv[-2:])}")


def test_gpu_check_interrupted_says_so_in_one_line():
    """Ctrl-C during benchmarks/gpu_check.py ended in a KeyboardInterrupt traceback."""
    proc = popen_taking_ctrl_c([sys.executable, "benchmarks/gpu_check.py", "--cpu-dry-run", "--no-torch",
                                "--trials", "100000"], cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []

    def running() -> bool:                      # its first lines: "python ..., numpy ...", "CPU DRY RUN: ..."
        seen.append(proc.stdout.read(1))
        return "CPU DRY RUN" in "".join(seen)
    err = interrupt_when(proc, running, 120, "gpu_check.py's first lines")
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "gpu_check.py: interrupted"


# --------------------------------------------------------------------------- failures: one line, never a traceback

# The smallest run of each bench: without the checks up front, a case below starts real processes, so
# these bound how long it could take (a bench that hangs until --max-seconds, or runs and exits 0).
TINY = {"server": ["--clients", "1", "--seconds", "0.2", "--warmup", "0", "--trials", "1", "--no-echo"],
        "scaling": ["--compute-ms", "0", "--workers", "1", "--mode", "async", "--seconds", "0.5", "--warmup", "0",
                    "--trials", "1"],
        "time-to-accuracy": ["--workers", "1", "--mode", "sync", "--model", "light", "--max-seconds", "20",
                             "--train-limit", "500", "--test-limit", "100"]}
WRONG_INPUT = json.dumps({"input_shape": [3, 32, 32], "layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]})


def bench_fails(*argv, timeout=120) -> subprocess.CompletedProcess:
    """Run a bench as a user does, expecting it to fail: stdout and stderr, no assertion on the status."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "pscnn.cli", "bench", *argv, "--no-progress", "--no-plots",
                           "--keep-openblas-env"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("argv, needle", [
    (["server", "--model", "bogus"], "unknown model preset 'bogus'"),
    (["scaling", "--model", "bogus"], "unknown model preset 'bogus'"),
    (["time-to-accuracy", "--model", "bogus"], "unknown model preset 'bogus'"),
    (["time-to-accuracy", "--model", WRONG_INPUT], "but MNIST images are [1, 28, 28]"),
    (["time-to-accuracy", "--schedule", "foo"], "unknown schedule 'foo'"),
    (["time-to-accuracy", "--momentum", "0.5", "--optimizer", "adam"],
     "--momentum is used only by --optimizer sgd, not by --optimizer adam"),
    (["time-to-accuracy", "--mnist-dir", "/nonexistent-pscnn-mnist"], "/nonexistent-pscnn-mnist: MNIST folder"),
])
def test_what_a_server_or_worker_would_refuse_is_one_line_before_anything_starts(argv, needle, tmp_path):
    """Bad model / optimizer / schedule / MNIST folder: refused by the checks the main CLI, the server
    and the workers make themselves, in one line with exit status 2, before any process starts (they
    used to give a traceback, an empty table with exit 0, or a hang until --max-seconds)."""
    out = tmp_path / "out"
    bench_name, rest = argv[0], argv[1:]
    proc = bench_fails(bench_name, *TINY[bench_name], *rest, "--out", str(out), timeout=180)
    exit_error_line(proc, 2, needle, starts="pscnn bench ", alone=True)
    assert not out.exists()             # nothing ran, nothing written


def test_more_workers_than_a_server_takes_is_an_option_error():
    """Checked in-process: were the check to regress, a subprocess would start 2000 workers."""
    from pscnn.bench.cluster import server_flags
    from pscnn.bench.common import OptionError, check_server_flags, checking_options
    with pytest.raises(OptionError, match="--workers 2000 exceeds --max-workers 1024"), checking_options():
        check_server_flags(server_flags("async", 64, Path("unused"), model="light"), workers=2000)


def test_a_benchmarks_server_flags_build_the_model_once_for_their_checks(monkeypatch):
    """check_server_flags with trainers made pscnn run's checks (check_run_args, which builds the model and
    its optimizer), then a ParameterServer, which builds them again: the scaling bench does so for each
    mode and batch size, a model's random initialization twice each (4 s for 26 million parameters)."""
    from pscnn.bench.cluster import server_flags
    from pscnn.bench.common import check_server_flags
    built = counted_model_builds(monkeypatch)
    check_server_flags(server_flags("async", 64, Path("unused"), model="light"), workers=2)
    assert built == ["light"], built


@pytest.mark.parametrize("argv, needle", [
    (["time-to-accuracy", "--optimizer", "foo"], "argument --optimizer: invalid choice: 'foo'"),
    (["scaling", "--mnist-dir", ""], "argument --mnist-dir: must name a folder, got an empty string"),
    (["time-to-accuracy", "--mnist-dir", " "], "argument --mnist-dir: must name a folder, got an empty string"),
])
def test_bad_bench_flag_values_are_usage_errors(argv, needle, tmp_path, capsys):
    from pscnn.cli import main
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:    # argparse's own errors
        main(["bench", *argv, *TINY[argv[0]], "--out", str(out), "--no-progress", "--no-plots"])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_bench_out_takes_the_main_clis_path_checks(tmp_path, monkeypatch, capsys):
    """--out '' is refused (it would write into the current folder), and --out naming a file says so,
    as ``pscnn train --out`` does, instead of "cannot write: File exists"."""
    from pscnn.cli import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["bench", "scaling", *TINY["scaling"], "--out", "", "--no-progress", "--no-plots"])
    assert info.value.code == 2
    assert "argument --out: must name a folder, got an empty string" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []           # nothing written into the current folder
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    proc = bench_fails("scaling", *TINY["scaling"], "--out", str(afile))
    exit_error_line(proc, 2, f"--out {afile} is a file, not a folder", starts="pscnn bench ")
    assert afile.read_text() == "keep me\n"


def test_server_bench_server_that_dies_is_one_line_with_its_last_log_line(tmp_path, monkeypatch, capsys):
    """A server that passed the checks but exits anyway (here: a stand-in that logs one line and exits
    3): one line naming it, its exit status and its last log line; exit 1, no traceback."""
    import pscnn.bench.server_bench as server_bench
    from pscnn.cli import main
    real_popen = subprocess.Popen

    def popen(cmd, *args, **kwargs):
        if "server" in cmd:             # `python -m pscnn server ...`, not the synthetic clients
            cmd = [sys.executable, "-c", "import sys; print('starting'); print('bind: Address already in use');"
                                         " sys.exit(3)"]
        return real_popen(cmd, *args, **kwargs)
    monkeypatch.setattr(server_bench.subprocess, "Popen", popen)
    code = main(["bench", "server", *TINY["server"], "--model", "light", "--out", str(tmp_path / "out"),
                 "--no-progress", "--no-plots"])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("pscnn bench server: error: every server point failed (1 of 1; ") and last.endswith(
        "the first: the pscnn server (1 client) exited with 3: bind: Address already in use"), err


def test_a_bench_draws_no_progress_bar_into_a_pipe(tmp_path, capsys):
    """Without --no-progress a bench drew its bar into a pipe or log file too (carriage returns),
    where pscnn train's is drawn only on a terminal."""
    from pscnn.cli import main
    code = main(["bench", "server", *TINY["server"], "--model", "light", "--out", str(tmp_path / "out"), "--no-plots"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "\r" not in err and "bench server" not in err, err[-3000:]


@pytest.mark.parametrize("bench_name, extra, taken_call", [
    ("server", [], 0),                                              # the pscnn server's port
    ("server", ["--model", "light"], 1),                             # the echo's (--no-echo dropped below)
])
def test_a_point_whose_port_was_taken_is_measured_on_another(bench_name, extra, taken_call, tmp_path,
                                                              monkeypatch, capsys, request):
    """free_port() finds a port free, and another process may take it before the point's server binds
    it: the point was kept as failed (every point failed: exit 1), or, for the echo, measured as 0
    cycles/s with no error at all; now it is measured again on another port, and that is said."""
    import socket

    import pscnn.launcher as launcher
    from pscnn.cli import main
    argv = [*TINY[bench_name], *extra]
    if taken_call == 1:                 # the echo, measured after the pscnn server
        argv.remove("--no-echo")
    if bench_name == "time-to-accuracy":
        argv += ["--mnist-dir", request.getfixturevalue("mnist_dir")]
    real_free_port = launcher.free_port
    given = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()

        def free_port():                # one call gets the port this test holds
            given.append(taken.getsockname()[1] if len(given) == taken_call else real_free_port())
            return given[-1]
        monkeypatch.setattr(launcher, "free_port", free_port)
        out = tmp_path / "out"
        code = main(["bench", bench_name, *argv, "--out", str(out), "--no-progress", "--no-plots"])
    err = capsys.readouterr().err
    assert code == 0, err
    endpoint = f"tcp://127.0.0.1:{given[taken_call]}"
    assert f"cannot bind {endpoint}: Address already in use; measuring it again on another port (try 2 of 3)" in err
    rows = json.loads(next(out.glob("*.json")).read_text())["rows"]
    assert rows and all("error" not in r for r in rows), rows
    assert len(given) == len(rows) + 1          # one port more than points: the one taken
    if bench_name == "server":
        assert all(r["cycles"] > 0 for r in rows), [(r["kind"], r["cycles"]) for r in rows]


@pytest.mark.parametrize("bench_name, extra", [("scaling", []), ("time-to-accuracy", ["--epochs", "1"])])
def test_a_cluster_points_server_binds_a_port_no_other_process_took(bench_name, extra, tmp_path, monkeypatch,
                                                                     capsys, request):
    """A scaling or time-to-accuracy point's server was told a port free_port() had found free, which
    another process could take before the server bound it: the point was measured again on another
    port, up to 3 times, then failed.  Its server binds a free port itself now (LocalCluster.start_server):
    with every port free_port() finds taken at once, each point is measured the first time."""
    import socket

    import pscnn.launcher as launcher
    from pscnn.cli import main
    argv = [*TINY[bench_name], *extra]
    if bench_name == "time-to-accuracy":
        argv += ["--mnist-dir", request.getfixturevalue("mnist_dir")]
    real_free_port, taken = launcher.free_port, []

    def taken_at_once():
        holder = socket.socket()
        holder.bind(("127.0.0.1", real_free_port()))
        holder.listen()
        taken.append(holder)
        return holder.getsockname()[1]
    monkeypatch.setattr(launcher, "free_port", taken_at_once)
    out = tmp_path / "out"
    try:
        code = main(["bench", bench_name, *argv, "--out", str(out), "--no-progress", "--no-plots"])
    finally:
        for holder in taken:
            holder.close()
    err = capsys.readouterr().err
    assert code == 0, err
    assert "measuring it again on another port" not in err, err
    rows = json.loads(next(out.glob("*.json")).read_text())["rows"]
    assert rows and all("error" not in r for r in rows), rows


def test_a_ddp_run_whose_port_was_taken_is_measured_on_another(tmp_path, monkeypatch, capsys, mnist_dir):
    """DDP's rank 0 listens on a port free_port() found: when another process took it first, rank 0
    failed at once while the other ranks waited for it until the reference's time limit (4 x
    --seconds + 120 s), and the DDP point was lost; now it is measured again on another port."""
    pytest.importorskip("torch")
    import socket

    import pscnn.bench.cluster as cluster
    import pscnn.bench.scaling as scaling
    import pscnn.launcher as launcher
    from pscnn.cli import main
    monkeypatch.setattr(cluster, "measure_point", lambda out, **point: {
        "window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0, "updates_per_second": 10.0,
        "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0})
    monkeypatch.setattr(scaling, "_baseline", lambda *args: {"images_per_second": 400.0})
    real_free_port = launcher.free_port
    given = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()

        def free_port():                # DDP's first port is the one this test holds
            given.append(real_free_port() if given else taken.getsockname()[1])
            return given[-1]
        monkeypatch.setattr(launcher, "free_port", free_port)
        out = tmp_path / "out"
        assert main(["bench", "scaling", "--workers", "2", "--mode", "sync", "--ddp", "on", "--trials", "1",
                     "--seconds", "0.5", "--warmup", "0", "--model", "light", "--mnist-dir", mnist_dir,
                     "--out", str(out), "--no-progress", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert f"torch DDP N=2 b64: DDP rank 0 could not listen on 127.0.0.1:{given[0]}: address already in use; " \
           "measuring it again on another port (try 2 of 3)" in err, err
    (ddp_row,) = json.loads((out / "scaling.json").read_text())["ddp"]
    assert "error" not in ddp_row and ddp_row["images_per_second"] > 0 and len(given) == 2


def test_a_point_whose_every_port_was_taken_fails_after_a_bounded_number_of_tries(capsys):
    from pscnn.bench.common import PORT_ATTEMPTS, BenchError, PortTaken, on_a_free_port
    calls = []

    def measure():
        calls.append(1)
        raise PortTaken("the server exited with 1: pscnn: error: cannot bind tcp://127.0.0.1:9: Address already in use")
    with pytest.raises(BenchError, match=r"Address already in use \(the port of each of 3 tries was taken") as info:
        on_a_free_port(measure, "scaling", "async N=1 b64")
    assert not isinstance(info.value, PortTaken)        # the point failed: not tried again by anyone
    assert len(calls) == PORT_ATTEMPTS == 3
    assert capsys.readouterr().err.count("measuring it again on another port") == 2


def test_server_bench_keeps_its_points_when_one_fails(tmp_path, monkeypatch, capsys):
    """A point whose server or clients failed is reported in one line and kept with its error; the
    others, and the profile, are still measured and written (exit 0).  It used to end the bench with
    exit 1 and no CSV or JSON, every point already measured lost."""
    import pscnn.bench.server_bench as server_bench
    from pscnn.bench.common import BenchError
    from pscnn.cli import main

    def measure(kind, n, args, env, profile=None):
        if (kind, n) == ("pscnn", 4):
            raise BenchError("synthetic client process 1 (pscnn, 4 clients) exited with 1: boom")
        if profile is not None:
            raise BenchError("the pscnn server (2 clients) exited with -9 and logged nothing")
        return {"processes": 1, "window_s": 1.0, "cycles": 100 * n, "cycles_per_second": 100.0 * n,
                "mb_per_second": 1.0, "latency_p50_ms": 1.0, "latency_p99_ms": 2.0,
                "errors": {}, "model_bytes": 1000}
    monkeypatch.setattr(server_bench, "measure", measure)
    out = tmp_path / "out"
    assert main(["bench", "server", "--clients", "1,4", "--trials", "1", "--profile", "2", "--model", "light",
                 "--out", str(out), "--no-progress", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "pscnn bench server: trial 1, pscnn x 4 clients: synthetic client process 1 (pscnn, 4 clients) " \
           "exited with 1: boom" in err
    assert "pscnn bench server: the profile with 2 clients: the pscnn server (2 clients) exited with -9" in err
    rows = read_csv(out / "server.csv")
    assert [(r["kind"], r["clients"], bool(r["error"])) for r in rows] == [
        ("pscnn", "1", False), ("echo", "1", False), ("pscnn", "4", True), ("echo", "4", False)]
    doc = json.loads((out / "server.json").read_text())
    by_clients = {s["clients"]: s for s in doc["summary"]}
    assert by_clients[1]["server_over_echo"] == 1.0 and by_clients[4]["server_over_echo"] is None
    assert by_clients[4]["echo_cycles_per_second"] == 400.0 and doc["payload_bytes"] == 1000


def test_server_bench_says_which_medians_stand_for_fewer_trials(tmp_path, monkeypatch, capsys):
    """A failed trial is left out of its point's medians: the heading said "medians of 2 trials" for a
    server column that stood for one (scaling says so in a note; the server bench did not)."""
    import pscnn.bench.server_bench as server_bench
    from pscnn.bench.common import BenchError
    from pscnn.cli import main
    calls = []

    def measure(kind, n, args, env, profile=None):
        calls.append(kind)
        if kind == "pscnn" and calls.count("pscnn") == 1:
            raise BenchError("the pscnn server (1 client) exited with 1: boom")
        return {"processes": 1, "window_s": 1.0, "cycles": 100, "cycles_per_second": 100.0, "mb_per_second": 1.0,
                "latency_p50_ms": 1.0, "latency_p99_ms": 2.0, "errors": {}, "model_bytes": 1000}
    monkeypatch.setattr(server_bench, "measure", measure)
    assert main(["bench", "server", "--clients", "1", "--trials", "2", "--model", "light",
                 "--out", str(tmp_path / "out"), "--no-progress", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if ln.startswith("note: ")] == [
        "note: the server with 1 client: medians of 1 trial; left out: 1 failed"]     # "1 clients ... 1 trials"
    header = next(ln for ln in out.splitlines() if ln.startswith("clients"))
    assert "echo p50 ms" in header and "echo p99 ms" in header        # every time column says its unit


@pytest.mark.parametrize("trials, said", [(1, "; medians of 1 trial"), (2, "; medians of 2 trials")])
def test_server_bench_machine_line_counts_its_trials(trials, said, tmp_path, monkeypatch, capsys):
    """The server bench's first line said "medians of 1 trials"."""
    import pscnn.bench.server_bench as server_bench
    from pscnn.cli import main

    def measure(kind, n, args, env, profile=None):
        return {"processes": 1, "window_s": 1.0, "cycles": 100, "cycles_per_second": 100.0, "mb_per_second": 1.0,
                "latency_p50_ms": 1.0, "latency_p99_ms": 2.0, "errors": {}, "model_bytes": 1000}
    monkeypatch.setattr(server_bench, "measure", measure)
    assert main(["bench", "server", "--clients", "1", "--trials", str(trials), "--model", "light",
                 "--out", str(tmp_path / "out"), "--no-progress", "--no-plots", "--no-echo"]) == 0
    machine = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("machine: "))
    assert machine.endswith(said), machine


def test_server_bench_whose_every_server_point_failed_exits_1(tmp_path, monkeypatch, capsys):
    """The echo is only the reference: with every point of the server failed and the echo's measured,
    the bench printed a table of dashes and exited 0, as if the server had been measured."""
    import pscnn.bench.server_bench as server_bench
    from pscnn.bench.common import BenchError
    from pscnn.cli import main

    def measure(kind, n, args, env, profile=None):
        if kind == "pscnn":
            raise BenchError(f"the pscnn server ({n} client{'s' * (n != 1)}) exited with 1: boom")
        return {"processes": 1, "window_s": 1.0, "cycles": 100, "cycles_per_second": 100.0, "mb_per_second": 1.0,
                "latency_p50_ms": 1.0, "latency_p99_ms": 2.0, "errors": {}, "model_bytes": 1000}
    monkeypatch.setattr(server_bench, "measure", measure)
    out = tmp_path / "out"
    assert main(["bench", "server", "--clients", "1,2", "--trials", "1", "--model", "light", "--out", str(out),
                 "--no-progress", "--no-plots"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("pscnn bench server: error: every server point failed (2 of 2; rows in ") and last.endswith(
        "the first: the pscnn server (1 client) exited with 1: boom"), last
    assert len(read_csv(out / "server.csv")) == 4       # the echo's rows are written all the same


def test_the_synthetic_clients_count_only_the_windows_error_replies():
    """Error replies before the window (start-up, warm-up) or after it were counted with the
    window's, beside a cycle rate of the window alone."""
    from pscnn.bench.synth import window_counts
    cycles = [(9.0, 0.001, 100), (10.5, 0.002, 100), (11.5, 0.004, 100), (12.5, 0.001, 100)]
    errors = [(9.5, "lease_expired"), (10.2, "bad_version"), (11.0, "bad_version"), (12.1, "lease_expired")]
    counts = window_counts(cycles, errors, 10.0, 12.0)
    assert counts == {"cycles": 2, "bytes": 200, "latencies_ms": [2.0, 4.0], "errors": {"bad_version": 2}}


def test_the_server_benchs_rates_are_over_the_measured_time_between_its_samples():
    """The server's CPU share and updates/s were divided by the nominal --seconds: samples taken late
    on a loaded machine, or a status answer that took a second, made them wrong.  Each is a difference
    of two samples over the time measured between them."""
    from pscnn.bench.server_bench import server_rates
    before = {"cpu_at": 10.0, "process": 1.0, "main_thread": 0.5, "machine": (100, 200),
              "version": 5, "version_at": 10.5}
    after = {"cpu_at": 12.5, "process": 2.0, "main_thread": 1.0, "machine": (250, 400),      # 2.5 s, not 2
             "version": 45, "version_at": 14.5}                                             # 4 s, not 2
    rates = server_rates(before, after, cycles_per_second=20.0)
    assert rates == pytest.approx({"server_cpu_fraction": 0.4, "server_cpu_ms_per_cycle": 20.0,
                                   "server_main_thread_fraction": 0.2, "server_main_thread_ms_per_cycle": 10.0,
                                   "machine_busy_fraction": 0.75, "server_updates_per_second": 10.0})
    silent = {**after, "version": None, "version_at": None}         # the echo, or no status answer
    assert "server_updates_per_second" not in server_rates(before, silent, 20.0)
    assert server_rates(before, after, 0.0)["server_cpu_ms_per_cycle"] is None


def test_a_tiny_server_bench_has_consistent_columns(tmp_path):
    """One real point: no error replies on a clean run, and every per-window figure present and
    consistent with the others (ms per cycle: the CPU share over the cycle rate)."""
    out = tmp_path / "server"
    bench("server", "--clients", "1", "--model", "light", "--seconds", "1", "--warmup", "0", "--trials", "1",
          "--no-echo", "--no-plots", "--out", str(out))
    (r,) = json.loads((out / "server.json").read_text())["rows"]
    assert r["kind"] == "pscnn" and r["errors"] == {} and r["window_s"] == 1.0 and r["cycles"] > 0
    assert r["cycles_per_second"] == r["cycles"] / r["window_s"] and r["server_updates_per_second"] > 0
    assert r["server_cpu_fraction"] > 0
    assert r["server_cpu_ms_per_cycle"] == pytest.approx(1e3 * r["server_cpu_fraction"] / r["cycles_per_second"])


def test_requests_the_server_refused_are_said_in_the_report(tmp_path, monkeypatch, capsys):
    """The synthetic clients count the server's error replies; the table showed only the lower cycle
    rate, the errors were in the CSV alone."""
    import pscnn.bench.server_bench as server_bench
    from pscnn.cli import main
    monkeypatch.setattr(server_bench, "measure", lambda kind, n, args, env, profile=None: {
        "processes": 1, "window_s": 1.0, "cycles": 100, "cycles_per_second": 100.0, "mb_per_second": 1.0,
        "latency_p50_ms": 1.0, "latency_p99_ms": 2.0,
        "errors": {"lease_expired": 3, "bad_version": 1} if n == 4 else {"bad_version": 1}, "model_bytes": 1000})
    assert main(["bench", "server", "--clients", "1,4", "--trials", "2", "--model", "light", "--no-echo",
                 "--out", str(tmp_path / "out"), "--no-progress", "--no-plots"]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note: ")]
    assert notes == ["note: with 1 client the server answered 2 requests with an error (not counted as cycles): "
                     "bad_version x 2",
                     "note: with 4 clients the server answered 8 requests with an error (not counted as cycles): "
                     "bad_version x 2, lease_expired x 6"]


@pytest.mark.parametrize("echo", [True, False])
def test_the_server_table_has_echo_columns_only_with_the_echo(echo, tmp_path, monkeypatch, capsys):
    """With --no-echo the table still had its six echo columns, every cell a dash."""
    import pscnn.bench.server_bench as server_bench
    from pscnn.cli import main
    monkeypatch.setattr(server_bench, "measure", lambda kind, n, args, env, profile=None: {
        "processes": 1, "window_s": 1.0, "cycles": 100, "cycles_per_second": 100.0, "mb_per_second": 1.0,
        "latency_p50_ms": 1.0, "latency_p99_ms": 2.0, "errors": {}, "model_bytes": 1000})
    assert main(["bench", "server", "--clients", "1", "--trials", "1", "--model", "light", "--out",
                 str(tmp_path / "out"), "--no-progress", "--no-plots", *([] if echo else ["--no-echo"])]) == 0
    header = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("clients "))
    assert ("echo rt/s" in header and header.rstrip().endswith("server/echo")) if echo else "echo" not in header, \
        header


def test_the_server_bench_needs_no_mnist_whatever_mnist_dir_says(tmp_path, monkeypatch, capsys):
    """Its servers read the test set at their start where MNIST_DIR is set (pscnn server does, to score
    the final weights), which none of them ever scores: a MNIST_DIR without it failed every point,
    after an earlier run's results in --out were removed."""
    from pscnn.cli import main
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MNIST_DIR", str(empty))
    out = tmp_path / "out"
    assert main(["bench", "server", *TINY["server"], "--model", "light", "--out", str(out), "--no-progress",
                 "--no-plots"]) == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / "server.csv").open()))
    assert [(row["kind"], row["clients"]) for row in rows] == [("pscnn", "1")], rows
    assert float(rows[0]["cycles_per_second"]) > 0, rows


@pytest.mark.parametrize("workers", ["synthetic", "real"])
def test_scaling_refuses_a_mnist_folder_without_the_test_set_its_servers_read(workers, tmp_path, monkeypatch,
                                                                              capsys):
    """Each server, given a MNIST folder, reads the test set at its start; only the training set was
    checked (and nothing for --compute-ms workers): every point's server exited 1, after the bench
    had emptied --out.  MNIST_DIR names a folder holding the training files' names only."""
    from cnn_core.data import MNIST_FILES
    from pscnn.cli import main
    folder = tmp_path / "train-only"
    folder.mkdir()
    for name in ("train-images", "train-labels"):
        (folder / MNIST_FILES[name]["filename"]).write_bytes(b"")
    monkeypatch.setenv("MNIST_DIR", str(folder))
    out = tmp_path / "out"
    flags = TINY["scaling"] if workers == "synthetic" else [*TINY["scaling"][2:], "--ddp", "off"]
    assert main(["bench", "scaling", *flags, "--model", "light", "--out", str(out), "--no-progress",
                 "--no-plots"]) == 2
    error_line(capsys.readouterr().err, f"{folder}: MNIST folder lacks t10k-images-idx3-ubyte.gz",
               starts="pscnn bench scaling: error: ")
    assert not out.exists()


def test_a_profile_the_server_did_not_write_is_said(tmp_path, monkeypatch, capsys):
    """A profiled server killed after its grace period writes no profile: --profile then printed
    nothing and wrote no server-profile.txt, without a word."""
    import pscnn.bench.server_bench as server_bench
    from pscnn.cli import main
    monkeypatch.setattr(server_bench, "measure", lambda kind, n, args, env, profile=None: {
        "processes": 1, "window_s": 1.0, "cycles": 100, "cycles_per_second": 100.0, "mb_per_second": 1.0,
        "latency_p50_ms": 1.0, "latency_p99_ms": 2.0, "errors": {}, "model_bytes": 1000})
    out = tmp_path / "out"
    assert main(["bench", "server", *TINY["server"], "--profile", "2", "--model", "light", "--out", str(out),
                 "--no-progress", "--no-plots"]) == 0
    assert ("pscnn bench server: the profile with 2 clients: the profiled server wrote no server.prof: it did "
            "not exit cleanly when stopped") in capsys.readouterr().err
    assert not (out / "server-profile.txt").exists()


def test_scaling_exits_1_only_when_every_point_failed(tmp_path, monkeypatch, capsys):
    """One failed point is reported and the others kept (exit 0); a run whose every point failed
    measured nothing and exits 1 (it used to exit 0 with an empty table)."""
    import pscnn.bench.cluster as cluster
    from pscnn.cli import main

    def one_fails(out, **point):
        if point["workers"] == 2:
            raise RuntimeError("timed out after 120 s waiting for 2 workers to push\nlog line\nworker-1: gave up")
        return {"window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0,
                "updates_per_second": 10.0, "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0}
    monkeypatch.setattr(cluster, "measure_point", one_fails)
    out = tmp_path / "some"
    argv = ["--compute-ms", "5", "--mode", "async", "--seconds", "0.5", "--warmup", "0", "--trials", "1",
            "--model", "light", "--no-progress", "--no-plots"]
    assert main(["bench", "scaling", "--workers", "1,2", *argv, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "async N=2 b64 c=5ms: timed out after 120 s waiting for 2 workers to push: worker-1: gave up" in err
    rows = read_csv(out / "scaling.csv")
    assert [(r["workers"], bool(r.get("error"))) for r in rows] == [("1", False), ("2", True)]

    def all_fail(out, **point):
        raise RuntimeError("the server exited with 1: boom")
    monkeypatch.setattr(cluster, "measure_point", all_fail)
    out = tmp_path / "none"
    assert main(["bench", "scaling", "--workers", "1,2", *argv, "--out", str(out)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("pscnn bench scaling: error: every point failed (2 of 2") and last.endswith(
        "the first: the server exited with 1: boom"), last
    assert len(read_csv(out / "scaling.csv")) == 2      # the rows are still written, with their errors


def test_scaling_keeps_its_points_when_a_baseline_fails(tmp_path, monkeypatch, capsys, mnist_dir):
    """A baseline that fails in one trial loses that trial's ratios, not the run: it used to end
    the bench (exit 1, no CSV or JSON) with every point already measured thrown away."""
    import pscnn.bench.cluster as cluster
    import pscnn.bench.scaling as scaling
    from pscnn.bench.common import process_failed
    from pscnn.cli import main
    monkeypatch.setattr(cluster, "measure_point", lambda out, **point: {
        "window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0, "updates_per_second": 10.0,
        "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0})
    calls = []

    def second_fails(model, batch, *rest):
        calls.append(batch)
        if len(calls) == 2:
            raise process_failed("the baseline (batch 64)", -9, "loading MNIST\n")
        return {"images_per_second": 800.0, "images_per_cpu_second": 900.0, "cpu_fraction": 0.9}
    monkeypatch.setattr(scaling, "_baseline", second_fails)
    out = tmp_path / "out"
    assert main(["bench", "scaling", "--workers", "1", "--mode", "async", "--seconds", "0.5", "--warmup", "0",
                 "--trials", "2", "--model", "light", "--ddp", "off", "--mnist-dir", mnist_dir,
                 "--no-progress", "--no-plots", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "baseline b64: the baseline (batch 64) exited with -9 (killed by SIGKILL): loading MNIST" in err
    assert len(read_csv(out / "scaling.csv")) == 2                  # both trials' points kept
    doc = json.loads((out / "scaling.json").read_text())
    assert ["error" in b for b in doc["baselines"]] == [False, True]
    (s,) = doc["summary"]
    assert s["efficiency"] == pytest.approx(640.0 / 800.0)          # the trial that has a baseline
    assert s["baseline_images_per_second"] == 800.0


def test_the_table_says_its_efficiency_is_the_median_of_per_trial_ratios(tmp_path, monkeypatch, capsys, mnist_dir):
    """A noisy run printed 9,293 img/s against an ideal 8,894 and an efficiency of 0.66, with no word
    that the efficiency is the median of each trial's ratio, not the ratio of the columns beside it."""
    import pscnn.bench.cluster as cluster
    import pscnn.bench.scaling as scaling
    from pscnn.cli import main
    rates = iter([900.0, 1000.0, 3000.0])
    bases = iter([1000.0, 4000.0, 1000.0])         # per-trial ratios 0.9, 0.25, 3.0; medians 1,000 and 1,000

    def measure_point(out, **point):
        rate = next(rates)
        return {"window_s": 1.0, "updates": 10, "samples": rate, "images_per_second": rate,
                "updates_per_second": 10.0, "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0}
    monkeypatch.setattr(cluster, "measure_point", measure_point)
    monkeypatch.setattr(scaling, "_baseline", lambda *a: {"images_per_second": next(bases)})
    assert main(["bench", "scaling", "--workers", "1", "--mode", "async", "--seconds", "0.5", "--warmup", "0",
                 "--trials", "3", "--model", "light", "--ddp", "off", "--mnist-dir", mnist_dir,
                 "--no-progress", "--no-plots", "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("mode "))
    spans = [m.span() for m in re.finditer(r"-+", lines[header + 1])]       # the columns, by the rule under them
    row = {lines[header][a:b].strip(): lines[header + 2][a:b].strip() for a, b in spans}
    assert (row["img/s"], row["ideal img/s"], row["efficiency"]) == ("1,000", "1,000", "0.90"), row
    assert ("efficiency: the median over trials of img/s / (N x the same trial's baseline), not img/s / ideal "
            "img/s (N x the median baseline)") in lines


@pytest.mark.parametrize("argv, bound", [([], 2), (["--staleness", "0"], 0)])
def test_scaling_ssp_points_run_and_record_their_staleness_bound(argv, bound, tmp_path, monkeypatch, capsys):
    """--mode ssp ran with the server's default bound, which no flag set and no output said."""
    import pscnn.bench.cluster as cluster
    from pscnn.cli import main
    extra = {}

    def measure_point(out, **point):
        extra[point["mode"]] = list(point["server_extra"])
        return {"window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0,
                "updates_per_second": 10.0, "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0}
    monkeypatch.setattr(cluster, "measure_point", measure_point)
    out = tmp_path / "out"
    assert main(["bench", "scaling", "--compute-ms", "5", "--workers", "1", "--mode", "ssp,async", *argv,
                 "--trials", "1", "--seconds", "0.5", "--warmup", "0", "--model", "light", "--no-progress",
                 "--no-plots", "--out", str(out)]) == 0
    assert extra == {"ssp": ["--staleness", str(bound)], "async": []}
    summary = {s["mode"]: s for s in json.loads((out / "scaling.json").read_text())["summary"]}
    assert (summary["ssp"]["staleness_bound"], summary["async"]["staleness_bound"]) == (bound, None)
    said = f"ssp: a worker may run {bound} pushes ahead of the slowest (--staleness)"
    assert said in capsys.readouterr().out.splitlines()


def test_scaling_says_which_points_overlap(tmp_path, monkeypatch, capsys):
    """--mode sync,async --overlap: only the async points overlap, and neither the table, the plots
    nor the summary said so (the flag was in the JSON's config alone)."""
    pytest.importorskip("matplotlib")
    import pscnn.bench.cluster as cluster
    import pscnn.bench.scaling as scaling
    from pscnn.cli import main
    monkeypatch.setattr(cluster, "measure_point", lambda out, **point: {
        "window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0, "updates_per_second": 10.0,
        "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0})
    figures = {}
    monkeypatch.setattr(scaling, "save_figure", lambda fig, path: figures.setdefault(path.name, fig) and path)
    out = tmp_path / "out"
    assert main(["bench", "scaling", "--compute-ms", "5", "--workers", "1", "--mode", "sync,async", "--overlap",
                 "--trials", "1", "--seconds", "0.5", "--warmup", "0", "--model", "light", "--no-progress",
                 "--out", str(out)]) == 0
    labels = figures["scaling_throughput.png"].axes[0].get_legend_handles_labels()[1]
    import matplotlib.pyplot as plt
    plt.close("all")                    # save_figure, which closes them, is replaced
    summary = {s["mode"]: s for s in json.loads((out / "scaling.json").read_text())["summary"]}
    assert (summary["sync"]["overlap"], summary["async"]["overlap"]) == (False, True)
    assert "async: each worker computes its next batch while its push travels (--overlap)" in \
        capsys.readouterr().out.splitlines()
    assert {"sync c=5ms", "async --overlap c=5ms"} <= set(labels), labels


def test_tta_ssp_runs_take_and_record_their_staleness_bound(tmp_path, monkeypatch, capsys, mnist_dir):
    """time-to-accuracy --mode ssp ran with the server's default bound, which no flag set and no
    output said."""
    import pscnn.bench.tta as tta
    from pscnn.cli import main
    flags = {}

    def run_one(folder, mode, n, args, mnist_dir, bar):
        flags[mode] = tta.server_flags(mode, args, folder, mnist_dir)
        return tta.analyse([], [], 0.5, 64)
    monkeypatch.setattr(tta, "run_one", run_one)
    out = tmp_path / "out"
    assert main(["bench", "time-to-accuracy", *TINY["time-to-accuracy"], "--mode", "ssp,async", "--staleness", "0",
                 "--mnist-dir", mnist_dir, "--out", str(out), "--no-progress", "--no-plots"]) == 0
    assert flags["ssp"][flags["ssp"].index("--staleness") + 1] == "0" and "--staleness" not in flags["async"]
    summary = {s["mode"]: s for s in json.loads((out / "time_to_accuracy.json").read_text())["summary"]}
    assert (summary["ssp"]["staleness_bound"], summary["async"]["staleness_bound"]) == (0, None)
    assert "ssp: a worker may run 0 pushes ahead of the slowest (--staleness)" in capsys.readouterr().out.splitlines()


def test_trials_left_out_of_a_points_medians_are_said(tmp_path, monkeypatch, capsys):
    """A stalled window and a failed trial are left out of a point's medians: the table gave the
    medians of the rest as if of every trial (the counts were in the JSON alone)."""
    import pscnn.bench.cluster as cluster
    from pscnn.cli import main
    calls = []

    def measure_point(out, **point):
        calls.append(point["workers"])
        if calls.count(2) == 1 and point["workers"] == 2:
            raise RuntimeError("the server exited with 1: boom")
        updates = 0 if calls.count(2) == 2 and point["workers"] == 2 else 10
        return {"window_s": 1.0, "updates": updates, "samples": 64 * updates, "images_per_second": 64.0 * updates,
                "updates_per_second": float(updates), "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0}
    monkeypatch.setattr(cluster, "measure_point", measure_point)
    assert main(["bench", "scaling", "--compute-ms", "5", "--workers", "1,2", "--mode", "async", "--trials", "3",
                 "--seconds", "0.5", "--warmup", "0", "--model", "light", "--no-progress", "--no-plots",
                 "--out", str(tmp_path / "out")]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note: ")]
    assert notes == ["note: async b64 c=5ms N=2: medians of 1 trial; left out: 1 stalled window (no update "
                     "in the window), 1 failed"]


@pytest.mark.parametrize("trials, said", [(1, "medians of 1 trial"), (2, "medians of 2 trials")])
@pytest.mark.parametrize("bench_name", ["scaling", "time-to-accuracy"])
def test_the_tables_heading_says_how_many_trials_its_medians_are_of(bench_name, trials, said, tmp_path, monkeypatch,
                                                                  capsys, request):
    """scaling's heading said "medians of trials", time-to-accuracy's nothing, whatever --trials was."""
    import pscnn.bench.cluster as cluster
    import pscnn.bench.tta as tta
    from pscnn.cli import main
    monkeypatch.setattr(cluster, "measure_point", lambda out, **point: {
        "window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0, "updates_per_second": 10.0,
        "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0})
    monkeypatch.setattr(tta, "run_one", lambda folder, mode, n, args, mnist_dir, bar: tta.analyse([], [], 0.5, 64))
    argv = [*TINY[bench_name], "--model", "light", "--trials", str(trials)]
    if bench_name == "time-to-accuracy":
        argv += ["--mnist-dir", request.getfixturevalue("mnist_dir")]
    assert main(["bench", bench_name, *argv, "--out", str(tmp_path / "out"), "--no-progress", "--no-plots"]) == 0
    heading = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("machine: "))
    assert re.search(rf"; {said}\b", heading), heading


def test_every_point_and_trial_keeps_its_own_run_folder(tmp_path, monkeypatch):
    """--keep-logs: "keep every point's run folder and logs"; every trial and every --compute-ms of a
    point ran in one folder, each emptied by the next (and a failed point's "logs in" with it)."""
    import pscnn.bench.cluster as cluster
    from pscnn.cli import main
    folders = []

    def measure_point(out, **point):
        folders.append(out.relative_to(tmp_path / "out"))
        return {"window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0,
                "updates_per_second": 10.0, "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0}
    monkeypatch.setattr(cluster, "measure_point", measure_point)
    assert main(["bench", "scaling", "--compute-ms", "2,10", "--workers", "1", "--mode", "async", "--trials", "2",
                 "--seconds", "0.5", "--warmup", "0", "--model", "light", "--keep-logs", "--no-progress",
                 "--no-plots", "--out", str(tmp_path / "out")]) == 0
    assert len(folders) == 4 and len(set(folders)) == 4, folders
    assert Path("points/async-n1-b64-c10-t1") in folders


def test_processes_above_some_points_client_counts_are_said(capsys):
    """--processes 4 with --clients 1,8: the 1-client points ran one process without a word."""
    from types import SimpleNamespace

    from pscnn.bench import server_bench
    server_bench._check_processes(SimpleNamespace(processes=4, clients="1,2,8", profile=None), [1, 2, 8])
    assert capsys.readouterr().err == ("pscnn bench server: --processes 4: the points of 1, 2 clients run one "
                                       "process per client\n")
    server_bench._check_processes(SimpleNamespace(processes=4, clients="4,8", profile=None), [4, 8])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bench_name", ["scaling", "time-to-accuracy"])
def test_no_empty_folder_of_logs_is_left_without_keep_logs(bench_name, tmp_path, monkeypatch, request):
    """Each point's (or run's) logs go once measured, without --keep-logs: the empty points/ (runs/)
    folder holding them stayed in --out."""
    import shutil

    import pscnn.bench.cluster as cluster
    import pscnn.bench.tta as tta
    from pscnn.cli import main

    def logs_made_and_removed(folder: Path) -> None:     # as a point without --keep-logs does
        folder.mkdir(parents=True)
        (folder / "server.log").write_text("")
        shutil.rmtree(folder)

    def measure_point(out, **point):
        logs_made_and_removed(out)
        return {"window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0,
                "updates_per_second": 10.0, "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0}

    def run_one(folder, mode, n, args, mnist_dir, bar):
        logs_made_and_removed(folder)
        return tta.analyse([], [], 0.5, 64)
    monkeypatch.setattr(cluster, "measure_point", measure_point)
    monkeypatch.setattr(tta, "run_one", run_one)
    argv = [*TINY[bench_name], "--model", "light"]
    if bench_name == "time-to-accuracy":
        argv += ["--mnist-dir", request.getfixturevalue("mnist_dir")]
    out = tmp_path / "out"
    assert main(["bench", bench_name, *argv, "--out", str(out), "--no-progress", "--no-plots"]) == 0
    assert not (out / "points").exists() and not (out / "runs").exists(), sorted(p.name for p in out.iterdir())


def test_the_last_line_names_only_the_plots_this_run_made(tmp_path, monkeypatch, capsys):
    """Without matplotlib (or with --no-plots) the plots are skipped with a note, and the last
    line no longer says "and plots in OUT": an older run's PNGs there are not this run's."""
    import pscnn.bench.cluster as cluster
    from pscnn.cli import main
    monkeypatch.setattr(cluster, "measure_point", lambda out, **point: {
        "window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0, "updates_per_second": 10.0,
        "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0, "server_cpu_ms_per_push": 1.0})
    argv = ["bench", "scaling", "--compute-ms", "5", "--workers", "1,2", "--mode", "async", "--seconds", "0.5",
            "--warmup", "0", "--trials", "1", "--model", "light", "--no-progress"]
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)           # not installed: its import fails
        assert main([*argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed; no plots (pip install matplotlib, pscnn's plot extra)" in captured.err
    assert captured.out.strip().splitlines()[-1] == \
        f"wrote {out / 'scaling.csv'}, {out / 'scaling.json'}, scaling-summary.json"
    assert not list(out.glob("*.png"))
    assert main([*argv, "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(" and scaling_throughput.png, scaling_efficiency.png, scaling_time_split.png"), last
    assert_png(out / "scaling_throughput.png")
    assert main([*argv, "--out", str(out), "--no-plots"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("scaling-summary.json")


def test_the_last_line_names_every_file_the_run_wrote(tmp_path, monkeypatch, capsys):
    """pscnn bench scaling's last line ("wrote ...") left out scaling-summary.json, which it writes
    beside the CSV and the JSON and which docs/scaling.md lists: a reader went by the line."""
    import pscnn.bench.cluster as cluster
    from pscnn.cli import main
    monkeypatch.setattr(cluster, "measure_point", lambda out, **point: {
        "window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0, "updates_per_second": 10.0,
        "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0, "server_cpu_ms_per_push": 1.0})
    out = tmp_path / "out"
    assert main(["bench", "scaling", *TINY["scaling"], "--model", "light", "--out", str(out), "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    written = sorted(path.name for path in out.glob("[!.]*"))     # not the folder's lock
    assert {"scaling.csv", "scaling.json", "scaling-summary.json", "scaling_throughput.png"} <= set(written), written
    assert [name for name in written if name not in last] == [], last


# What an earlier run of each bench left in its --out (plots, a profile, kept point logs) that this
# run, with --no-plots and no --profile, does not write again; and files of the user's beside them.
EARLIER = {"scaling": ["scaling_throughput.png", "scaling_efficiency.png", "scaling_time_split.png",
                       "points/sync-n4-b64-c5-t2/logs/server.log"],
           "server": ["server_capacity.png", "server.prof", "server-profile.txt"],
           "time-to-accuracy": ["time_to_accuracy.png", "runs/async-n4-t1/logs/server.log"]}
THE_USERS = ["notes.txt", "scaling_efficiency_2w_overlap.png", "points/mine/a.txt", "runs/my-run/config.json"]


@pytest.mark.parametrize("bench_name", list(EARLIER))
def test_a_reused_out_folder_holds_only_this_runs_outputs(bench_name, tmp_path, monkeypatch, capsys, request):
    """A bench's --out reused: the plots, profile and point logs of an earlier run there that this run
    did not make again (--no-plots, no --profile, other points, a failed run) sat beside the new
    CSV and JSON and looked current.  They are removed at the start, said in one line; the user's
    files there stay."""
    import pscnn.bench.cluster as cluster
    import pscnn.bench.server_bench as server_bench
    import pscnn.bench.tta as tta
    from pscnn.cli import main
    monkeypatch.setattr(cluster, "measure_point", lambda out, **point: {
        "window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0, "updates_per_second": 10.0,
        "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0})
    monkeypatch.setattr(server_bench, "measure", lambda kind, n, args, env, profile=None: {
        "processes": 1, "window_s": 1.0, "cycles": 100, "cycles_per_second": 100.0, "mb_per_second": 1.0,
        "latency_p50_ms": 1.0, "latency_p99_ms": 2.0, "errors": {}, "model_bytes": 1000})
    monkeypatch.setattr(tta, "run_one", lambda folder, mode, n, args, mnist_dir, bar: tta.analyse([], [], 0.5, 64))
    argv = [*TINY[bench_name], "--model", "light"]
    if bench_name == "time-to-accuracy":
        argv += ["--mnist-dir", request.getfixturevalue("mnist_dir")]
    out = tmp_path / "out"
    for name in EARLIER[bench_name] + THE_USERS:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("an earlier run's\n")
    assert main(["bench", bench_name, *argv, "--out", str(out), "--no-progress", "--no-plots"]) == 0
    err = capsys.readouterr().err
    for name in EARLIER[bench_name]:
        owned = Path(*Path(name).parts[:2])         # a file, or a point's folder of logs
        assert not (out / owned).exists(), owned
    for name in THE_USERS:
        assert (out / name).read_text() == "an earlier run's\n", name
    line = next(ln for ln in err.splitlines() if "earlier run" in ln)
    assert line.startswith(f"pscnn bench {bench_name}: removed what an earlier run of it left in {out}: "), line


def test_a_bench_refuses_an_out_folder_another_process_writes(tmp_path, monkeypatch, capsys):
    """pscnn run and train refuse a run folder another process writes (its lock); a bench did not, so
    a second bench into the same --out removed the first's outputs and point logs under it, and
    both wrote the same CSV and JSON.  Refused in one line now, nothing removed; the lock is the
    bench's until it ends."""
    import fcntl

    import pscnn.bench.cluster as cluster
    from pscnn.cli import main
    monkeypatch.setattr(cluster, "measure_point", lambda out, **point: {
        "window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0, "updates_per_second": 10.0,
        "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0})
    out = tmp_path / "out"
    out.mkdir()
    (out / "scaling_throughput.png").write_text("the other run's\n")
    argv = ["bench", "scaling", *TINY["scaling"], "--model", "light", "--out", str(out), "--no-progress", "--no-plots"]
    with open(out / ".pscnn.lock", "a+") as holder:       # another writer, as pscnn run's server holds it
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write(str(os.getpid()))
        holder.flush()
        assert main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"pscnn bench scaling: error: {out}: another pscnn process (pid {os.getpid()}) is writing this "
                    "run folder; choose another --out, or stop that process first"), last
    assert (out / "scaling_throughput.png").read_text() == "the other run's\n"
    assert not (out / "scaling.csv").exists()
    assert main(argv) == 0 and main(argv) == 0      # its own lock is released when it ends


def test_every_point_folder_is_one_a_later_run_removes():
    from pscnn.bench.scaling import POINT_FOLDER, point_folder
    for compute in (None, 0.0, 2.5, 1e-5, 1e9):
        for mode in ("sync", "async", "ssp"):
            point = {"mode": mode, "workers": 16, "batch": 64, "compute_ms": compute}
            name = point_folder(point, 3, synthetic=compute is not None)
            assert POINT_FOLDER.fullmatch(name), name
    assert not POINT_FOLDER.fullmatch("mine")


@pytest.mark.parametrize("bench_name", ["scaling", "server", "time-to-accuracy"])
def test_an_interrupted_bench_writes_what_it_measured(bench_name, tmp_path, monkeypatch, capsys, request):
    """Ctrl-C (or SIGTERM) in the second measurement: the first's results were thrown away with it
    ("pscnn: interrupted", nothing written, however long the bench had run); now they are written and
    reported, the interruption said in the last line, exit 130.  Ctrl-C in the first: as before."""
    import pscnn.bench.cluster as cluster
    import pscnn.bench.server_bench as server_bench
    import pscnn.bench.tta as tta
    from pscnn.cli import main
    calls = []

    def second_interrupted(result):
        def measure(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt("signal 2")
            return result
        return measure
    monkeypatch.setattr(cluster, "measure_point", second_interrupted({
        "window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0, "updates_per_second": 10.0,
        "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0}))
    monkeypatch.setattr(server_bench, "measure", second_interrupted({
        "processes": 1, "window_s": 1.0, "cycles": 100, "cycles_per_second": 100.0, "mb_per_second": 1.0,
        "latency_p50_ms": 1.0, "latency_p99_ms": 2.0, "errors": {}, "model_bytes": 1000}))
    monkeypatch.setattr(tta, "run_one", second_interrupted(tta.analyse([], [], 0.5, 64)))
    argv = [*TINY[bench_name], "--model", "light", "--trials", "3"]
    if bench_name == "time-to-accuracy":
        argv += ["--mnist-dir", request.getfixturevalue("mnist_dir")]
    out = tmp_path / "out"
    assert main(["bench", bench_name, *argv, "--out", str(out), "--no-progress"]) == 130
    captured = capsys.readouterr()
    name = {"time-to-accuracy": "time_to_accuracy"}.get(bench_name, bench_name)
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    assert captured.err.strip().splitlines()[-1] == (
        f"pscnn bench {bench_name}: interrupted after 1 of 3 measurements, written to {csv_path} and {json_path} "
        "(no plots)")
    assert len(read_csv(csv_path)) == 1
    assert json.loads(json_path.read_text())["interrupted"] is True
    assert not list(out.glob("*.png"))
    calls.clear()
    calls.append(1)                     # the first measurement is interrupted: nothing to write
    assert main(["bench", bench_name, *argv, "--out", str(tmp_path / "none"), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "pscnn: interrupted"
    assert not list((tmp_path / "none").glob(f"{name}.*"))


def test_a_worker_lost_during_the_window_fails_the_point(tmp_path, monkeypatch):
    """A point is N workers' throughput: one that exited in the warm-up or the window (here killed as
    the window opens) left N-1 pushing, and the point was reported as N workers' all the same."""
    import signal

    import pscnn.bench.cluster as cluster
    from pscnn.bench.common import BenchError
    started = []

    class Recorded(cluster.LocalCluster):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)
    real_status = cluster._stamped_status

    def kill_one_at_the_window(endpoint):
        if started[0].procs["worker-1"].poll() is None:
            started[0].procs["worker-1"].send_signal(signal.SIGKILL)
            started[0].procs["worker-1"].wait(10)
        return real_status(endpoint)
    monkeypatch.setattr(cluster, "LocalCluster", Recorded)
    monkeypatch.setattr(cluster, "_stamped_status", kill_one_at_the_window)
    with pytest.raises(BenchError, match=r"^worker-1 exited with -9 \(killed by SIGKILL\)"):
        cluster.measure_point(tmp_path / "point", mode="async", workers=2, batch=64, seconds=0.5, warmup=0.2,
                              compute_ms=5.0, model="light")
    assert all(p.poll() is not None for p in started[0].procs.values())     # every process stopped


def test_a_long_ddp_measurement_is_given_the_time_it_asks_for(monkeypatch):
    """The DDP reference's processes were killed at a fixed 300 s, so every DDP run of --seconds 300
    or more failed (as 'failed', not as a timeout); they get the baseline's limit, 4 x seconds + 120."""
    from pscnn.bench import ddp
    waits = []

    class FakeRank:                     # a rank that finishes at once; rank 0 writes the result
        def __init__(self, cmd, **kwargs):
            self.cmd, self.returncode = cmd, 0

        def communicate(self, timeout=None):
            waits.append(timeout)
            if self.cmd[self.cmd.index("--rank") + 1] == "0":
                result = next(arg.removeprefix("--result=") for arg in self.cmd if arg.startswith("--result="))
                Path(result).write_text(json.dumps({"images_per_second": 1.0}))
            return b"", None

        def poll(self):
            return self.returncode
    monkeypatch.setattr(ddp.subprocess, "Popen", FakeRank)
    assert ddp.measure_ddp(2, 64, 400.0) == {"images_per_second": 1.0}
    assert len(waits) == 2 and min(waits) > 4 * 400


def test_a_ddp_rank_that_dies_in_teardown_after_the_result_keeps_the_measurement(monkeypatch):
    """Under load a DDP rank died in gloo's teardown ("terminate called without an active exception",
    exit 134) after rank 0 had written the result, which every rank's last barrier precedes: the
    whole measurement was thrown away as failed.  It is kept now; a rank that dies before the result
    is written still fails the run, with its output."""
    from pscnn.bench import ddp

    def fake_ranks(writes_result):
        class FakeRank:                 # rank 0 exits 134 in teardown, after (or without) the result
            def __init__(self, cmd, **kwargs):
                self.cmd = cmd
                self.returncode = 134 if cmd[cmd.index("--rank") + 1] == "0" else 0

            def communicate(self, timeout=None):
                if self.returncode and writes_result:
                    result = next(arg.removeprefix("--result=") for arg in self.cmd if arg.startswith("--result="))
                    Path(result).write_text(json.dumps({"images_per_second": 2.0}))
                return b"terminate called without an active exception\n", None

            def poll(self):
                return self.returncode
        return FakeRank
    monkeypatch.setattr(ddp.subprocess, "Popen", fake_ranks(writes_result=True))
    assert ddp.measure_ddp(2, 64, 1.0) == {"images_per_second": 2.0}
    monkeypatch.setattr(ddp.subprocess, "Popen", fake_ranks(writes_result=False))
    with pytest.raises(RuntimeError, match="^DDP run with 2 processes failed:\nterminate called without"):
        ddp.measure_ddp(2, 64, 1.0)


def test_a_ddp_rank_takes_any_model_the_bench_takes(monkeypatch):
    """pscnn bench scaling --model takes a JSON spec, and its PyTorch twin is built from the pscnn
    model whatever its spec; the DDP ranks took only 'seed' or 'light', so every DDP run of such a
    model failed on its ranks' arguments."""
    from pscnn.bench import ddp
    spec = json.dumps({"input_shape": [1, 28, 28], "layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]})
    ranks = []
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")          # main sets it otherwise: this process's env
    monkeypatch.setattr(ddp, "_run_rank", lambda args: ranks.append(args.model) or 0)
    assert ddp.main(["--rank", "0", "--world", "1", "--port", "9", "--model", spec, "--result", "r.json"]) == 0
    assert ranks == [spec]


def test_tta_whose_workers_all_fail_stops_at_once_in_one_line(tmp_path, mnist_dir):
    """Training files that are there but corrupt pass the folder check; every worker then exits with
    an error, and the bench stops that run at once (it polled until --max-seconds, then exited 0)."""
    bad = tmp_path / "mnist"
    bad.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (bad / name).write_bytes(b"junk")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (bad / name).write_bytes((Path(mnist_dir) / name).read_bytes())
    out = tmp_path / "tta"
    proc = bench_fails("time-to-accuracy", *TINY["time-to-accuracy"], "--mnist-dir", str(bad), "--out", str(out))
    last = exit_error_line(proc, 1, "every worker (1) failed; worker-0 exited with 1: ", starts="pscnn bench ")
    assert "train-" in last and f"logs in {out}" in last, last
    (row,) = json.loads((out / "time_to_accuracy.json").read_text())["rows"]
    assert not row["reached"] and "worker-0 exited with 1" in row["error"]


def test_tta_that_loses_one_of_its_workers_fails_that_run(tmp_path, monkeypatch, capsys, mnist_dir):
    """One worker of two exits with an error (here: refused flags): the run went on with the other
    and its row stood for 2 workers; now that run fails in one line naming the worker (exit 1)."""
    from pscnn.cli import main
    from pscnn.launcher import LocalCluster
    real_start = LocalCluster.start_worker

    def start_worker(self, name, flags=()):
        return real_start(self, name, [*flags, "--threads", "0"] if name == "worker-1" else flags)
    monkeypatch.setattr(LocalCluster, "start_worker", start_worker)
    out = tmp_path / "tta"
    argv = [*TINY["time-to-accuracy"], "--mnist-dir", mnist_dir, "--target", "0.99", "--out", str(out)]
    argv[argv.index("--workers") + 1] = "2"
    assert main(["bench", "time-to-accuracy", *argv, "--no-progress", "--no-plots"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 of 2 workers failed; worker-1 exited with 2: " in last and "--threads" in last, last
    (row,) = json.loads((out / "time_to_accuracy.json").read_text())["rows"]
    assert row["workers"] == 2 and "worker-1 exited with 2" in row["error"]


@pytest.mark.parametrize("role, argv", [
    ("run_echo", ["echo", "--bind", "tcp://127.0.0.1:9"]),
    ("run_clients", ["clients", "--endpoint", "tcp://127.0.0.1:9", "--result", "r.json"]),
])
def test_synthetic_processes_tune_the_allocator_as_pscnn_processes_do(monkeypatch, role, argv):
    """The echo and the synthetic clients stand in for pscnn's server and workers, whose
    entry points keep freed large buffers in the heap: measured so, or the echo's
    reference is a slower transport than pscnn's own."""
    from cnn_core import backend
    from pscnn.bench import synth
    calls = []
    monkeypatch.setattr(backend, "tune_host_allocator", lambda: calls.append("tuned") or True)
    monkeypatch.setattr(synth, role, lambda *a: calls.append(role) or 0)
    assert synth.main(argv) == 0
    assert calls == ["tuned", role]


def test_the_machines_busy_share_is_exact_and_bounded():
    """From /proc/stat's integer ticks: a machine busy all the time is 1.0, not 1.0000000000009
    (seconds divided by the tick rate, then subtracted, came out above 1 in one CI-like run);
    a kernel whose iowait count steps back cannot push it past 1."""
    from pscnn.bench.common import busy_fraction, machine_cpu_ticks
    assert busy_fraction((1_234_567, 2_345_678), (1_234_767, 2_345_878)) == 1.0
    assert busy_fraction((100, 200), (150, 300)) == 0.5
    assert busy_fraction((100, 200), (310, 400)) == 1.0             # busy grew more than the total
    assert busy_fraction((100, 200), (100, 200)) is None            # no tick in between
    assert busy_fraction(None, (100, 200)) is None
    sample = machine_cpu_ticks()
    assert sample is None or (isinstance(sample[0], int) and 0 <= sample[0] <= sample[1])


def test_server_bench_with_curve_measures_the_server_with_keys_beside_the_plain_one(tmp_path):
    """--curve: a third kind of point, the server with CURVE keys (its clients and status queries hold
    a client's), interleaved with the plain server's; their ratio per trial is in the summary."""
    out = tmp_path / "server"
    proc = bench("server", "--curve", "--no-echo", "--clients", "1", "--model", "light", "--seconds", "0.5",
                 "--warmup", "0.2", "--trials", "1", "--out", str(out), "--no-plots")
    doc = json.loads((out / "server.json").read_text())
    rows = {r["kind"]: r for r in doc["rows"]}
    assert set(rows) == {"pscnn", "curve"}
    assert rows["curve"]["cycles"] > 0 and rows["curve"]["errors"] == {}
    assert rows["curve"]["server_updates_per_second"] > 0       # its status answered the keys' holder
    (s,) = doc["summary"]
    assert s["curve_over_plain"] == pytest.approx(rows["curve"]["cycles_per_second"]
                                                  / rows["pscnn"]["cycles_per_second"])
    assert "curve/plain" in proc.stdout


def start_synthetic_clients_through(script: str, monkeypatch) -> None:
    """Each synthetic clients process the server bench starts runs through ``sh -c script``, its
    command as "$@" (``sleep 3; exec "$@"``: a process slow to start, as on a loaded machine)."""
    import subprocess
    real_popen = subprocess.Popen

    def popen(cmd, *args, **kwargs):
        if "pscnn.bench.synth" in cmd and "clients" in cmd:
            cmd = ["sh", "-c", script, "sh", *cmd]
        return real_popen(cmd, *args, **kwargs)
    monkeypatch.setattr(subprocess, "Popen", popen)


def test_server_bench_opens_its_window_once_every_client_cycles(tmp_path, monkeypatch, capsys):
    """The window opened a fixed 1.5 s after the client processes started, plus --warmup: a process
    that took longer to start (1.2-1.9 s to import numpy and zmq on a loaded machine) cycled in part
    of it or none (0 cycles, 'late starts').  It opens --warmup after every client has cycled."""
    from pscnn.cli import main
    start_synthetic_clients_through('sleep 3; exec "$@"', monkeypatch)
    out = tmp_path / "out"
    assert main(["bench", "server", "--clients", "1", "--model", "light", "--seconds", "0.5", "--warmup", "0",
                 "--trials", "1", "--out", str(out), "--no-progress", "--no-plots"]) == 0, capsys.readouterr().err
    rows = json.loads((out / "server.json").read_text())["rows"]
    assert {r["kind"] for r in rows} == {"pscnn", "echo"}
    assert all("error" not in r and r["cycles"] > 0 for r in rows), rows


@pytest.mark.parametrize("script, error", [
    ("exec sleep 10", "timed out after 2 s waiting for the synthetic clients (pscnn, 1 client) to complete a "
                      "cycle each: synthetic client process 0 of 1 had not completed one"),
    ("echo 'cannot start: boom' >&2; exit 3", "synthetic client process 0 (pscnn, 1 client) exited with 3: "
                                              "cannot start: boom"),
])
def test_a_server_bench_client_that_never_cycles_fails_its_point(script, error, tmp_path, monkeypatch, capsys):
    """A client process that never cycles made a point of 0 cycles (or of fewer clients than asked),
    measured; now the bench waits for it a bounded time, and the point failed, saying which."""
    import pscnn.bench.server_bench as server_bench
    from pscnn.cli import main
    monkeypatch.setattr(server_bench, "CLIENTS_CYCLING_TIMEOUT_S", 2.0, raising=False)
    start_synthetic_clients_through(script, monkeypatch)
    out = tmp_path / "out"
    assert main(["bench", "server", *TINY["server"], "--model", "light", "--out", str(out), "--no-progress",
                 "--no-plots"]) == 1
    (row,) = json.loads((out / "server.json").read_text())["rows"]
    assert row["error"] == error
    assert f"pscnn bench server: trial 1, pscnn x 1 client: {error}" in capsys.readouterr().err


def failed_point_error(kind: str) -> Exception:
    """What one measurement may raise besides RuntimeError: a PscnnError (``kind`` "foreign service",
    "run folder") or an OSError ("disk full")."""
    from cnn_core.runlog import RunLogError
    from worker.client import BadReply
    return {
        "foreign service": BadReply(
            "tcp://127.0.0.1:5555 answered a status request with what is not a pscnn message: bad header"),
        "disk full": OSError(28, "No space left on device"),
        "run folder": RunLogError("out/points/async-n2-b64-t0/logs: cannot write: No space left on device"),
    }[kind]


@pytest.mark.parametrize("error", ["foreign service", "disk full", "run folder"])
@pytest.mark.parametrize("bench_name", ["server", "scaling", "time-to-accuracy"])
def test_a_point_failing_on_a_pscnn_or_os_error_is_a_failed_point(bench_name, error, tmp_path, monkeypatch, capsys,
                                                                   request):
    """Each measurement caught RuntimeError only: a PscnnError in one (a foreign ZeroMQ service answering
    the status request, a point's folder that cannot be written) or a full disk ended the whole bench,
    and the measurements done were not written.  It is a failed point, said in one line, the others kept."""
    import pscnn.bench.cluster as cluster
    import pscnn.bench.server_bench as server_bench
    import pscnn.bench.tta as tta
    from pscnn.cli import main
    exc = failed_point_error(error)

    def fail_the_second(result):
        calls = []

        def measure(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise exc
            return result
        return measure
    monkeypatch.setattr(server_bench, "measure", fail_the_second({
        "processes": 1, "window_s": 1.0, "cycles": 100, "cycles_per_second": 100.0, "mb_per_second": 1.0,
        "latency_p50_ms": 1.0, "latency_p99_ms": 2.0, "errors": {}, "model_bytes": 1000}))
    monkeypatch.setattr(cluster, "measure_point", fail_the_second({
        "window_s": 1.0, "updates": 10, "samples": 640, "images_per_second": 640.0, "updates_per_second": 10.0,
        "step_compute_ms": 5.0, "comm_ms": 1.0, "wait_ms": 0.0}))
    monkeypatch.setattr(tta, "run_one", fail_the_second(tta.analyse([], [], 0.5, 64)))
    argv = {"server": ["--clients", "1,2", "--seconds", "0.2", "--warmup", "0", "--trials", "1", "--no-echo"],
            "scaling": ["--compute-ms", "0", "--workers", "1,2", "--mode", "async", "--seconds", "0.5", "--warmup",
                        "0", "--trials", "1"],
            "time-to-accuracy": ["--workers", "1,2", "--mode", "sync", "--max-seconds", "20", "--train-limit", "500",
                                 "--test-limit", "100", "--mnist-dir", request.getfixturevalue("mnist_dir")]}[bench_name]
    out = tmp_path / "out"
    code = main(["bench", bench_name, *argv, "--model", "light", "--out", str(out), "--no-progress", "--no-plots"])
    err = capsys.readouterr().err
    assert f": {exc}\n" in err, err
    if bench_name == "time-to-accuracy":        # its exit status says a run failed, as for a RuntimeError
        assert code == 1 and "error: 1 of 2 runs failed" in err.splitlines()[-1], err
    else:
        assert code == 0, err
    csv_name = {"server": "server.csv", "scaling": "scaling.csv", "time-to-accuracy": "time_to_accuracy.csv"}
    rows = read_csv(out / csv_name[bench_name])
    assert [bool(r.get("error")) for r in rows] == [False, True], rows


def test_results_that_cannot_be_written_are_one_line(tmp_path, monkeypatch, capsys):
    """A full disk when the bench writes its CSV and JSON at the end: a traceback (OSError), not
    the one line every other failure of a bench gets."""
    import errno

    import pscnn.bench.server_bench as server_bench
    from pscnn.cli import main

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(server_bench, "measure", lambda kind, n, args, env, profile=None: {
        "processes": 1, "window_s": 1.0, "cycles": 100, "cycles_per_second": 100.0, "mb_per_second": 1.0,
        "latency_p50_ms": 1.0, "latency_p99_ms": 2.0, "errors": {}, "model_bytes": 1000})
    monkeypatch.setattr(server_bench, "write_outputs", disk_full)
    assert main(["bench", "server", *TINY["server"], "--model", "light", "--out", str(tmp_path / "out"),
                 "--no-progress", "--no-plots"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "pscnn bench server: error: [Errno 28] No space left on device"


@pytest.mark.parametrize("flag, text, needle", [
    ("--model", '{"layers": [', "is not valid JSON"),
    ("--model", WRONG_INPUT, "but MNIST images are [1, 28, 28]"),
    ("--schedule", '{"name": "bogus"}', "unknown schedule 'bogus'"),
])
def test_a_bad_model_or_schedule_file_is_a_usage_error_as_an_inline_one(flag, text, needle, tmp_path, capsys):
    """A --model or --schedule file is a bench option like its inline JSON: one line naming the file,
    exit status 2, before anything starts (it was ``pscnn: error:``, exit 1, while the same JSON inline
    was a usage error)."""
    from pscnn.cli import main
    path, out = tmp_path / "bad.json", tmp_path / "out"
    path.write_text(text)
    code = main(["bench", "time-to-accuracy", *TINY["time-to-accuracy"], flag, str(path), "--out", str(out),
                 "--no-progress", "--no-plots"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("pscnn bench time-to-accuracy: error: ") and f"file {path}" in err, err
    assert needle in err and "\n" not in err, err
    assert not out.exists()             # nothing ran, nothing written


def test_the_ddp_ranks_and_the_synthetic_clients_get_values_that_begin_with_a_dash(tmp_path, monkeypatch):
    """``pscnn bench scaling --ddp on --model -m.json`` and ``pscnn bench server --model -m.json``: the DDP
    ranks and the synthetic clients got ``--model -m.json`` as two words, which their parsers refused
    ("argument --model: expected one argument").  Each command is parsed back by its child's own parser."""
    from types import SimpleNamespace

    from pscnn.bench import ddp, server_bench, synth

    class Started(Exception):
        """Raised in place of starting a child: the test wants its command line only."""

    commands, real_popen = [], subprocess.Popen

    def record(cmd, *args, **kwargs):
        commands.append(cmd)
        raise Started
    monkeypatch.setattr(subprocess, "Popen", record)
    with pytest.raises(Started):
        ddp.measure_ddp(1, 64, 1.0, model="-m.json")

    def clients_recorded(cmd, *args, **kwargs):     # the echo starts for real, the clients are recorded
        return record(cmd) if "clients" in cmd else real_popen(cmd, *args, **kwargs)
    monkeypatch.setattr(subprocess, "Popen", clients_recorded)
    with pytest.raises(Started):
        server_bench.measure("echo", 1, SimpleNamespace(processes=1, model="-m.json"), dict(os.environ))
    ddp_cmd, clients_cmd = commands
    parsed = []
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")     # ddp.main sets it: undone after the test
    monkeypatch.setattr(ddp, "_run_rank", lambda args: parsed.append(args.model) or 0)
    monkeypatch.setattr(synth, "run_clients", lambda args: parsed.append(args.model) or 0)
    assert ddp.main(ddp_cmd[3:]) == 0 and synth.main(clients_cmd[3:]) == 0
    assert parsed == ["-m.json", "-m.json"]


class _WorkersStarted(Exception):
    """Raised by _FlagsCluster once the workers are started: what they were given is all a test needs."""


class _FlagsCluster:
    """A LocalCluster whose server answers at once and whose workers are only recorded, with their flags."""
    worker_flags: list[list[str]] = []

    def __init__(self, out, threads=1, **kwargs):
        self.env, self.endpoint, self.logs, self.procs = {}, "tcp://127.0.0.1:1", Path(out), {}

    def start_server(self, flags):
        return type("Running", (), {"poll": lambda self: None, "returncode": None})()

    def start_worker(self, name, flags):
        self.worker_flags.append(list(flags))

    def start_evaluator(self, flags):
        raise _WorkersStarted

    def stop_all(self, grace=0.0):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("switch, checked", [([], True), (["--no-memory-check"], False)])
def test_the_benches_hand_no_memory_check_to_their_workers(switch, checked, tmp_path, monkeypatch, mnist_file_names):
    """A bench's workers check that a training step fits this machine's memory, and neither bench took
    --no-memory-check (nor could PSCNN_NO_MEMORY_CHECK=1 reach them: children lose the PSCNN_* variables),
    so a batch the estimate wrongly refused could not be measured at all."""
    import pscnn.bench.cluster as cluster
    import pscnn.launcher as launcher
    from pscnn.bench import scaling, tta
    from pscnn.cli import parse_args

    monkeypatch.setattr(_FlagsCluster, "worker_flags", [])
    monkeypatch.setattr(launcher, "LocalCluster", _FlagsCluster)
    monkeypatch.setattr(cluster, "LocalCluster", _FlagsCluster)
    for module in (launcher, cluster):
        monkeypatch.setattr(module, "query_status", lambda endpoint, timeout=None: {"contributors": 0})

    def wait_for(condition, *args, **kwargs):       # for the server, then for the workers to push
        if _FlagsCluster.worker_flags:
            raise _WorkersStarted
        return condition()
    monkeypatch.setattr(cluster, "wait_for", wait_for)
    args = parse_args(["bench", "time-to-accuracy", *switch, "--workers", "2"], {})
    with pytest.raises(_WorkersStarted):
        tta.run_one(tmp_path / "tta", "async", 2, args, None, bar=None)
    started = list(_FlagsCluster.worker_flags)
    _FlagsCluster.worker_flags.clear()
    monkeypatch.setattr(scaling, "_baseline", lambda *a: {})
    args = parse_args(["bench", "scaling", *switch, "--workers", "1", "--mode", "sync", "--trials", "1",
                       "--ddp", "off", "--no-progress", "--out", str(tmp_path / "scaling")], {})
    with pytest.raises(_WorkersStarted):
        scaling.run(args)
    started += _FlagsCluster.worker_flags
    assert len(started) == 3, started
    for flags in started:
        worker = parse_args(["worker", "--server", "tcp://127.0.0.1:1", *flags], {})
        assert worker.no_memory_check is not checked, flags


def test_a_time_to_accuracy_run_whose_server_finished_has_not_failed():
    """_failure tells a run that cannot measure from one that ended: a server that exited 0 finished
    its run (the last evaluation is still to be read), one that exited otherwise failed it, named first."""
    from pscnn.bench.tta import _failure

    class Exited:
        def __init__(self, code):
            self.returncode = code

        def poll(self):
            return self.returncode
    cluster = SimpleNamespace(procs={"worker-0": Exited(None), "evaluator": Exited(None)}, logs=None,
                              log_tail=lambda name: f"{name}'s last line")
    assert _failure(cluster, Exited(None), 1) is None
    assert _failure(cluster, Exited(0), 1) is None
    assert str(_failure(cluster, Exited(1), 1)) == "the server exited with 1: server's last line"
