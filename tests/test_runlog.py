"""The run folder (cnn_core.runlog): config/metrics/summary files, JSON conversion, plots."""
from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cnn_core import runlog
from cnn_core.runlog import RunLogError, RunWriter, make_plots, read_metrics, to_jsonable, write_json_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def strict_json(text: str):
    """Parse as strict JSON: NaN/Infinity, which Python's json accepts by default, fail."""
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(text, parse_constant=refuse)


def leftover_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- to_jsonable
def test_to_jsonable_converts_numpy_types():
    value = {
        "f32": np.float32(1.5), "f64": np.float64(0.25), "i64": np.int64(7), "u8": np.uint8(255),
        "bool": np.bool_(True), "arr": np.arange(6, dtype=np.int32).reshape(2, 3),
        "zero_d": np.array(3.0), "tuple": (1, np.int16(2)), "path": Path("runs/x"),
        "nested": [{"deep": np.array([0.5, 1.5], dtype=np.float32)}],
        np.int64(4): "numpy key", 5: "int key",
    }
    out = to_jsonable(value)
    assert out == {
        "f32": 1.5, "f64": 0.25, "i64": 7, "u8": 255, "bool": True, "arr": [[0, 1, 2], [3, 4, 5]],
        "zero_d": 3.0, "tuple": [1, 2], "path": "runs/x", "nested": [{"deep": [0.5, 1.5]}],
        "4": "numpy key", "5": "int key",
    }
    # Plain Python types all the way down, so the standard encoder takes it.
    assert type(out["f32"]) is float and type(out["i64"]) is int and type(out["bool"]) is bool
    assert type(out["arr"][0][0]) is int
    json.dumps(out, allow_nan=False)


def test_to_jsonable_maps_non_finite_floats_to_null():
    out = to_jsonable({"nan": float("nan"), "inf": np.float32(np.inf), "arr": np.array([1.0, -np.inf, np.nan])})
    assert out == {"nan": None, "inf": None, "arr": [1.0, None, None]}


def test_to_jsonable_sets_are_sorted_lists():
    assert to_jsonable({3, 1, 2}) == [1, 2, 3]
    # Orders a set does not iterate in by itself: {8, 1} iterates as 8, 1 (hash buckets), and
    # strings come out in PYTHONHASHSEED order, which changes from run to run.
    assert list({8, 1}) == [8, 1] and to_jsonable({8, 1}) == [1, 8]
    words = [f"w{i:02d}" for i in range(30)]
    assert to_jsonable(set(words)) == words
    assert to_jsonable(frozenset({"b", "c", "a"})) == ["a", "b", "c"]


def test_to_jsonable_refuses_unknown_objects():
    with pytest.raises(TypeError, match="object"):
        to_jsonable({"x": object()})
    with pytest.raises(TypeError):
        to_jsonable({(1, 2): "tuple key"})


def test_write_json_atomic_leaves_no_temp_and_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": np.int64(1)})
    assert strict_json(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert strict_json(path.read_text()) == {"a": 1}      # the previous version survives
    assert leftover_temp_files(tmp_path) == []


# --------------------------------------------------------------------------- RunWriter
def test_writer_creates_folder_config_and_records(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    config = {"lr": np.float32(0.5), "layers": (1, 2), "out": out}
    with RunWriter(out, config) as writer:
        assert strict_json((out / "config.json").read_text()) == {"lr": 0.5, "layers": [1, 2], "out": str(out)}
        first = writer.log("step", step=np.int64(1), loss=np.float32(2.5), grads=np.zeros(2))
        second = writer.log("epoch", epoch=1, test_accuracy=0.9)
        # Flushed at once: a reader (tail -f, a crashed process's remains) sees both lines already.
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2
    assert first["kind"] == "step" and first["step"] == 1 and first["loss"] == 2.5 and first["grads"] == [0.0, 0.0]
    assert isinstance(first["seconds"], float) and 0 <= first["seconds"] <= second["seconds"]
    records = [strict_json(line) for line in lines]
    assert records == [first, second]
    assert list(records[0])[:2] == ["kind", "seconds"]
    assert read_metrics(out) == records == read_metrics(out / "metrics.jsonl")


def test_writer_without_resume_truncates(tmp_path):
    with RunWriter(tmp_path, {}) as writer:
        writer.log("step", step=1)
    with RunWriter(tmp_path, {"second": True}) as writer:
        writer.log("step", step=2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [2]
    assert strict_json((tmp_path / "config.json").read_text()) == {"second": True}


def test_a_writer_keeping_the_earlier_run_replaces_its_files_only_once_told(tmp_path):
    """A run started over beside an earlier run's checkpoint: stopped before its first update,
    the earlier run's config.json and metrics.jsonl stay whole (that run is continued with
    --resume); from replace_earlier on, the folder holds this run's, the records held included."""
    with RunWriter(tmp_path, {"earlier": True}) as writer:
        writer.log("step", step=1)
    with RunWriter(tmp_path, {"later": True}, keep_earlier=True) as writer:
        writer.log("start", step=0)
        writer.flush()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert strict_json((tmp_path / "config.json").read_text()) == {"earlier": True}
    with RunWriter(tmp_path, {"later": True}, keep_earlier=True) as writer:
        writer.log("start", step=0)
        writer.replace_earlier()
        writer.log_deferred("step", step=1)
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path)] == [("start", 0), ("step", 1)]
    assert strict_json((tmp_path / "config.json").read_text()) == {"later": True}


def test_a_writer_keeping_the_earlier_run_holds_a_bounded_number_of_records(tmp_path, monkeypatch):
    """Before its first update a run started over held every record in memory: a start barrier
    that clients joined and left for days grew the server without bound.  Past KEPT_MAX the
    records are this run's own: the earlier run's files are replaced and the records written."""
    monkeypatch.setattr(RunWriter, "KEPT_MAX", 5)
    with RunWriter(tmp_path, {"earlier": True}) as writer:
        writer.log("step", step=1)
    with RunWriter(tmp_path, {"later": True}, keep_earlier=True) as writer:
        for i in range(12):
            writer.log("join", worker=f"w{i}")
        assert [r.get("worker") for r in read_metrics(tmp_path)] == [f"w{i}" for i in range(12)]   # not held
    assert [r.get("worker") for r in read_metrics(tmp_path)] == [f"w{i}" for i in range(12)]
    assert strict_json((tmp_path / "config.json").read_text()) == {"later": True}


def test_a_writer_removes_what_a_killed_writer_left_half_written(tmp_path, caplog):
    """A SIGKILL during a checkpoint left .checkpoint.npz.<id>.tmp (as large as the checkpoint)
    for good; the next writer of the folder, which holds its lock, removes such files only."""
    stale = tmp_path / ".checkpoint.npz.0123456789ab.tmp"
    stale.write_bytes(b"x" * 100)
    kept = [tmp_path / name for name in (".checkpoint.npz.tmp", "notes.0123456789ab.tmp", "checkpoint.npz")]
    for path in kept:
        path.write_bytes(b"keep")
    with caplog.at_level(logging.INFO, logger="cnn_core.runlog"), RunWriter(tmp_path, {}, resume=True):
        pass
    assert not stale.exists() and all(path.exists() for path in kept)
    assert "removed .checkpoint.npz.0123456789ab.tmp, left by a process killed mid-write" in caplog.text


def test_an_unwritable_config_json_is_named_once(tmp_path):
    # it read "OUT/metrics.jsonl: cannot write: OUT/config.json: cannot write: Is a directory"
    (tmp_path / "config.json").mkdir()
    with pytest.raises(RunLogError) as exc:
        RunWriter(tmp_path, {})
    assert str(exc.value) == f"{tmp_path / 'config.json'}: cannot write: Is a directory"


def test_writer_resume_appends_and_continues_the_clock(tmp_path):
    with RunWriter(tmp_path, {}) as writer:
        writer.log("step", step=1)
        writer.log("step", step=2, seconds=40.0)       # as if the first run lasted 40 s
    with RunWriter(tmp_path, {}, resume=True) as writer:
        assert writer.seconds >= 40.0
        record = writer.log("step", step=3)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert record["seconds"] >= 40.0


def test_writer_resume_continues_from_the_largest_seconds_not_the_last(tmp_path):
    """The server's eval records carry the train clock, which stops when training ends, so the
    last line may hold a smaller ``seconds`` than an earlier one: the clock must not go back."""
    with RunWriter(tmp_path, {}) as writer:
        for step, seconds in ((1, 5.0), (2, 10.0), (3, 3.0)):
            writer.log("step", step=step, seconds=seconds)
    with RunWriter(tmp_path, {}, resume=True) as writer:
        assert writer.seconds >= 10.0
        record = writer.log("step", step=4)
    assert record["seconds"] >= 10.0
    assert [r["seconds"] for r in read_metrics(tmp_path)][:3] == [5.0, 10.0, 3.0]


def test_writer_resume_skips_an_infinite_seconds(tmp_path):
    """A line of metrics.jsonl with "seconds": Infinity (a hand edit; 1e999 reads the same) set the
    resumed clock to infinity, and every record written after it said "seconds": null."""
    (tmp_path / "metrics.jsonl").write_text('{"kind": "step", "seconds": 2.5}\n{"kind": "step", "seconds": Infinity}\n'
                                            '{"kind": "step", "seconds": 1e999}\n')
    with RunWriter(tmp_path, {}, resume=True) as writer:
        record = writer.log("step", step=3)
    assert isinstance(record["seconds"], float) and 2.5 <= record["seconds"] < 1e6, record
    assert strict_json((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["seconds"] == record["seconds"]


def test_writer_resume_without_previous_file_starts_one(tmp_path):
    with RunWriter(tmp_path / "new", {}, resume=True) as writer:
        writer.log("step", step=1)
    assert [r["step"] for r in read_metrics(tmp_path / "new")] == [1]


def test_writer_resume_cuts_a_torn_last_line(tmp_path, caplog):
    with RunWriter(tmp_path, {}) as writer:
        writer.log("step", step=1)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "step", "step": 2, "lo')     # the process died mid-write
    with caplog.at_level(logging.WARNING), RunWriter(tmp_path, {}, resume=True) as writer:
        writer.log("step", step=3)
    assert "incomplete last line" in caplog.text
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [strict_json(line)["step"] for line in lines] == [1, 3]


def test_writer_resume_reads_metrics_a_line_at_a_time(tmp_path):
    """--resume read the whole metrics.jsonl into memory, as bytes, as text and as a list of its
    lines: three times the file, which a week-long server's step records make larger than any
    machine's memory, so the run could not be resumed.  The peak now is about one line's."""
    import tracemalloc
    step = json.dumps({"kind": "step", "seconds": 1.0, "version": 1, "pad": "x" * 400}) + "\n"
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        fh.write(step * 20_000)                                 # 8 MB
        fh.write(json.dumps({"kind": "eval", "seconds": 99.5}) + "\n")
        fh.write('{"kind": "step", "step": 2, "lo')             # torn: the process died mid-write
    tracemalloc.start()
    try:
        writer = RunWriter(tmp_path, {}, resume=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    with writer:
        assert writer.seconds >= 99.5                          # the largest seconds, found all the same
        writer.log("step", step=3)
    assert peak < 1_000_000, f"resuming held {peak / 1e6:.1f} MB of an 8 MB metrics.jsonl"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20_002 and strict_json(lines[-1])["step"] == 3      # the torn line was cut


def test_writer_log_after_close_and_bad_kind(tmp_path):
    writer = RunWriter(tmp_path, {})
    with pytest.raises(ValueError, match="kind"):
        writer.log("")
    writer.close()
    writer.close()                                     # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.log("step", step=1)


def test_deferred_records_wait_for_flush_log_or_close_in_order(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    writer = RunWriter(tmp_path, {})
    first = writer.log_deferred("step", step=1, loss=np.float32(0.5))     # converted like log's
    writer.log_deferred("step", step=2, loss=float("nan"))
    assert path.read_text() == ""                      # nothing written yet
    writer.flush()
    assert [strict_json(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert first["loss"] == 0.5 and strict_json(path.read_text().splitlines()[1])["loss"] is None
    writer.log_deferred("step", step=3)
    writer.log("checkpoint", version=3)                 # flushed at once, after the step before it
    assert [r["kind"] for r in read_metrics(path)] == ["step", "step", "step", "checkpoint"]
    writer.log_deferred("step", step=4)
    writer.close()
    assert [r.get("step") for r in read_metrics(path)][-1] == 4
    with pytest.raises(ValueError, match="closed"):
        writer.log_deferred("step", step=5)

    # A long burst is written in whole lines, DEFERRED_MAX at a time, without a flush.
    monkeypatch.setattr(RunWriter, "DEFERRED_MAX", 3)
    with RunWriter(tmp_path / "burst", {}) as writer:
        for step in range(7):
            writer.log_deferred("step", step=step)
        assert [r["step"] for r in read_metrics(tmp_path / "burst")] == [0, 1, 2, 3, 4, 5]
    assert [r["step"] for r in read_metrics(tmp_path / "burst")] == list(range(7))


def test_a_record_that_cannot_be_written_by_the_end_fails_close_in_one_line_and_still_closes(tmp_path):
    writer = RunWriter(tmp_path, {})
    writer.log_deferred("step", step=1)

    def disk_full(_data):
        raise OSError(28, "No space left on device")
    writer._write_bytes = disk_full
    writer.log("eval", step=1)                  # no error while the run goes on
    with pytest.raises(runlog.RunLogError, match=r"metrics.jsonl: cannot write: No space left on device"):
        writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.log("step", step=2)


def test_records_wait_while_the_disk_is_full_and_go_out_once_in_order(tmp_path, caplog):
    """A full disk must not end a run (a parameter server would lose every update since its last
    checkpoint): the records wait in memory and are written, each once, when the disk has room."""
    writer = RunWriter(tmp_path, {})
    real = writer._write_bytes
    disk = {"room": 0}                           # bytes the disk still takes; None: room enough

    def filling(data):
        if disk["room"] is None:
            return real(data)
        if disk["room"] == 0:
            raise OSError(28, "No space left on device")
        take, disk["room"] = min(disk["room"], len(data)), 0
        return real(data[:take])                 # a partial write: the disk filled up midway
    writer._write_bytes = filling
    with caplog.at_level(logging.INFO, logger="cnn_core.runlog"):
        for step in range(5):
            writer.log("step", step=step)
        disk["room"] = 30                        # half a record fits, then the disk is full again
        writer.log_deferred("step", step=5)
        writer.flush()
        disk["room"] = None
        writer.log("step", step=6)
        writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(7))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot write (No space left on device); the run goes on" in warnings[0]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO][-1].endswith("written again")


@pytest.mark.parametrize("torn, size", [("{", "1 byte"), ("{\"", "2 bytes")])
def test_the_torn_last_line_cut_is_counted_in_agreement(tmp_path, caplog, torn, size):
    """It said "(1 bytes)"."""
    with RunWriter(tmp_path, {}) as writer:
        writer.log("step", step=1)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write(torn)
    with caplog.at_level(logging.WARNING), RunWriter(tmp_path, {}, resume=True):
        pass
    assert f"metrics.jsonl: dropping an incomplete last line ({size}) left by an interrupted run" in caplog.text


def test_what_waits_for_a_full_disk_is_bounded_and_the_dropped_records_counted(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(RunWriter, "HELD_MAX_BYTES", 1000)
    writer = RunWriter(tmp_path, {})
    real, full = writer._write_bytes, [True]

    def filling(data):
        if full[0]:
            raise OSError(28, "No space left on device")
        return real(data)
    writer._write_bytes = filling
    for step in range(100):                      # ~40 bytes each: about 25 fit in 1000
        writer.log("step", step=step)
    full[0] = False
    with caplog.at_level(logging.INFO, logger="cnn_core.runlog"):
        writer.log("step", step=100)
    writer.close()
    steps = [r["step"] for r in read_metrics(tmp_path)]
    kept = len(steps) - 1
    assert 10 < kept < 30 and steps == [*range(kept), 100], steps
    assert f"{100 - kept} records were dropped while it could not be" in caplog.text


def test_writer_log_is_thread_safe(tmp_path):
    with RunWriter(tmp_path, {}) as writer:
        def work(tid):
            for i in range(200):
                writer.log("eval", thread=tid, i=i, payload="x" * 50)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    records = read_metrics(tmp_path)                   # every line intact, none interleaved
    assert len(records) == 800
    assert sorted((r["thread"], r["i"]) for r in records) == [(t, i) for t in range(4) for i in range(200)]


def test_write_summary_is_atomic_and_strict_json(tmp_path, monkeypatch):
    with RunWriter(tmp_path, {}) as writer:
        path = writer.write_summary({"test_accuracy": np.float64(0.95), "loss": float("nan"),
                                     "confusion_matrix": np.eye(2, dtype=np.int64)})
        assert path == tmp_path / "summary.json"
        assert strict_json(path.read_text()) == {"test_accuracy": 0.95, "loss": None,
                                                 "confusion_matrix": [[1, 0], [0, 1]]}

        # A crash between writing the temp file and the rename leaves the old summary whole.
        def crash(src, dst):
            raise OSError("disk gone")
        monkeypatch.setattr(runlog.os, "replace", crash)
        with pytest.raises(OSError, match="disk gone"):
            writer.write_summary({"test_accuracy": 0.5})
    assert strict_json(path.read_text())["test_accuracy"] == 0.95
    assert leftover_temp_files(tmp_path) == []


def test_read_metrics_skips_malformed_lines(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "step", "step": 1}\n\nnot json\n[1, 2]\n{"kind": "step", "step": 2}\n{"kind": "st')
    with caplog.at_level(logging.WARNING):
        records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    assert "metrics.jsonl:3" in caplog.text and "metrics.jsonl:4" in caplog.text


# --------------------------------------------------------------------------- plots
def make_run(folder: Path, with_summary: bool = True) -> Path:
    with RunWriter(folder, {"model": "light"}) as writer:
        for step in range(10, 101, 10):
            writer.log("step", step=step, epoch=1 + step // 50, loss=2.3 / step ** 0.5, lr=0.05,
                       images_per_second=1000.0)
        writer.log("epoch", epoch=1, step=50, test_accuracy=0.9, test_loss=0.3, seconds=5.0)
        writer.log("eval", step=100, accuracy=0.95, seconds=9.0)        # the evaluator's spelling
        if with_summary:
            rng = np.random.default_rng(0)
            cm = np.diag(rng.integers(80, 120, size=10)) + rng.integers(0, 3, size=(10, 10))
            writer.write_summary({"test_accuracy": 0.95, "confusion_matrix": cm})
    return folder


def test_make_plots_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path)
    paths = make_plots(run)
    assert paths == [run / "learning_curves.png", run / "confusion_matrix.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert leftover_temp_files(run) == []


def test_make_plots_skips_what_has_no_data(tmp_path):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path, with_summary=False)
    assert make_plots(run) == [run / "learning_curves.png"]
    assert make_plots(tmp_path / "empty") == []


def test_make_plots_removes_an_earlier_runs_plot_that_has_no_data_now(tmp_path):
    """A run reusing a folder that stops before any step or test score (a divergence at its
    first updates) left the earlier run's learning curves and confusion matrix in place,
    passing for its own; a distributed run's timeline.png stayed under pscnn train's."""
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path)
    (run / "timeline.png").write_bytes(PNG_MAGIC)            # a distributed run's, earlier
    assert make_plots(run) == [run / "learning_curves.png", run / "confusion_matrix.png"]
    with RunWriter(run, {"model": "light"}) as writer:       # the next run: no step, no score
        writer.log("start")
        writer.write_summary({"status": "diverged", "confusion_matrix": None})
    assert make_plots(run) == []
    assert list(run.glob("*.png")) == []


def test_one_evaluation_plots_on_sensible_axes(tmp_path):
    """One epoch (pscnn train's default) is one test accuracy: matplotlib centred its axes on it,
    from 93.6% to 103.6% over updates 30.5 to 33.5, and at 0.189 s the time ticks ran into each
    other ("0.18000.1825..."); the axes start at 0 updates and seconds, and stop at 100%."""
    figure = pytest.importorskip("matplotlib.figure")
    with RunWriter(tmp_path, {}) as writer:
        for step in (5, 10, 15):
            writer.log("step", step=step, loss=2.0 / step)
        writer.log("epoch", epoch=1, step=32, test_accuracy=0.9863, seconds=0.189)
    fig = runlog._draw_learning_curves(figure.Figure, tmp_path)
    _, by_step, by_time = fig.axes
    for ax in (by_step, by_time):
        low, high = ax.get_xlim()
        assert low == 0 and high > 0
        assert 98.63 < ax.get_ylim()[1] <= 100.5


def test_a_loss_curve_of_one_point_shows_the_point(tmp_path):
    """A run of one logged loss (pscnn train --train-limit 3200 --epochs 1: 50 updates, one step
    record at --log-every 50) drew a line through one point, which is nothing: an empty panel
    with axes from update 48 to 52 and no word of why; the point is drawn as a marker."""
    figure = pytest.importorskip("matplotlib.figure")
    with RunWriter(tmp_path, {}) as writer:
        writer.log("step", step=50, loss=1.35)
        writer.log("epoch", epoch=1, step=50, test_accuracy=0.822, seconds=0.29)
    ax_loss = runlog._draw_learning_curves(figure.Figure, tmp_path).axes[0]
    (line,) = ax_loss.lines
    assert list(line.get_xdata()) == [50.0] and list(line.get_ydata()) == [1.35]
    assert line.get_marker() not in (None, "None", "", " ") and line.get_markersize() > 0


@pytest.mark.parametrize("summary, title", [
    ({"mode": "sync", "workers": 2, "model": "light", "status": "complete"}, "mode sync, 2 workers, model light"),
    ({"mode": "ssp", "staleness_bound": 2, "workers": 1, "model": "seed", "status": "complete"},
     "mode ssp (staleness bound 2), 1 worker, model seed"),
    ({"model": "light", "status": "interrupted"}, "pscnn train, model light, interrupted"),
])
def test_the_curves_and_the_confusion_matrix_say_which_run_they_are_of(summary, title, tmp_path):
    """A sync and an async run's learning_curves.png (or confusion_matrix.png), shown side by side,
    looked alike: nothing on them named the run, its mode, workers or model, or that it was cut short."""
    figure = pytest.importorskip("matplotlib.figure")
    run = tmp_path / "run-a"
    with RunWriter(run, {}) as writer:
        writer.log("step", step=1, loss=2.0)
        writer.log("eval", version=1, test_accuracy=0.5, seconds=0.1)
        writer.write_summary({**summary, "test_accuracy": 0.5, "confusion_matrix": [[1, 1], [0, 2]]})
    for draw in (runlog._draw_learning_curves, runlog._draw_confusion_matrix):
        fig = draw(figure.Figure, run)
        assert fig.get_suptitle() == f"run-a: {title}", draw.__name__
        fig.canvas.draw()                   # the run's title and the axes' titles apart, inside the figure
        height = fig.get_window_extent().height
        suptitle = fig._suptitle.get_window_extent()
        assert suptitle.y1 <= height and all(suptitle.y0 > ax.title.get_window_extent().y1 for ax in fig.axes
                                             if ax.get_title()), draw.__name__


def test_a_panel_with_nothing_to_draw_says_what_the_run_did_not_log(tmp_path):
    """pscnn train interrupted in its first epoch (scored only at an epoch's end) drew two accuracy
    panels that said "no data"; they say there was no test evaluation, as the loss panel of a
    run with no step record says no loss was logged."""
    figure = pytest.importorskip("matplotlib.figure")
    with RunWriter(tmp_path / "interrupted", {}) as writer:
        writer.log("step", step=50, loss=1.3)
        writer.log("step", step=100, loss=0.6)
    fig = runlog._draw_learning_curves(figure.Figure, tmp_path / "interrupted")
    assert [[t.get_text() for t in ax.texts] for ax in fig.axes] == [
        [], ["no test evaluation in this run"], ["no test evaluation in this run"]]
    with RunWriter(tmp_path / "unlogged", {}) as writer:
        writer.log("epoch", epoch=1, step=10, test_accuracy=0.5, seconds=0.1)
    loss_ax = runlog._draw_learning_curves(figure.Figure, tmp_path / "unlogged").axes[0]
    assert [t.get_text() for t in loss_ax.texts] == ["no training loss logged in this run"]


def test_accuracy_vs_time_of_a_distributed_run_is_on_the_training_clock(tmp_path):
    """The report's time to accuracy and summary.json's evaluations count from the first batch
    (train_seconds); the plot drew the eval records' run clock, from the server's start, the
    workers' loading included: 95% at 11.0 s on the plot, 8.8 s in the report beside it."""
    figure = pytest.importorskip("matplotlib.figure")
    with RunWriter(tmp_path, {}) as writer:
        writer.log("eval", version=0, test_accuracy=0.0775, seconds=1.2, train_seconds=0.0)
        writer.log("eval", version=95, test_accuracy=0.958, seconds=11.0, train_seconds=8.8)
    fig = runlog._draw_learning_curves(figure.Figure, tmp_path)
    by_time = fig.axes[2]
    assert list(by_time.lines[0].get_xdata()) == [0.0, 8.8]
    assert by_time.get_xlabel() == "seconds of training (from the first batch)"
    # pscnn train's epoch records have only the run clock, and say so
    with RunWriter(tmp_path / "train", {}) as writer:
        writer.log("epoch", epoch=1, step=32, test_accuracy=0.9863, seconds=0.189)
    by_time = runlog._draw_learning_curves(figure.Figure, tmp_path / "train").axes[2]
    assert list(by_time.lines[0].get_xdata()) == [0.189]
    assert by_time.get_xlabel() == "seconds since start"


@pytest.mark.parametrize("evaluations", [[(0, 0.138, 0.129), (2, 0.084, 1.153)],      # a diverged run
                                         [(0, 0.5, 0.0)], [(32, 0.9863, 0.189)],
                                         [(v, 0.1 + 0.09 * v, 0.5 * v) for v in range(10)]])
def test_the_accuracy_values_are_written_inside_their_axes(evaluations, tmp_path):
    """Centred above its point, the value of an evaluation at update 0 ran into the tick
    labels, and one at the top of the axes over its frame: a diverged run's 13.80 read 3.80."""
    figure = pytest.importorskip("matplotlib.figure")
    with RunWriter(tmp_path, {}) as writer:
        for version, accuracy, seconds in evaluations:
            writer.log("eval", version=version, test_accuracy=accuracy, seconds=seconds)
    fig = runlog._draw_learning_curves(figure.Figure, tmp_path)
    fig.canvas.draw()
    for ax in fig.axes[1:]:
        frame = ax.get_window_extent()
        boxes = [text.get_window_extent() for text in ax.texts]
        assert 1 <= len(boxes) <= len(evaluations)              # the ones with room (see below)
        assert ax.texts[-1].get_text() == f"{100 * evaluations[-1][1]:.2f}"
        assert all(frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                   for box in boxes), (ax.get_title(), [text.get_text() for text in ax.texts])


def test_accuracy_values_close_together_are_not_written_over_each_other(tmp_path):
    """make run's last three evaluations, 130-160 updates apart, read "99.1799.1699.16"; the last
    value is always written, and the others only where they leave room."""
    figure = pytest.importorskip("matplotlib.figure")
    versions = [0, 150, 340, 510, 740, 920, 1120, 1280, 1407]
    with RunWriter(tmp_path, {}) as writer:
        for i, version in enumerate(versions):
            writer.log("eval", version=version, test_accuracy=0.9 + 0.01 * i, seconds=12.0 * i)
    fig = runlog._draw_learning_curves(figure.Figure, tmp_path)
    fig.canvas.draw()
    for ax in fig.axes[1:]:
        boxes = sorted((text.get_window_extent() for text in ax.texts), key=lambda box: box.x0)
        assert ax.texts[-1].get_text() == "98.00", ax.get_title()
        assert len(boxes) >= 5, ax.get_title()
        assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), (ax.get_title(), [t.get_text() for t in ax.texts])


def test_make_plots_without_matplotlib_returns_empty_and_says_why_in_one_line(tmp_path, monkeypatch, caplog):
    """Without matplotlib (a plain `pip install pscnn`) the run folder lacked the plots the README
    lists, and nothing at INFO said why."""
    run = make_run(tmp_path)
    # A None entry in sys.modules makes "import matplotlib..." raise ImportError.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.INFO, logger="cnn_core.runlog"):
        assert make_plots(run) == []
    assert not (run / "learning_curves.png").exists()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert said == ["no plots: matplotlib is not installed (pip install matplotlib, pscnn's plot extra)"], said


def test_make_plots_never_raises(tmp_path, caplog):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path)
    (run / "summary.json").write_text('{"confusion_matrix": [[1, 2, 3]]}')        # not square
    with caplog.at_level(logging.WARNING):
        paths = make_plots(run)
    assert paths == [run / "learning_curves.png"]
    assert "confusion_matrix.png" in caplog.text and "not square" in caplog.text


@pytest.fixture
def drawn(monkeypatch) -> dict:
    """Each curve make_plots draws, by its title: its (x, y) points."""
    curves = {}
    real = runlog._curve

    def spy(ax, points, *args, **kwargs):
        curves[args[2]] = points
        return real(ax, points, *args, **kwargs)
    monkeypatch.setattr(runlog, "_curve", spy)
    return curves


def test_make_plots_reads_the_servers_version_counter(tmp_path, drawn):
    pytest.importorskip("matplotlib")
    with RunWriter(tmp_path, {}) as writer:                 # the parameter server's spelling
        for version in range(1, 6):
            writer.log("step", version=version, loss=1.0 / version, workers=["w0", "w1"])
        writer.log("eval", version=5, test_accuracy=0.9, final=True)
    assert make_plots(tmp_path) == [tmp_path / "learning_curves.png"]
    assert drawn["Training loss"] == [(float(v), 1.0 / v) for v in range(1, 6)]
    assert drawn["Test accuracy vs updates"] == [(5.0, 90.0)]


def test_the_curves_of_a_resumed_run_leave_out_the_updates_its_server_lost(tmp_path, drawn):
    """A server killed at update 6 with its checkpoint at 3, resumed, redid updates 4-6: the
    loss curve drew both runs' losses at 4, 5, 6 (sorted, so it zigzagged between them) and the
    lost run's score at 6 next to the one the model really had."""
    pytest.importorskip("matplotlib")
    with RunWriter(tmp_path, {}) as writer:
        writer.log("start", version=0, resumed=False)
        for version in range(1, 7):
            writer.log("step", version=version, loss=1.0 / version)
        writer.log("eval", version=2, test_accuracy=0.5)
        writer.log("eval", version=6, test_accuracy=0.1)            # of weights the restart lost
        writer.log("start", version=3, resumed=True)
        for version in range(4, 9):
            writer.log("step", version=version, loss=0.1 / version)
        writer.log("eval", version=8, test_accuracy=0.9)
    assert make_plots(tmp_path) == [tmp_path / "learning_curves.png"]
    assert drawn["Training loss"] == [(1.0, 1.0), (2.0, 0.5), (3.0, 1 / 3)] + [(float(v), 0.1 / v) for v in range(4, 9)]
    assert drawn["Test accuracy vs updates"] == [(2.0, 50.0), (8.0, 90.0)]
    assert [y for _, y in drawn["Test accuracy vs time"]] == [50.0, 90.0]


def test_make_plots_handles_null_values(tmp_path):
    pytest.importorskip("matplotlib")
    with RunWriter(tmp_path, {}) as writer:
        writer.log("step", step=1, loss=float("nan"))                  # stored as null
        writer.log("step", step=2, loss=1.0)
        writer.log("epoch", epoch=1, step=2, test_accuracy=None)
    assert make_plots(tmp_path) == [tmp_path / "learning_curves.png"]
    assert (tmp_path / "learning_curves.png").read_bytes().startswith(PNG_MAGIC)


# The server's timeline entries: [worker, answered_s, arrived_s, compute_s] per push.
TIMELINE_STEPS = [
    {"kind": "step", "version": 1, "timeline": [["a", 1.0, 1.5, 0.3], ["b", 1.0, 1.2, 0.5]]},
    {"kind": "eval", "timeline": [["a", 0.0, 9.0, 1.0]]},                   # not a step: ignored
    {"kind": "step", "version": 2, "timeline": [["a", 1.6, 2.0, 0.2],
                                                ["a", 3.0, 2.5, 0.1],          # arrived before the answer
                                                ["b", 1.1], ["c", 1.0, None, 0.1], [7, 1.0, 2.0, 0.1], "x"]},
]


def test_time_split_lays_out_each_workers_cycles():
    """Answer -> arrival: network, the worker's computation, network (halves of the rest);
    arrival -> the next answer: at the server.  A computation longer than its window (another
    clock, --overlap) fills it; malformed entries are skipped."""
    split = runlog.time_split(TIMELINE_STEPS)
    assert split == {
        "a": [(1.0, pytest.approx(1.1), "network"), (pytest.approx(1.1), pytest.approx(1.4), "compute"),
              (pytest.approx(1.4), 1.5, "network"), (1.5, 1.6, "server"),
              (1.6, pytest.approx(1.7), "network"), (pytest.approx(1.7), pytest.approx(1.9), "compute"),
              (pytest.approx(1.9), 2.0, "network")],
        "b": [(1.0, 1.2, "compute")]}
    shares = runlog.time_shares(split)
    assert shares == {"compute": pytest.approx(0.7 / 1.2), "network": pytest.approx(0.4 / 1.2),
                      "server": pytest.approx(0.1 / 1.2)}
    assert runlog.time_shares({}) == {"compute": 0.0, "network": 0.0, "server": 0.0}


def test_time_split_counts_no_waiting_across_a_server_restart_or_a_rejoin():
    """A resumed run's metrics.jsonl holds two incarnations: the seconds from a worker's last
    push to the old server until the new one first answered it (the server dead, restarting)
    were drawn and counted as waiting on the server (76% of a short resumed run); so were the
    seconds a killed worker was gone before it joined again."""
    def step(*entries):
        return {"kind": "step", "timeline": [list(entry) for entry in entries]}
    records = [{"kind": "start"}, {"kind": "join", "worker": "a"}, {"kind": "join", "worker": "b"},
               step(("a", 1.0, 1.2, 0.2), ("b", 1.0, 1.2, 0.2)),
               step(("a", 1.3, 1.5, 0.2), ("b", 1.3, 1.5, 0.2)),
               {"kind": "join", "worker": "b"},                         # b was killed and restarted
               step(("a", 1.6, 1.8, 0.2), ("b", 9.0, 9.2, 0.2)),
               {"kind": "start"}, {"kind": "join", "worker": "a"},   # the server restarted
               step(("a", 20.0, 20.2, 0.2))]
    split = runlog.time_split(records)
    servers = {worker: [(start, end) for start, end, part in spans if part == "server"]
               for worker, spans in split.items()}
    assert servers == {"a": [(1.2, 1.3), (1.5, 1.6)], "b": [(1.2, 1.3)]}
    assert runlog.time_shares(split)["server"] == pytest.approx(0.3 / (0.3 + 7 * 0.2))


def test_time_split_counts_no_waiting_across_a_rejoin_under_the_same_worker_id():
    """The server's step records name a worker by its id, its "join" records by id and name: a
    worker that rejoined under its id (a peer dropped, then back) must start a new session as it
    does where both name the worker (the test above), else its time gone reads as waiting on the server."""
    def step(*entries):
        return {"kind": "step", "timeline": [list(entry) for entry in entries]}
    records = [{"kind": "start"}, {"kind": "join", "worker": "a", "id": "a-0a0b0c0d"},
               step(("a-0a0b0c0d", 1.0, 1.2, 0.2)), step(("a-0a0b0c0d", 1.3, 1.5, 0.2)),
               {"kind": "join", "worker": "a", "id": "a-0a0b0c0d"},         # dropped, and back 7 s later
               step(("a-0a0b0c0d", 9.0, 9.2, 0.2))]
    servers = [(start, end) for start, end, part in runlog.time_split(records)["a-0a0b0c0d"] if part == "server"]
    assert servers == [(1.2, 1.3)]


def test_the_timelines_rows_go_in_their_labels_order_and_a_name_is_shared_only_among_rows(tmp_path):
    """The rows are sorted by the names they show, not by the ids under them (w-a-00000000 came before
    w-ffffffff: w-a before w); and a worker that joined under a row's name but never pushed (killed at
    its start, then restarted) shares no row, so the row keeps its name."""
    figure = pytest.importorskip("matplotlib.figure")
    with RunWriter(tmp_path, {}) as writer:
        for wid, name in (("w-ffffffff", "w"), ("w-a-11111111", "w-a"), ("w-a-00000000", "w-a")):
            writer.log("join", worker=name, id=wid, role="trainer", version=0)
        writer.log("step", timeline=[["w-a-00000000", 1.0, 1.5, 0.4], ["w-ffffffff", 1.0, 1.4, 0.3]])
    ax = runlog._draw_timeline(figure.Figure, tmp_path).axes[0]
    assert [label.get_text() for label in ax.get_yticklabels()] == ["w", "w-a"]


def test_the_timeline_draws_workers_that_share_a_name_as_rows_of_their_own(tmp_path, monkeypatch):
    """Two workers started with the same --name were one row, their pushes mixed (the timeline named
    workers).  It names their ids now: a row each, labelled by name, or by id where names are shared."""
    pytest.importorskip("matplotlib")
    with RunWriter(tmp_path, {}) as writer:
        writer.log("start")
        for wid, name in (("w-0-aaaaaaaa", "w-0"), ("w-0-bbbbbbbb", "w-0"), ("w-1-cccccccc", "w-1")):
            writer.log("join", worker=name, id=wid, role="trainer", version=0)
        writer.log("step", version=1, timeline=[["w-0-aaaaaaaa", 1.0, 1.5, 0.3], ["w-0-bbbbbbbb", 1.0, 1.4, 0.3],
                                                ["w-1-cccccccc", 1.0, 1.2, 0.1]])
        writer.log("step", version=2, timeline=[["w-0-aaaaaaaa", 1.6, 2.0, 0.3], ["w-0-bbbbbbbb", 1.5, 2.0, 0.3]])
    labels = []
    real = runlog._draw_timeline

    def spy(Figure, out_dir, **kwargs):
        fig = real(Figure, out_dir, **kwargs)
        labels.extend(label.get_text() for label in fig.axes[0].get_yticklabels())
        return fig
    monkeypatch.setattr(runlog, "_draw_timeline", spy)
    assert make_plots(tmp_path) == [tmp_path / "timeline.png"]
    assert labels == ["w-0-aaaaaaaa", "w-0-bbbbbbbb", "w-1"]


def test_make_plots_draws_the_timeline_of_a_distributed_run(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    with RunWriter(tmp_path, {}) as writer:
        for record in TIMELINE_STEPS:
            writer.log(record["kind"], **{k: v for k, v in record.items() if k != "kind"})
        writer.write_summary({"mode": "sync"})
    titles = []
    real = runlog._draw_timeline

    def spy(Figure, out_dir, **kwargs):
        fig = real(Figure, out_dir, **kwargs)
        titles.append(fig.axes[0].get_title())
        return fig
    monkeypatch.setattr(runlog, "_draw_timeline", spy)
    assert make_plots(tmp_path) == [tmp_path / "timeline.png"]            # (no loss, no learning curves)
    assert (tmp_path / "timeline.png").read_bytes().startswith(PNG_MAGIC)
    assert "(mode sync)" in titles[0] and "58% computing, 33% network, 8% waiting on the server" in titles[0], titles
    single = make_run(tmp_path / "single")                      # pscnn train's records: no timeline
    assert make_plots(single) == [single / "learning_curves.png", single / "confusion_matrix.png"]


@pytest.mark.parametrize("incarnations", [((0.0, 0.1, 20), (100.0, 0.1, 20)),      # a restart between
                                          ((0.0, 0.3, 30), (9.0, 0.1, 30))])     # a slower start
def test_the_timeline_shows_about_twelve_cycles_of_a_run_with_a_restart_in_it(incarnations, tmp_path):
    """The stretch drawn was twelve mean cycles long, the mean taken from the first push to the
    last: a server down 100 s between two runs of 20 cycles of 0.1 s made the mean 2.5 s, and the
    stretch everything up to the run's end (a long run's hundreds of bars, too thin to read).
    The cycles are measured where the stretch is: a slower first half made them 0.3 s there."""
    figure = pytest.importorskip("matplotlib.figure")
    with RunWriter(tmp_path, {}) as writer:
        for start, length, cycles in incarnations:
            writer.log("start", seconds=start)
            for cycle in range(cycles):
                answered = start + length * cycle
                writer.log("step", seconds=answered + length,
                           timeline=[["a", answered, answered + 0.9 * length, 0.8 * length]])
    low, high = runlog._draw_timeline(figure.Figure, tmp_path).axes[0].get_xlim()
    assert high - low == pytest.approx(12 * 0.1)


def test_a_worker_not_at_work_in_the_timelines_stretch_has_its_row_say_so(tmp_path):
    """A worker that joined late, or was killed early, had an empty row, nothing saying why."""
    figure = pytest.importorskip("matplotlib.figure")
    with RunWriter(tmp_path, {}) as writer:
        for cycle in range(40):
            answered = 0.1 * cycle
            writer.log("step", timeline=[["a", answered, answered + 0.09, 0.08]])
        writer.log("step", timeline=[["late", 3.5, 3.6, 0.08], ["late", 3.6, 3.7, 0.08]])
    ax = runlog._draw_timeline(figure.Figure, tmp_path).axes[0]
    assert ax.get_xlim()[1] < 3.5 and [label.get_text() for label in ax.get_yticklabels()] == ["a", "late"]
    assert [(text.get_text(), text.get_position()[1]) for text in ax.texts] == \
        [("no push in this stretch; its pushes span 3.50-3.70 s", 1)]


def test_the_timelines_legend_names_every_mode_that_makes_a_worker_wait(tmp_path):
    """An ssp run's grey, its workers held at the staleness bound, was explained by a legend that
    named only a sync round, no batch free yet and the update."""
    figure = pytest.importorskip("matplotlib.figure")
    with RunWriter(tmp_path, {}) as writer:
        writer.log("step", timeline=[["a", 0.0, 0.09, 0.08]])
        writer.log("step", timeline=[["a", 0.15, 0.24, 0.08]])
        writer.write_summary({"mode": "ssp"})
    fig = runlog._draw_timeline(figure.Figure, tmp_path)
    [waiting] = [text.get_text() for text in fig.legends[0].get_texts() if text.get_text().startswith("waiting")]
    assert "a sync round" in waiting and "the ssp bound" in waiting, waiting


def test_the_timelines_rows_go_in_the_workers_numbers_order(tmp_path):
    """Sorted as strings, 16 workers' rows read worker-0, worker-1, worker-10 ... worker-15,
    worker-2; and with 20, the 16 drawn were not the first 16."""
    figure = pytest.importorskip("matplotlib.figure")
    names = [f"worker-{i}" for i in range(20)] + ["gpu-box"]
    with RunWriter(tmp_path, {}) as writer:
        writer.log("step", timeline=[[name, 1.0, 1.5, 0.4] for name in reversed(names)])
    ax = runlog._draw_timeline(figure.Figure, tmp_path, max_workers=17).axes[0]
    assert [label.get_text() for label in ax.get_yticklabels()] == \
        ["gpu-box"] + [f"worker-{i}" for i in range(16)]
    assert sorted(["w1b", "w10", "w1", "w2a", "w2"], key=runlog._natural_order) == ["w1", "w1b", "w2", "w2a", "w10"]


def write_distributed_run(folder: Path, steps: int, workers: int = 4, pad: str = "") -> Path:
    """A server's metrics.jsonl as it writes one, async: a step record a push, with its timeline
    entry, an evaluation every 100 updates; worker-1 killed and rejoining a third of the way, the
    server killed at two thirds and resumed 7 updates back (the ``start`` record), a torn last
    line.  ``pad``: text in each step record, to make a larger file of the same records."""
    rng = np.random.default_rng(1)
    names = [f"worker-{i}" for i in range(workers)]
    answered = dict.fromkeys(names, 0.0)
    version = 0
    lines = [{"kind": "start", "seconds": 0.0, "version": 0, "resumed": False}]
    lines += [{"kind": "join", "seconds": 0.0, "worker": name} for name in names]
    for step in range(steps):
        if step == steps // 3:
            lines.append({"kind": "join", "worker": "worker-1"})
            answered["worker-1"] += 2.0
        if step == 2 * steps // 3:
            version -= 7
            lines.append({"kind": "start", "version": version, "resumed": True})
            lines += [{"kind": "join", "worker": name} for name in names]
            answered = {name: t + 5.0 for name, t in answered.items()}
        name = min(names, key=answered.get)
        compute = 0.04 + 0.01 * (1 + names.index(name)) * rng.random()
        arrived = answered[name] + compute + 0.002 * rng.random()
        version += 1
        lines.append({"kind": "step", "seconds": round(arrived, 4), "version": version, "workers": [name],
                      "loss": 2.3 / (1 + 0.01 * step) + 0.1 * rng.random(), "pad": pad,
                      "timeline": [[name, round(answered[name], 4), round(arrived, 4), round(compute, 4)]]})
        answered[name] = arrived + 0.001 + 0.003 * rng.random()
        if version % 100 == 0:
            lines.append({"kind": "eval", "seconds": round(arrived, 4), "version": version,
                          "test_accuracy": min(0.99, 0.1 + step / steps)})
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in lines)
        fh.write('{"kind": "step", "version": 9')
    (folder / "summary.json").write_text('{"mode": "async"}')
    return folder


def test_the_plots_read_metrics_a_record_at_a_time_and_draw_what_the_whole_file_held(tmp_path, drawn, caplog):
    """make_plots read all of metrics.jsonl into memory, twice.  Streamed, a normal run's plots
    are those drawn from the whole file in memory: the curves less the lost updates, and the
    timeline's shares, stretch and bars from time_split's every span."""
    figure = pytest.importorskip("matplotlib.figure")
    caplog.set_level(logging.WARNING)
    run = write_distributed_run(tmp_path, steps=900, workers=5)
    records = read_metrics(run)
    assert {"start", "join", "eval"} <= {r["kind"] for r in records}
    caplog.clear()

    runlog._draw_learning_curves(figure.Figure, run)
    loss, by_step, by_time = [], [], []
    for r in runlog.without_lost_updates(records):
        if r["kind"] == "step":
            loss.append((float(r["version"]), r["loss"]))
        elif r["kind"] == "eval":
            by_step.append((float(r["version"]), 100 * r["test_accuracy"]))
            by_time.append((r["seconds"], 100 * r["test_accuracy"]))
    assert len(loss) == 900 - 7
    assert drawn == {"Training loss": loss, "Test accuracy vs updates": by_step, "Test accuracy vs time": by_time}

    split = runlog.time_split(records)
    busiest = max(split.values(), key=len)
    computes = [start for start, _, part in busiest if part == "compute"]
    shown = computes[len(computes) // 2:][:13]
    cycle = float(np.median(np.diff(shown)))
    t0 = max(busiest[0][0], shown[0] - 0.1 * cycle)
    t1 = min(busiest[-1][1], t0 + 12 * cycle)
    ax = runlog._draw_timeline(figure.Figure, run).axes[0]
    assert ax.get_xlim() == (t0, t1)
    shares = runlog.time_shares(split)
    assert f"the whole run: {100 * shares['compute']:.0f}% computing, {100 * shares['network']:.0f}% network, " \
           f"{100 * shares['server']:.0f}% waiting on the server" in ax.get_title()
    bars = [[(max(s, t0), min(e, t1) - max(s, t0)) for s, e, p in split[worker] if p == part and e > t0 and s < t1]
            for worker in sorted(split) for part in runlog.TIMELINE_PARTS]         # (x, width) per row and part
    assert sum(map(len, bars)) > 30
    drawn_bars = [[(path.vertices[:, 0].min(), np.ptp(path.vertices[:, 0])) for path in collection.get_paths()]
                  for collection in ax.collections]
    assert list(map(len, drawn_bars)) == list(map(len, bars))
    assert np.allclose(sum(drawn_bars, []), sum(bars, []), rtol=0, atol=1e-9)
    # The torn last line is read as one still being written (the server's plot thread): not warned of.
    assert "skipping a malformed line" not in caplog.text


def test_the_plots_leave_out_a_last_line_still_being_written_without_a_warning(tmp_path, drawn, caplog):
    """The server draws its plots in a thread while it logs its clients' goodbyes: a read that
    caught the last line half written logged "skipping a malformed line" for a record that was
    fine.  Every complete line is read; the half-written one, and any end of it written while
    the file is read, are left out."""
    pytest.importorskip("matplotlib")
    with RunWriter(tmp_path, {}) as writer:
        for version in range(1, 6):
            writer.log("step", version=version, loss=1.0 / version,
                       timeline=[["w0", 0.1 * version, 0.1 * version + 0.08, 0.05]])
        writer.log("eval", version=5, test_accuracy=0.9, final=True)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "leave", "seconds": 3.1, "worker": "evalu')             # the goodbye, half written
    with caplog.at_level(logging.WARNING):
        assert make_plots(tmp_path) == [tmp_path / "learning_curves.png", tmp_path / "timeline.png"]
    assert caplog.records == []
    with caplog.at_level(logging.WARNING):
        records = list(runlog.iter_metrics(tmp_path, growing=True))
    assert caplog.records == []
    assert drawn["Training loss"] == [(float(v), 1.0 / v) for v in range(1, 6)]
    assert drawn["Test accuracy vs updates"] == [(5.0, 90.0)]
    assert [r["kind"] for r in records] == ["step"] * 5 + ["eval"]
    # Reading stops at the half-written line: its end, written meanwhile, is not a line of its own.
    assert list(runlog._complete_lines(['{"a": 1}\n', '{"b": ', '2}\n'])) == ['{"a": 1}\n']


def test_a_long_runs_curves_keep_evenly_thinned_points_less_the_lost_updates(tmp_path, drawn, monkeypatch):
    """Every point of every curve was drawn: a week-long server's millions of steps, on a curve
    500 pixels wide.  Over the cap, every other point kept goes, evenly over the run."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(runlog, "CURVE_POINTS", 100)
    with RunWriter(tmp_path, {}) as writer:
        for version in range(1, 701):
            writer.log("step", version=version, loss=1.0)
        writer.log("start", version=600, resumed=True)       # updates 601-700 were lost
        for version in range(601, 1001):
            writer.log("step", version=version, loss=0.5)
    make_plots(tmp_path)
    points = drawn["Training loss"]
    assert 50 <= len(points) < 100
    xs = [x for x, _ in points]
    assert xs[0] == 1 and xs[-1] > 1000 - 16
    assert sorted(set(np.diff(xs))) == [12, 16]            # 16 apart, and one step across the restart
    assert all(y == (1.0 if x <= 600 else 0.5) for x, y in points)


def test_a_long_runs_plots_are_drawn_in_bounded_memory(tmp_path, monkeypatch):
    """A distributed run writes ~9 KB of metrics.jsonl a second; make_plots held the whole file,
    as dicts, twice (53 MB for 7 MB): a week-long server's end was killed for want of memory.
    Now a run ten times longer takes no more memory to plot (the points kept capped lower here,
    so that both runs are over the cap)."""
    import gc
    import tracemalloc
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(runlog, "CURVE_POINTS", 1_000)

    def plotting_peak(run: Path) -> int:
        gc.collect()            # an earlier test's garbage, collected during one plot and not the other
        tracemalloc.start()
        try:
            assert make_plots(run) == [run / "learning_curves.png", run / "timeline.png"]
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    short = write_distributed_run(tmp_path / "short", steps=2_000, pad="x" * 150)
    plotting_peak(short)                                   # imports, fonts: not the file's
    long = write_distributed_run(tmp_path / "long", steps=20_000, pad="x" * 150)
    sizes = [(run / "metrics.jsonl").stat().st_size for run in (short, long)]
    assert sizes[1] > 6_000_000
    peaks = [plotting_peak(run) for run in (short, long)]
    assert peaks[1] - peaks[0] < (sizes[1] - sizes[0]) / 20, \
        f"plotting {sizes[1] / 1e6:.1f} MB of metrics.jsonl took {peaks[1] / 1e6:.1f} MB, " \
        f"and {sizes[0] / 1e6:.1f} MB of it {peaks[0] / 1e6:.1f} MB"


def test_two_writers_of_one_run_folder_are_refused_in_one_line(tmp_path):
    """Two processes writing one folder would interleave metrics.jsonl and overwrite each
    other's checkpoint and summary: the second is refused, naming the first's pid."""
    import subprocess
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from cnn_core.runlog import RunWriter; "
        f"w = RunWriter({str(out)!r}, {{}}); print('ready', flush=True); sys.stdin.read(); w.close()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(RunLogError, match=rf"another pscnn process \(pid {holder.pid}\) is writing this run folder"):
            RunWriter(out, {"second": True})
        assert json.loads((out / "config.json").read_text()) == {}          # the first's, untouched
    finally:
        holder.communicate("", timeout=30)
    with RunWriter(out, {"third": True}):           # released when the first closed
        pass


def test_iter_metrics_parses_only_the_lines_that_can_be_of_the_kinds_asked(tmp_path, monkeypatch):
    """latest_run_id, which every --resume asks (pscnn run's checks, then the server), wants the few
    "start" records, and parsed every step record for them: 7.5 s for a million.  A line that cannot
    spell the kind asked is skipped unparsed; one that spells it otherwise (an escape) is parsed."""
    with RunWriter(tmp_path, {}) as writer:
        writer.log("start", run_id="0123456789ab")
        for version in range(1, 101):
            writer.log("step", version=version, workers=["start"] if version == 50 else ["w"])
        writer.log("eval", version=100, test_accuracy=0.9)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"kind": "\\u0073tart", "run_id": "ba9876543210"}\n')
    parses = [0]
    real = json.loads

    def counted(*args, **kwargs):
        parses[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(json, "loads", counted)
    starts = list(runlog.iter_metrics(tmp_path, kinds=("start",)))
    assert [r["run_id"] for r in starts] == ["0123456789ab", "ba9876543210"]
    assert parses[0] == 3           # the two start records, and the step record of a worker named "start"
    assert [r["kind"] for r in runlog.iter_metrics(tmp_path, kinds={"eval", "start"})] == ["start", "eval", "start"]
    assert len(list(runlog.iter_metrics(tmp_path))) == 103
    assert len(list(runlog.iter_metrics(tmp_path, kinds="start"))) == 2     # a string: matched as before, by `in`
