"""`pscnn run` when one of its children fails while the run goes on.

The launcher follows the server, the workers and the evaluator it started: a
child that exits with an error must stop the run at once with a one-line reason,
not leave the server waiting (for the evaluator: --final-eval-timeout, 120 s by
default) for a report that will never come.

The normal end (an evaluator told to stop by the server exits 0 while the server
is still writing its summary) is covered end to end by
tests/test_distributed.py::test_pscnn_run_end_to_end, and a run without an
evaluator by test_pscnn_run_without_evaluator_scores_the_final_weights_at_once;
here :func:`pscnn.launcher._follow` is also checked on stand-in processes, so
that the order in which they exit is certain.
"""
from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from pscnn.launcher import LocalCluster, _follow, free_port

LABELS = "t10k-labels-idx1-ubyte.gz"


def corrupt_test_labels(mnist_dir: str, dest: Path) -> Path:
    """A copy of the four MNIST files in ``dest`` whose test labels fail gzip's CRC check."""
    dest.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", LABELS):
        shutil.copyfile(Path(mnist_dir) / name, dest / name)
    path = dest / LABELS
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF                # the first byte of the CRC-32 in the gzip trailer: the data stays intact
    path.write_bytes(bytes(data))
    with pytest.raises(gzip.BadGzipFile, match="CRC check failed"):
        gzip.decompress(bytes(data))
    return dest


def processes_naming(text: str) -> list[int]:
    """Process ids whose command line contains ``text`` (every child of a run names its endpoint)."""
    found = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True, check=False).stdout.split()
    return [int(pid) for pid in found if int(pid) != os.getpid()]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# `pscnn run`, in a subprocess, with its evaluator alone reading MNIST from EVALUATOR_MNIST (a flag
# given last wins): the server and the workers read the intact copy, as with a server that does not
# read the test set before it starts.
RUN_WITH_EVALUATOR_DIR = """
import os, sys
from pscnn import launcher
start = launcher.LocalCluster.start_evaluator
def start_evaluator(self, flags=(), name="evaluator"):
    return start(self, [*flags, "--mnist-dir", os.environ["EVALUATOR_MNIST"]], name)
launcher.LocalCluster.start_evaluator = start_evaluator
from pscnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_tiny(mnist: Path, out: Path, port: int, evaluator_mnist: Path | None = None) -> subprocess.CompletedProcess:
    """A tiny `pscnn run` (1 worker, 256 images, 1 epoch), bounded by a generous timeout: without the
    fix a failed evaluator makes it last over --final-eval-timeout (120 s), which fails the test.
    Every child still running afterwards (each names the endpoint) is killed, and its pid kept in
    ``run.leftovers``."""
    flags = ["run", "--workers", "1", "--model", "light", "--train-limit", "256", "--test-limit", "128",
             "--epochs", "1", "--mnist-dir", str(mnist), "--out", str(out), "--port", str(port), "--no-progress",
             "--final-eval-timeout", "120"]
    env = dict(os.environ)
    if evaluator_mnist is None:
        argv = [sys.executable, "-m", "pscnn.cli", *flags]
    else:
        argv = [sys.executable, "-c", RUN_WITH_EVALUATOR_DIR, *flags]
        env["EVALUATOR_MNIST"] = str(evaluator_mnist)
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=100, env=env, check=False)
    finally:
        leftovers = processes_naming(endpoint)
        kill_all(leftovers)
    run.leftovers = leftovers
    return run


@pytest.mark.slow
def test_pscnn_run_with_corrupt_test_labels_exits_1_at_once(tmp_path, mnist_dir):
    """--mnist-dir with a corrupt test-labels file: the evaluator exits 1 at once (and a server
    that reads the test set at its start, too).  `pscnn run` says which child failed and why on
    one line, with the CRC error, stops the rest and exits 1, instead of training on and then
    waiting 120 s for a final evaluation.  No child is left running."""
    bad = corrupt_test_labels(mnist_dir, tmp_path / "mnist-bad")
    out = tmp_path / "run"
    run = run_tiny(bad, out, free_port())
    assert run.returncode == 1, run.stderr[-3000:]
    assert not run.leftovers, f"processes left running: {run.leftovers}"
    crc = f"{LABELS}: corrupt or truncated gzip data: CRC check failed"
    evaluator = [line for line in run.stderr.splitlines() if line.startswith("pscnn run: evaluator exited with 1: ")]
    if evaluator:               # the evaluator's failure stopped the run
        assert len(evaluator) == 1 and crc in evaluator[0], run.stderr[-3000:]
    else:                       # the server failed first, on the same file
        assert f"pscnn run: the server exited with 1; last lines of its log:\npscnn: error: {bad / LABELS}: " \
               "corrupt or truncated gzip data: CRC check failed" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert "waiting up to" not in (out / "logs" / "server.log").read_text()      # not left waiting
    assert not (out / "summary.json").exists()                                    # the run did not finish
    assert "run finished" not in run.stdout


@pytest.mark.slow
def test_pscnn_run_stops_when_its_evaluator_fails_at_startup(tmp_path, mnist_dir):
    """Only the evaluator reads the corrupt test labels: it exits 1 while the server runs.
    `pscnn run` says so on one line (the evaluator, its exit code, the CRC error from its log),
    stops the server (which checkpoints) and the worker, and exits 1.  No child is left running."""
    bad = corrupt_test_labels(mnist_dir, tmp_path / "mnist-bad")
    out = tmp_path / "run"
    run = run_tiny(Path(mnist_dir), out, free_port(), evaluator_mnist=bad)
    assert run.returncode == 1, run.stderr[-3000:]
    assert not run.leftovers, f"processes left running: {run.leftovers}"
    lines = [line for line in run.stderr.splitlines() if "exited with" in line]
    assert lines == [(f"pscnn run: evaluator exited with 1: {bad / LABELS}: corrupt or truncated gzip data: "
                      "CRC check failed")], run.stderr[-3000:]
    assert "pscnn run: the evaluator has failed; stopping the server (it checkpoints) and the workers" in run.stderr
    assert "Traceback" not in run.stderr
    server_log = (out / "logs" / "server.log").read_text()
    # (the 4 batches may all be applied before the evaluator's failure is seen: the server then
    # waits for a final evaluation, and is stopped there, under the subprocess timeout of 100 s)
    assert "interrupted: writing a checkpoint" in server_log, server_log[-3000:]
    assert (out / "checkpoint.npz").exists()
    assert not (out / "summary.json").exists()
    assert "run finished" not in run.stdout


# ---------------------------------------------------------------- _follow on stand-in processes

# A stand-in server: exits 0 on SIGTERM (writing a marker, as the real one checkpoints), else
# once the file ARGV[2] exists plus a moment, so that the launcher sees the other children's end
# while it still runs; at most 60 s either way.
FAKE_SERVER = """
import signal, sys, time
from pathlib import Path
def stop(*_):
    Path(sys.argv[1]).write_text("stopped")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
for _ in range(600):
    if len(sys.argv) > 2 and Path(sys.argv[2]).exists():
        time.sleep(2)
        sys.exit(0)
    time.sleep(0.1)
sys.exit(3)
"""
FAKE_WORKER = "import time\nfor _ in range(600): time.sleep(0.1)\n"     # until stopped (60 s at most)


def start_fake(cluster: LocalCluster, name: str, code: str, *argv: str) -> subprocess.Popen:
    fh = open(cluster.logs / f"{name}.log", "ab")  # noqa: SIM115  (as LocalCluster.start)
    cluster._files.append(fh)                       # closed by cluster.close()
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)
    cluster.procs[name] = proc
    return proc


@pytest.fixture
def fake_cluster(tmp_path):
    c = LocalCluster(tmp_path / "run")              # nothing listens on its port: status() answers None
    yield c
    c.close()


def test_follow_stops_the_run_when_the_evaluator_exits_with_an_error(fake_cluster, tmp_path, capsys):
    """An evaluator that exits 1 while the server runs: _follow reports it on one line, stops the
    server (SIGTERM, first) and the worker, and returns 1."""
    marker = tmp_path / "server-stopped"
    server = start_fake(fake_cluster, "server", FAKE_SERVER, str(marker))
    worker = start_fake(fake_cluster, "worker-0", FAKE_WORKER)
    start_fake(fake_cluster, "evaluator",
               "import sys\nprint('INFO evaluator: starting')\n"
               "print('pscnn: error: /data/t10k-labels-idx1-ubyte.gz: corrupt or truncated gzip data: "
               "CRC check failed')\nsys.exit(1)\n")
    bar = tqdm(total=None, disable=True)
    assert _follow(fake_cluster, bar) == 1
    err = capsys.readouterr().err
    assert ("pscnn run: evaluator exited with 1: /data/t10k-labels-idx1-ubyte.gz: corrupt or truncated gzip "
            "data: CRC check failed\n") in err, err
    assert "last lines of its log" not in err and "worker-0 exited" not in err, err
    assert "the evaluator has failed; stopping the server (it checkpoints) and the workers" in err
    assert marker.read_text() == "stopped"           # the server was told to stop, and did so cleanly
    assert server.returncode == 0
    assert worker.returncode is not None             # stopped, not left running


def test_follow_does_not_count_an_evaluator_that_exits_0(fake_cluster, tmp_path, capsys):
    """The normal end: the server tells the evaluator to stop, it exits 0, and the server still
    runs a moment (writing its summary).  _follow waits for the server and returns its code, 0."""
    done = tmp_path / "evaluator-done"
    marker = tmp_path / "server-stopped"
    start_fake(fake_cluster, "server", FAKE_SERVER, str(marker), str(done))
    start_fake(fake_cluster, "worker-0", "pass\n")
    start_fake(fake_cluster, "evaluator", f"from pathlib import Path\nPath({str(done)!r}).write_text('x')\n")
    bar = tqdm(total=None, disable=True)
    assert _follow(fake_cluster, bar) == 0
    assert not marker.exists(), "the server was stopped"
    assert fake_cluster.procs["evaluator"].wait(10) == 0
    err = capsys.readouterr().err
    assert "exited with" not in err and "stopping the server" not in err, err


def test_follow_without_an_evaluator_waits_for_the_server(fake_cluster, tmp_path, capsys):
    """--no-evaluator: no evaluator among the children; _follow follows the server to its end."""
    done = tmp_path / "worker-done"
    marker = tmp_path / "server-stopped"
    start_fake(fake_cluster, "server", FAKE_SERVER, str(marker), str(done))
    start_fake(fake_cluster, "worker-0", f"from pathlib import Path\nPath({str(done)!r}).write_text('x')\n")
    assert _follow(fake_cluster, tqdm(total=None, disable=True)) == 0
    assert not marker.exists()
    assert "stopping the server" not in capsys.readouterr().err
