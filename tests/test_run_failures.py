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
import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from tqdm import tqdm

from cnn_core.data import MNIST_FILES
from helpers import assert_training_goes_on, assert_training_had_not_finished, lose_a_stop_signal
from pscnn import launcher
from pscnn.launcher import LocalCluster, _follow, free_port, query_status, wait_for
from server.resume import checkpoint_version

LABELS = "t10k-labels-idx1-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"


def corrupt_mnist_copy(mnist_dir: str, dest: Path, corrupt: str = LABELS) -> Path:
    """A copy of the four MNIST files in ``dest`` whose file ``corrupt`` (by default the test
    labels) fails gzip's CRC check."""
    dest.mkdir()
    for name in (TRAIN_LABELS, "train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", LABELS):
        shutil.copyfile(Path(mnist_dir) / name, dest / name)
    path = dest / corrupt
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF                # the first byte of the CRC-32 in the gzip trailer: the data stays intact
    path.write_bytes(bytes(data))
    with pytest.raises(gzip.BadGzipFile, match="CRC check failed"):
        gzip.decompress(bytes(data))
    return dest


def processes_naming(text: str) -> list[int]:
    """Process ids whose command line contains ``text`` (every child of a run names its endpoint)."""
    result = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True, check=False)
    # 1: none found; anything else but 0 is pgrep failing, which must not read as "none left"
    assert result.returncode in (0, 1), f"pgrep -f {text}: exit {result.returncode}: {result.stderr.strip()}"
    return [int(pid) for pid in result.stdout.split() if int(pid) != os.getpid()]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def children_left_running(port: int) -> list[int]:
    """The processes of a `pscnn run --port PORT` still running once it has ended (every child
    names the endpoint), killed: the test fails on them, and must not leave them to load the
    machine for the tests after it."""
    leftovers = processes_naming(f"tcp://127.0.0.1:{port}")
    kill_all(leftovers)
    return leftovers


# `pscnn run`, in a subprocess, with its evaluator alone reading MNIST from EVALUATOR_MNIST (a flag
# given last wins): the server and the workers read the intact copy, as with a server that does not
# read the test set before it starts.
RUN_WITH_EVALUATOR_DIR = """
import os, sys
from cnn_core.data import MNIST_FILES
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
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=100, env=env, check=False)
    finally:
        leftovers = children_left_running(port)
    run.leftovers = leftovers
    return run


@pytest.mark.slow
def test_pscnn_run_with_corrupt_test_labels_exits_1_at_once(tmp_path, mnist_dir):
    """--mnist-dir with a corrupt test-labels file: the evaluator exits 1 at once (and a server
    that reads the test set at its start, too).  `pscnn run` says which child failed and why on
    one line, with the CRC error, stops the rest and exits 1, instead of training on and then
    waiting 120 s for a final evaluation.  No child is left running."""
    bad = corrupt_mnist_copy(mnist_dir, tmp_path / "mnist-bad")
    out = tmp_path / "run"
    run = run_tiny(bad, out, free_port())
    assert run.returncode == 1, run.stderr[-3000:]
    assert not run.leftovers, f"processes left running: {run.leftovers}"
    crc = f"{LABELS}: corrupt or truncated gzip data: CRC check failed"
    evaluator = [line for line in run.stderr.splitlines() if line.startswith("pscnn run: evaluator exited with 1: ")]
    if evaluator:               # the evaluator's failure stopped the run
        assert len(evaluator) == 1 and crc in evaluator[0], run.stderr[-3000:]
    else:                       # the server failed first, on the same file
        said = f"pscnn run: the server exited with 1: {bad / LABELS}: corrupt or truncated gzip data: CRC check failed"
        assert any(line.startswith(said) for line in run.stderr.splitlines()), run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert "waiting up to" not in (out / "logs" / "server.log").read_text()      # not left waiting
    assert not (out / "summary.json").exists()                                    # the run did not finish
    assert "run finished" not in run.stdout


@pytest.mark.slow
def test_pscnn_run_whose_workers_fail_on_their_training_set_has_nothing_to_continue(tmp_path, mnist_dir):
    """Corrupt training labels: the worker exits 1 naming the file, `pscnn run` stops the server
    and exits 1; the server's checkpoint holds version 0, so the last line says that nothing was
    trained and that the same command starts the run once the file is fixed (not --resume, which
    would only start it over).  No child is left running."""
    bad = corrupt_mnist_copy(mnist_dir, tmp_path / "mnist-bad", corrupt=TRAIN_LABELS)
    out = tmp_path / "run"
    run = run_tiny(bad, out, free_port())
    assert run.returncode == 1, run.stderr[-3000:]
    assert not run.leftovers, f"processes left running: {run.leftovers}"
    lines = run.stderr.strip().splitlines()
    # the streamed reader's message adds the two CRCs ("CRC check failed 0x... != 0x...")
    crc = f"pscnn run: worker-0 exited with 1: {bad / TRAIN_LABELS}: corrupt or truncated gzip data: CRC check failed"
    assert [line for line in lines if line.startswith(crc)], run.stderr[-3000:]
    assert "pscnn run: every worker has exited before the end of training; stopping the server (it checkpoints)" \
        in lines, run.stderr[-3000:]
    assert lines[-1] == ("pscnn run: stopped before the first update, with nothing to continue; once what is "
                         f"reported above is fixed, the same command starts the run (run folder {out})"), lines
    assert "--resume" not in run.stderr and "Traceback" not in run.stderr
    assert checkpoint_version(str(out)) == 0


@pytest.mark.slow
def test_pscnn_run_stops_when_its_evaluator_fails_at_startup(tmp_path, mnist_dir):
    """Only the evaluator reads the corrupt test labels: it exits 1 while the server runs.
    `pscnn run` says so on one line (the evaluator, its exit code, the CRC error from its log),
    stops the server (which checkpoints) and the worker, and exits 1.  No child is left running.

    The evaluator says goodbye as it fails, so a server that has applied the 4 batches by then
    does not wait for its final evaluation: it may score the final weights itself and finish the
    run before the launcher's SIGTERM comes (CI's 2 cores saw that).  The launcher then prints
    the run's report; the order is not the test's to choose, so both endings are checked."""
    bad = corrupt_mnist_copy(mnist_dir, tmp_path / "mnist-bad")
    out = tmp_path / "run"
    run = run_tiny(Path(mnist_dir), out, free_port(), evaluator_mnist=bad)
    assert run.returncode == 1, run.stderr[-3000:]
    assert not run.leftovers, f"processes left running: {run.leftovers}"
    lines = [line for line in run.stderr.splitlines() if "exited with" in line]
    crc = f"pscnn run: evaluator exited with 1: {bad / LABELS}: corrupt or truncated gzip data: CRC check failed"
    assert len(lines) == 1 and lines[0].startswith(crc), run.stderr[-3000:]
    stopping = "pscnn run: the evaluator has failed; stopping the server (it checkpoints) and the workers"
    assert "Traceback" not in run.stderr
    server_log = (out / "logs" / "server.log").read_text()
    assert (out / "checkpoint.npz").exists()
    if "run complete" in server_log:        # the server finished the run before it was stopped
        assert "the evaluator left (error); scoring the final weights here" in server_log, server_log[-3000:]
        assert "interrupted" not in server_log and "waiting up to" not in server_log, server_log[-3000:]
        assert json.loads((out / "summary.json").read_text())["status"] == "complete"
        assert "run finished: mode sync, 1 worker, 1 epoch" in run.stdout, run.stdout
        # The launcher saw the evaluator's exit while the server ran (it stopped the server, then
        # found the summary), or only after the server had exited 0 (the evaluator, at nice +10,
        # can outlive its goodbye by a second on a busy machine): then it reports the run and
        # names the evaluator afterwards, with no stop to announce.
        report = "pscnn run: the server had ended the run (summary.json written); its report follows"
        assert (stopping in run.stderr) == (report in run.stderr), run.stderr[-3000:]
    else:                                   # stopped mid-run, or while it waited for a final evaluation
        assert stopping in run.stderr, run.stderr[-3000:]
        assert "interrupted: writing a checkpoint" in server_log, server_log[-3000:]
        assert not (out / "summary.json").exists()
        assert "run finished" not in run.stdout
        if checkpoint_version(str(out)):    # the worker's first batches were applied before the stop
            assert "Continue with the same command plus --resume" in run.stderr, run.stderr[-3000:]
        else:
            assert "pscnn run: stopped before the first update, with nothing to continue" in run.stderr, \
                run.stderr[-3000:]


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
print("ready", flush=True)          # READY: its handler is set
for _ in range(600):
    if len(sys.argv) > 2 and Path(sys.argv[2]).exists():
        time.sleep(2)
        sys.exit(0)
    time.sleep(0.1)
sys.exit(3)
"""
FAKE_WORKER = "import time\nfor _ in range(600): time.sleep(0.1)\n"     # until stopped (60 s at most)
READY = 'print("ready", flush=True)'    # in a stand-in's code: start_fake waits for its line


def start_fake(cluster: LocalCluster, name: str, code: str, *argv: str) -> subprocess.Popen:
    """A stand-in child; one whose code holds READY (after its signal handlers are set) is
    waited for until it printed it, so that a signal from the launcher cannot come before them."""
    log_path = cluster.logs / f"{name}.log"
    fh = open(log_path, "ab")  # noqa: SIM115  (as LocalCluster.start)
    cluster._files.append(fh)                       # closed by cluster.close()
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)
    cluster.procs[name] = proc
    if READY in code:
        wait_for(lambda: "ready" in log_path.read_text() or proc.poll() is not None, 30, f"{name} to be ready")
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


def test_follow_stops_a_server_that_goes_silent_once_every_worker_has_gone(fake_cluster, tmp_path, capsys,
                                                                         monkeypatch):
    """With every worker gone, the launcher waits for the server to finish the run, as long as
    it answers: one that never answers again is stopped, not waited on for ever."""
    monkeypatch.setattr(launcher, "SILENT_SERVER_S", 1.0)
    marker = tmp_path / "server-stopped"
    start_fake(fake_cluster, "server", FAKE_SERVER, str(marker))     # answers no status request
    start_fake(fake_cluster, "worker-0", "pass\n")
    assert _follow(fake_cluster, tqdm(total=None, disable=True)) == 1
    assert "every worker has exited and the server has not answered for 1 s; stopping it" in \
        capsys.readouterr().err
    assert marker.read_text() == "stopped"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_follow_waits_for_a_stopped_server_and_stops_it_once_continued_and_silent(fake_cluster, tmp_path,
                                                                                monkeypatch):
    """A server stopped (SIGSTOP, a debugger) once every worker has gone is silent by the user's
    choice: the launcher says so once and waits (it was stopped as hung after SILENT_SERVER_S, and
    killed: SIGTERM stays pending in a stopped process).  Continued and still silent, it is stopped."""
    import threading
    monkeypatch.setattr(launcher, "SILENT_SERVER_S", 0.5)
    said = []
    monkeypatch.setattr(launcher, "_say", said.append)
    polls = []                                      # one per _follow iteration
    monkeypatch.setattr(fake_cluster, "status", lambda timeout=1.0: polls.append(1))
    marker = tmp_path / "server-stopped"
    server = start_fake(fake_cluster, "server", FAKE_SERVER, str(marker))     # answers no status request
    start_fake(fake_cluster, "worker-0", "pass\n").wait(30)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", 10,
                 "the server to be stopped")
        result = []
        follow = threading.Thread(target=lambda: result.append(_follow(fake_cluster, tqdm(total=None, disable=True))))
        follow.start()
        wait_for(lambda: any("is stopped" in line for line in said) or not follow.is_alive(), 30,
                 "the launcher to say the server is stopped")
        polls_then = len(polls)
        # more polls than SILENT_SERVER_S takes (each waits 0.5 s for an answer, then sleeps 0.5 s)
        wait_for(lambda: len(polls) >= polls_then + 4 or not follow.is_alive(), 30, "four more polls")
        assert follow.is_alive() and server.poll() is None and not marker.exists(), said
        assert [line for line in said if "is stopped" in line] == [
            f"pscnn run: the server (pid {server.pid}) is stopped (a signal or a debugger); waiting for it to "
            "continue (SIGCONT)"]
        os.kill(server.pid, signal.SIGCONT)
        follow.join(60)
        assert not follow.is_alive() and result == [1]
        assert marker.read_text() == "stopped"          # SIGTERM, handled: not killed
        assert any("has not answered for" in line for line in said), said
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGCONT)        # fake_cluster.close() kills it


def test_follow_says_once_that_the_evaluator_left_before_the_end_of_training(fake_cluster, tmp_path, monkeypatch):
    """An evaluator stopped by a signal mid-run says goodbye and exits 0, as one the server told to
    stop: the run went on without a word, and its report had one or two evaluations, unexplained."""
    said = []
    monkeypatch.setattr(launcher, "_say", said.append)
    done = tmp_path / "server-done"
    polls = []

    def status(timeout=1.0):                        # training goes on; after a few polls the server ends
        polls.append(1)
        if len(polls) == 4:
            done.write_text("x")
        return {"done": False, "batches_total": 10, "batches_done": 1}
    monkeypatch.setattr(fake_cluster, "status", status)
    start_fake(fake_cluster, "server", FAKE_SERVER, str(tmp_path / "server-stopped"), str(done))
    start_fake(fake_cluster, "worker-0", FAKE_WORKER)
    start_fake(fake_cluster, "evaluator", "pass\n").wait(30)
    assert _follow(fake_cluster, tqdm(total=None, disable=True)) == 0
    assert said == ["pscnn run: the evaluator exited before the end of training (see logs/evaluator.log); training "
                    "goes on without its evaluations, and the server scores the final weights itself"]


def test_follow_says_which_child_had_to_be_killed(fake_cluster, tmp_path, capsys):
    """A worker that ignores SIGTERM when the run is stopped: it is killed after the 10 s grace
    period, and _follow says so on one line (it said nothing: the user only saw a stop that took
    10 s longer)."""
    start_fake(fake_cluster, "server", FAKE_SERVER, str(tmp_path / "server-stopped"))
    start_fake(fake_cluster, "worker-0", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                         f"{READY}\nfor _ in range(600): time.sleep(0.1)\n")
    start_fake(fake_cluster, "evaluator", "import sys, time\ntime.sleep(1)\nsys.exit(1)\n")
    assert _follow(fake_cluster, tqdm(total=None, disable=True)) == 1
    err = capsys.readouterr().err
    killed = [line for line in err.splitlines() if "did not stop" in line]
    assert killed == ["pscnn run: worker-0 did not stop within 10 s of SIGTERM; killed it (SIGKILL)"], err
    assert fake_cluster.procs["worker-0"].returncode == -signal.SIGKILL


# ------------------------------------------------ `pscnn run` when its children are signalled

TINY_RUN = ["--model", "light", "--test-limit", "128", "--epochs", "1", "--no-progress", "--eval-every", "60"]


@contextmanager
def pscnn_run(tmp_path: Path, mnist_dir: str, *flags: str):
    """`pscnn run` in a subprocess (its own session: the test signals it alone), and its endpoint;
    afterwards it and every child still running (each names the endpoint) are killed."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "pscnn.cli", "run", "--port", str(port), "--mnist-dir", mnist_dir,
            "--out", str(tmp_path / "run"), *TINY_RUN, *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield proc, endpoint
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        children_left_running(port)


def wait_until_training(endpoint: str, proc: subprocess.Popen, timeout: float = 60) -> dict:
    """The server's status once it applied a first batch (while the launcher still runs)."""
    def training():
        assert proc.poll() is None, "pscnn run ended early"
        st = query_status(endpoint, 0.5)
        return st if st and st.get("batches_done", 0) > 0 else None
    return wait_for(training, timeout, "the first applied batch")


def child_pid(endpoint: str, name: str) -> int:
    """The pid of the launcher's child ``name`` (its command line names the endpoint, then the name)."""
    text = f"{endpoint} --name {name}" if name != "server" else f"server --bind {endpoint}"
    pids = wait_for(lambda: processes_naming(text), 10, name)
    assert len(pids) == 1, pids
    return pids[0]


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str, str]:
    """Its exit code, stdout and stderr, within ``timeout`` (else the test fails: the launcher hangs)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pscnn run still running after {timeout:.0f} s")
    return proc.returncode, out, err


@pytest.mark.slow
def test_a_killed_worker_does_not_stop_a_run_the_others_finish(tmp_path, mnist_dir):
    """kill -9 of one worker: the other trains every batch and exits 0, told the run is over.
    The launcher lets the server score and summarise the run (it stopped it during the final
    evaluation: no summary, no report), prints the report, and exits 1 for the dead worker, which
    it names on one line."""
    with pscnn_run(tmp_path, mnist_dir, "--workers", "2", "--train-limit", "12000", "--peer-timeout", "2") \
            as (proc, endpoint):
        wait_until_training(endpoint, proc)
        os.kill(child_pid(endpoint, "worker-0"), signal.SIGKILL)
        assert_training_goes_on(query_status(endpoint, 5), "killed worker-0")
        code, out, err = finish(proc)
    assert code == 1, err[-3000:]
    assert [line for line in err.splitlines() if "worker-0" in line] == \
           ["pscnn run: worker-0 exited with -9 (killed by SIGKILL)"], err[-3000:]
    assert "stopping the server" not in err and "Traceback" not in err, err[-3000:]
    assert (tmp_path / "run" / "summary.json").exists()
    assert "run finished" in out


@pytest.mark.slow
def test_every_worker_stopped_politely_stops_the_run(tmp_path, mnist_dir):
    """SIGTERM to each worker: each says bye and exits 0 with training far from over.  The launcher
    waited for ever; it now stops the server (which checkpoints), says so, and exits 1 with the
    --resume hint."""
    with pscnn_run(tmp_path, mnist_dir, "--workers", "2", "--train-limit", "20000", "--epochs", "5") \
            as (proc, endpoint):
        wait_until_training(endpoint, proc)
        os.kill(child_pid(endpoint, "worker-0"), signal.SIGTERM)
        # (asked before the last worker goes: the launcher then stops the server)
        assert_training_goes_on(query_status(endpoint, 5), "stopped worker-0")
        os.kill(child_pid(endpoint, "worker-1"), signal.SIGTERM)
        code, _, err = finish(proc)
    assert code == 1, err[-3000:]
    assert "pscnn run: every worker has exited before the end of training; stopping the server (it checkpoints)" \
        in err.splitlines(), err[-3000:]
    assert f"pscnn run: stopped. Continue with the same command plus --resume (run folder {tmp_path / 'run'})" \
        in err.splitlines(), err[-3000:]
    assert "Traceback" not in err
    assert (tmp_path / "run" / "checkpoint.npz").exists()
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_a_killed_server_is_named_with_its_signal_and_exit_1(tmp_path, mnist_dir):
    """kill -9 of the server: `pscnn run` exited with status 247 (its return code -9) and said
    "exited with -9".  It now names the signal, stops the clients, exits 1, and says that --resume
    continues from the checkpoint the server wrote."""
    with pscnn_run(tmp_path, mnist_dir, "--workers", "1", "--train-limit", "20000", "--epochs", "5",
                   "--checkpoint-every", "0.2") as (proc, endpoint):
        wait_until_training(endpoint, proc)
        # of an applied update: one written at the start barrier holds version 0, nothing to continue
        wait_for(lambda: checkpoint_version(str(tmp_path / "run")), 20, "a checkpoint of version 1 or later")
        os.kill(child_pid(endpoint, "server"), signal.SIGKILL)
        code, _, err = finish(proc)
    assert_training_had_not_finished((tmp_path / "run" / "logs" / "server.log").read_text(), "killed the server")
    assert code == 1, err[-3000:]
    assert "pscnn run: the server exited with -9 (killed by SIGKILL)" in err.splitlines(), err[-3000:]
    assert err.strip().splitlines()[-1] == \
        f"pscnn run: stopped. Continue with the same command plus --resume (run folder {tmp_path / 'run'})", err
    assert "Traceback" not in err


PR_SET_CHILD_SUBREAPER = 36             # <linux/prctl.h>


@contextmanager
def adopting_orphans(pids: dict[str, int]):
    """While in it, this process adopts the orphans of the processes it started (a child
    subreaper), so that it can read how they exited (:func:`exit_status`); at its end, those of
    ``pids`` (name -> pid, filled in by the caller) not reaped yet are killed and reaped."""
    import ctypes  # noqa: PLC0415
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def exit_status(pid: int, timeout: float = 10) -> int:
    """How an adopted orphan ``pid`` exited (waitstatus_to_exitcode: -15 for SIGTERM's default action)."""
    def reaped():
        done, status = os.waitpid(pid, os.WNOHANG)
        return (os.waitstatus_to_exitcode(status),) if done else None
    return wait_for(reaped, timeout, f"process {pid} to exit")[0]


@pytest.mark.slow
def test_the_children_stop_when_the_launcher_is_killed(tmp_path, mnist_dir):
    """kill -9 of `pscnn run` itself, which then cannot stop its children (each in its own
    session): they ran on, the server holding its port, with nobody to stop them.  The kernel now
    sends each SIGTERM (PR_SET_PDEATHSIG): the server checkpoints and stops, the worker and the
    evaluator say goodbye, every one of them exits 0, and the same command plus --resume continues.

    The kernel may send it several times (once per thread of the dying launcher): a repeat cut a
    goodbye short (no line in the log, once in ~30 runs) or killed a process at its exit (-15,
    one in three runs), until the first stop signal made the later ones ignored."""
    pids: dict[str, int] = {}
    with adopting_orphans(pids):
        with pscnn_run(tmp_path, mnist_dir, "--workers", "1", "--train-limit", "20000", "--epochs", "5") \
                as (proc, endpoint):
            wait_until_training(endpoint, proc)
            pids.update({name: child_pid(endpoint, name) for name in ("server", "worker-0", "evaluator")})
            proc.kill()
            wait_for(lambda: not processes_naming(endpoint), 30, "every child to stop",
                     on_fail=lambda: f"still running: {processes_naming(endpoint)} of {pids}")
        statuses = {name: exit_status(pid) for name, pid in pids.items()}
    logs = tmp_path / "run" / "logs"
    assert_training_had_not_finished((logs / "server.log").read_text(), "killed pscnn run")
    assert statuses == {"server": 0, "worker-0": 0, "evaluator": 0}, \
        (statuses, {name: (logs / f"{name}.log").read_text()[-1500:] for name in pids})
    server_log = (logs / "server.log").read_text()
    assert "interrupted: writing a checkpoint" in server_log, server_log[-3000:]
    assert (tmp_path / "run" / "checkpoint.npz").exists()
    for name in ("worker-0", "evaluator"):      # each has exited: its log is complete
        log_text = (logs / f"{name}.log").read_text()
        assert "stopped by a signal; saying goodbye to the server" in log_text, log_text[-2000:]


def test_a_repeated_stop_signal_cuts_no_goodbye_short_and_kills_nothing_at_exit():
    """A stop signal comes more than once when a launcher is killed outright (see above).  The
    repeat raised SystemExit again in the middle of the goodbye a client says on the first,
    and one at the very end, after Python restored the default handler, killed the process
    (-15).  Now the first stop is the only one: the goodbye is said, the process exits 0."""
    code = ("import os, signal, time\nfrom pscnn.cli import stop_on_signals\n"
            "stop_on_signals('worker')\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "except SystemExit:\n"
            "    os.kill(os.getpid(), signal.SIGHUP)       # the repeats, while saying goodbye\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.2)\n"
            "    print('goodbye said', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)           # and one more as it exits\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout == "goodbye said\n", done.stdout


@pytest.mark.parametrize("role", ["worker", "evaluator"])
def test_a_client_whose_stop_was_lost_while_it_loaded_exits_0_without_joining(role, mnist_file_names):
    """A stop signal while a worker or the evaluator loaded, whose exception was lost (raised in a
    weakref callback as a module loaded): it joined and worked on, deaf to every later stop (they
    are ignored once one came).  Now it leaves before it joins, as a stop then does: exit 0.  The
    server here is none: before, the client tried to reach it until --give-up-after (exit 1)."""
    from worker.evaluator import run_evaluator
    from worker.trainer import run_trainer
    lose_a_stop_signal(role)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    if role == "worker":
        assert run_trainer(endpoint, name="w0", give_up_after=1.0, compute_ms=1.0) == 0
    else:
        assert run_evaluator(endpoint, name="e0", give_up_after=1.0, nice=0) == 0


@pytest.mark.parametrize("role", ["worker", "evaluator"])
def test_a_client_whose_ctrl_c_was_lost_while_it_loaded_is_interrupted_without_joining(role, mnist_file_names):
    """A Ctrl-C, not a stop signal, lost as the client loaded: taken up, it is an interrupt (the CLI's
    130), not the stop signal's exit 0 that a supervisor would take for a clean stop."""
    from worker.evaluator import run_evaluator
    from worker.trainer import run_trainer
    lose_a_stop_signal(role, signal.SIGINT)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(KeyboardInterrupt):
        if role == "worker":
            run_trainer(endpoint, name="w0", give_up_after=1.0, compute_ms=1.0)
        else:
            run_evaluator(endpoint, name="e0", give_up_after=1.0, nice=0)


def test_a_worker_stopped_as_it_made_its_socket_exits_0_and_does_not_hang():
    """A stop signal's SystemExit raised while a worker made its first socket (inside pyzmq's
    Context.socket, or a monitor's), before the socket was stored: the socket stayed open, held by
    a frame of the exception's traceback, and the goodbye's ctx.term() waited for it forever (1 of
    25 workers SIGTERMed 0.02-0.6 s in hung until SIGKILL, later SIGTERMs being ignored).  The stop
    is raised here where it came, after the socket was made."""
    code = ("import logging, sys, zmq\nfrom worker.client import Client\nfrom worker.trainer import run_trainer\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "def stopped_with_a_socket_made(self, max_message_bytes):\n"
            "    sock = self.ctx.socket(zmq.DEALER)     # stored nowhere yet\n"
            "    raise SystemExit(0)                    # the stop signal's (pscnn.cli.stop_on_signals)\n"
            "Client._dealer = stopped_with_a_socket_made\n"
            f"sys.exit(run_trainer('tcp://127.0.0.1:{free_port()}', name='w0', give_up_after=5.0, compute_ms=1.0))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        out = "still running after 60 s"
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, out[-2000:]
    assert "stopped by a signal; the server had not answered our hello yet" in out, out[-2000:]


@pytest.mark.parametrize("role", ["worker", "evaluator"])
def test_a_client_whose_stop_was_lost_while_it_set_up_leaves_before_it_works(role, mnist_file_names, monkeypatch):
    """A stop lost after the client joined, while it built its model and loaded its data (the modules
    those load, a GPU's among them, load then): it leaves then, before its first request, as a stop
    then does (exit 0).  The server's welcome and the setup are stood in for; the first request
    after the setup fails the test."""
    from types import SimpleNamespace

    from worker import evaluator, trainer
    welcome = SimpleNamespace(body={"model": {}, "run": {}})
    monkeypatch.setattr(trainer.Client, "connect", lambda self: welcome)

    def requested(self, *args, **kwargs):
        raise AssertionError("the client worked on after its stop")
    monkeypatch.setattr(trainer.Client, "request", requested)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    if role == "worker":
        monkeypatch.setattr(trainer.Trainer, "setup", lambda self, welcome: lose_a_stop_signal(role))
        monkeypatch.setattr(trainer.Trainer, "work", lambda self: requested(self))
        assert trainer.run_trainer(endpoint, name="w0", give_up_after=1.0, compute_ms=1.0) == 0
    else:
        monkeypatch.setattr(evaluator, "model_from_welcome", lambda spec, device: None)
        monkeypatch.setattr(evaluator, "_test_set", lambda run, limit, mnist_dir: SimpleNamespace(x=None, y=None))
        monkeypatch.setattr(evaluator, "check_model_fits", lambda model, x, y: lose_a_stop_signal(role))
        assert evaluator.run_evaluator(endpoint, name="e0", give_up_after=1.0, nice=0) == 0


def test_a_child_whose_launcher_is_already_gone_stops_at_once(tmp_path):
    """A child started by a launcher that died before the child asked to follow it (its parent is
    no longer that pid) stops itself at once (SIGTERM) instead of running on unwatched; the
    variable is not passed on to processes it starts."""
    code = ("import os, time\nfrom pscnn.cli import stop_with_launcher\n"
            "stop_with_launcher()\nprint(os.environ.get('PSCNN_LAUNCHER_PID'), flush=True)\n"
            "time.sleep(30)\nprint('still running', flush=True)\n")
    def run_child(launcher_pid: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "PSCNN_LAUNCHER_PID": str(launcher_pid)}
        return subprocess.run([sys.executable, "-c", code.replace("time.sleep(30)", "time.sleep(30 if "
                               f"{launcher_pid} != os.getppid() else 0)")],
                              capture_output=True, text=True, timeout=60, env=env, check=False)
    gone = run_child(os.getpid() + 1_000_000)       # not its parent: the launcher is gone
    assert gone.returncode == -signal.SIGTERM, (gone.returncode, gone.stdout, gone.stderr)
    assert "still running" not in gone.stdout
    alive = run_child(os.getpid())                  # its parent: it runs on, the variable spent
    assert alive.returncode == 0, alive.stderr
    assert alive.stdout.split() == ["None", "still", "running"]


def test_a_local_cluster_tells_its_children_to_follow_it(tmp_path):
    """LocalCluster passes its own pid to every child it starts (what stop_with_launcher reads)."""
    with LocalCluster(tmp_path / "run") as cluster:
        assert cluster.env["PSCNN_LAUNCHER_PID"] == str(os.getpid())


@pytest.mark.parametrize("files", [None, ["test-images", "test-labels"]], ids=["no-folder", "test-set-only"])
def test_a_missing_mnist_folder_is_one_line_before_anything_starts(tmp_path, files, request):
    """--mnist-dir naming no folder: every child was started, and the user got three lines (the start
    line, "the server exited with 1; last lines of its log:", the reason).  Now `pscnn run` checks
    the MNIST folder as the server, the workers and the evaluator would, and says why on one line,
    starting nothing.  (A folder holding only the test set started them all: the workers died.)"""
    folder, port = tmp_path / "mnist", free_port()
    if files is None:
        expected = f"{folder}: MNIST folder does not exist or is not a folder"
    else:       # the server reads the test set at its start: the real one
        real = Path(request.getfixturevalue("mnist_dir"))
        folder.mkdir()
        for name in files:
            (folder / MNIST_FILES[name]["filename"]).symlink_to(real / MNIST_FILES[name]["filename"])
        expected = f"{folder}: MNIST folder lacks train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz"
    argv = [sys.executable, "-m", "pscnn.cli", "run", "--workers", "1", "--model", "light", "--mnist-dir", str(folder),
            "--out", str(tmp_path / "run"), "--port", str(port), "--no-progress"]
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    finally:
        leftovers = children_left_running(port)
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stderr.strip().splitlines() == [f"pscnn: error: {expected}"]
    assert not leftovers and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ a stop in the first moment

# Each command as a user starts it, and the exit status a stop signal ends it with (README: the server
# checkpoints and exits 0, a client says goodbye and exits 0; train and run stop as on Ctrl-C).
STOP_STATUS = {"server": 0, "worker": 0, "evaluator": 0, "train": 130, "run": 130}


def command_line(command: str, tmp_path: Path) -> list[str]:
    endpoint, out = f"tcp://127.0.0.1:{free_port()}", str(tmp_path / "out")
    return [sys.executable, "-m", "pscnn.cli", command, *{
        "server": ["--bind", endpoint, "--out", out],
        "worker": ["--server", endpoint], "evaluator": ["--server", endpoint],
        "train": ["--out", out, "--epochs", "1", "--train-limit", "64", "--no-progress"],
        "run": ["--out", out, "--workers", "1", "--port", endpoint.rsplit(":", 1)[1], "--no-progress"]}[command]]


def stoppable_env(tmp_path: Path, **more: str) -> dict:
    """The children's environment, any download cut off (a closed port): a stop that came late would
    end in an error line, not hang."""
    return {**launcher.child_env(), "PSCNN_CACHE_DIR": str(tmp_path / "cache"),
            "PSCNN_MNIST_MIRRORS": f"http://127.0.0.1:{free_port()}/", **more}


def assert_stopped_cleanly(proc: subprocess.Popen, command: str) -> None:
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == STOP_STATUS[command], f"{command} exited {proc.returncode}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]


# Put on a child's PYTHONPATH as sitecustomize.py: SIGTERM to itself as it first imports numpy, the first
# of its heavy imports, before MNIST is read or a socket opened.
SIGTERM_AT_NUMPY = '''
import importlib.abc, os, signal, sys


class SigtermAtImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, SigtermAtImport())
'''


@pytest.mark.parametrize("command", sorted(STOP_STATUS))
def test_a_stop_during_the_imports_is_a_clean_stop(command, tmp_path):
    """SIGTERM before a command had set its own handler (its first half second) killed it (-15),
    and in a container, as PID 1, it was ignored until Docker's SIGKILL: main() now handles the stop
    signals first of all, each command ending as a stop ends it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SIGTERM_AT_NUMPY)
    proc = subprocess.Popen(command_line(command, tmp_path), stderr=subprocess.PIPE, text=True,
                            env=stoppable_env(tmp_path, PYTHONPATH=str(hook)))
    assert_stopped_cleanly(proc, command)
    assert not (tmp_path / "out").exists()          # stopped before it started: nothing written


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (its SigCgt mask, bit 15 - 1)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:                                 # gone
        return True
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", sorted(STOP_STATUS))
def test_a_stop_as_soon_as_the_command_catches_one_is_a_clean_stop(command, tmp_path):
    """SIGTERM the moment a SIGTERM handler is there (before the command line is parsed): a stop
    noted before the command is known ends it as one that comes later does.  Repeated: the moment
    the poll sees varies."""
    for attempt in range(3):
        proc = subprocess.Popen(command_line(command, tmp_path / str(attempt)), stderr=subprocess.PIPE, text=True,
                                env=stoppable_env(tmp_path))
        try:
            wait_for(lambda: catches_sigterm(proc.pid), 60, f"{command} to catch SIGTERM", interval=0.001)
        except BaseException:
            proc.kill()
            proc.communicate(timeout=10)
            raise
        proc.send_signal(signal.SIGTERM)
        assert_stopped_cleanly(proc, command)
