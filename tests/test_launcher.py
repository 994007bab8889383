"""`pscnn run`'s launcher (pscnn.launcher) and the CLI helpers its children rely on, pinned on
stand-ins: what each child is started with, how the children are stopped, what the user is told,
and the exit codes.

Found by a mutation audit of pscnn/launcher.py and pscnn/cli.py: each test here fails when one
small change to the launcher (a dropped flag, a flipped check, a skipped kill) slips past the
rest of the suite.  Nothing here trains: the children are tiny ``python -c`` stand-ins (each
killed afterwards) or no processes at all, and nothing listens beyond 127.0.0.1.
"""
from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tqdm import tqdm

from cnn_core.checkpoint import save_checkpoint
from pscnn import cli, launcher
from pscnn.cli import CliError, main, parse_args
from pscnn.launcher import LocalCluster, RunOutputs
from worker.client import BadReply
from helpers import NoProcesses, StillRunning, error_line, lose_a_stop_signal, popen_taking_ctrl_c

SUMMARY = {"status": "complete", "mode": "sync", "workers": 1, "epochs": 1, "test_accuracy": 0.9, "test_loss": 0.3,
           "updates": 4, "samples_applied": 256, "train_images_per_second": 1000.0, "train_seconds": 0.3,
           "staleness": {"mean": 0.0, "max": 0}, "evaluations": []}


# ------------------------------------------------------------------------------ small helpers

def test_free_port_binds_loopback_and_returns_the_port_it_was_given(monkeypatch):
    """free_port asks the system for a port on 127.0.0.1 (port 0) and returns exactly that port."""
    calls = []

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def bind(self, address):
            calls.append(address)

        def getsockname(self):
            return ("127.0.0.1", 54321)
    monkeypatch.setattr(launcher.socket, "socket", FakeSocket)
    assert launcher.free_port() == 54321
    assert calls == [("127.0.0.1", 0)]


def test_free_port_is_bindable_on_loopback():
    """The port free_port returns can be bound on 127.0.0.1 right away."""
    port = launcher.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_wait_for_polls_past_falsy_values_and_returns_the_first_truthy_one():
    """wait_for waits for a truthy value: False, 0 and empty answers mean 'not yet'."""
    answers = iter([False, 0, "", [], {"ready": 1}])
    assert launcher.wait_for(lambda: next(answers), timeout=30, what="x", interval=0) == {"ready": 1}


def test_wait_for_names_what_it_waited_for_and_adds_the_on_fail_text():
    """On timeout: RuntimeError naming ``what``, with ``on_fail()``'s text (e.g. a log tail) below."""
    with pytest.raises(RuntimeError) as info:
        launcher.wait_for(lambda: None, timeout=0, what="the server", interval=0, on_fail=lambda: "LOG TAIL")
    assert "waiting for the server" in str(info.value)
    assert str(info.value).splitlines()[-1] == "LOG TAIL"


def test_child_env_makes_the_children_unbuffered_with_one_blas_thread_each(monkeypatch):
    """Each child's output reaches its log as it is written (PYTHONUNBUFFERED), and every BLAS
    library is pinned to the launcher's --threads (1 by default)."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    env = launcher.child_env()
    assert env["PYTHONUNBUFFERED"] == "1"
    assert [env[v] for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")] == ["1", "1", "1"]


def test_exit_text_names_the_signal_only_for_a_negative_code():
    """A negative exit code is a signal: named; a positive one is the child's own exit status."""
    assert launcher.exit_text("worker-0", -signal.SIGKILL) == "worker-0 exited with -9 (killed by SIGKILL)"
    assert launcher.exit_text("worker-0", 9) == "worker-0 exited with 9"
    assert launcher.exit_text("worker-0", None) == "worker-0 exited with None"


def test_say_survives_a_terminal_that_is_gone(monkeypatch):
    """After SIGHUP the terminal may be gone: a message that cannot be written (EIO) is dropped,
    not raised in the middle of the shutdown."""
    class GoneTerminal:
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(sys, "stderr", GoneTerminal())
    launcher._say("pscnn run: interrupted")             # no exception


def test_sighup_stops_pscnn_run_as_ctrl_c_does():
    """SIGHUP (the terminal closed) and SIGTERM (kill) are the launcher's stop signals."""
    assert set(launcher.STOP_SIGNALS) == {signal.SIGTERM, signal.SIGHUP}


# ------------------------------------------------------------------------------ LocalCluster

class FakePopen:
    """subprocess.Popen's stand-in: records how a child would have been started."""

    started: list = []

    def __init__(self, argv, **kwargs):
        self.argv, self.kwargs, self.returncode = argv, kwargs, 0
        FakePopen.started.append(self)

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        return self.returncode


def test_a_local_cluster_starts_each_child_in_its_own_session_following_the_launcher(tmp_path, monkeypatch):
    """Each child is `python -m pscnn ...`, in a session of its own (Ctrl-C in the terminal
    reaches the launcher alone, which stops the server first), with the launcher's pid to follow
    and its output in logs/<name>.log."""
    FakePopen.started = []
    monkeypatch.setattr(launcher.subprocess, "Popen", FakePopen)
    with LocalCluster(tmp_path / "run") as cluster:
        cluster.start_server(["--mode", "sync"])
    [child] = FakePopen.started
    assert child.argv[:3] == [sys.executable, "-m", "pscnn"]
    # port 0: the server binds a free one itself, and writes which to its --endpoint-file
    assert child.argv[3:7] == ["server", "--bind", "tcp://127.0.0.1:0",
                               f"--endpoint-file={tmp_path / 'run' / 'logs' / 'server.endpoint'}"]
    assert child.kwargs["start_new_session"] is True
    assert child.kwargs["env"]["PSCNN_LAUNCHER_PID"] == str(os.getpid())
    assert child.kwargs["stdout"].name == str(tmp_path / "run" / "logs" / "server.log")


def test_a_server_start_does_not_take_an_earlier_starts_endpoint_file_for_its_own(tmp_path, monkeypatch):
    """An endpoint file left by an earlier start (a server killed before the launcher read it) names a port
    that server had: read as this start's, it sent the clients there.  This start's server exits before it
    listens (FakePopen's exit status 0, at once): no endpoint is known, not the earlier one."""
    FakePopen.started = []
    monkeypatch.setattr(launcher.subprocess, "Popen", FakePopen)
    stale = tmp_path / "run" / "logs" / "server.endpoint"
    stale.parent.mkdir(parents=True)
    stale.write_text("tcp://127.0.0.1:4242\n")
    with LocalCluster(tmp_path / "run") as cluster:
        cluster.start_server([])
        assert (cluster.port, cluster.endpoint) == (None, None)
        assert cluster.status() is None
    assert not stale.exists()


def earlier_server_log(tmp_path, monkeypatch):
    """server.log of a run folder whose earlier server left a line in it; children started by FakePopen."""
    FakePopen.started = []
    monkeypatch.setattr(launcher.subprocess, "Popen", FakePopen)
    log = tmp_path / "run" / "logs" / "server.log"
    log.parent.mkdir(parents=True)
    log.write_text("the earlier server's last words\n")
    return log


def test_a_restarted_child_appends_to_its_log(tmp_path, monkeypatch):
    """A child started again under the same name (a server killed and resumed) adds to its log:
    what the earlier one wrote, e.g. why it failed, stays."""
    log = earlier_server_log(tmp_path, monkeypatch)
    with LocalCluster(tmp_path / "run") as cluster:
        cluster.start_server([])
        cluster.start_server([])
    lines = log.read_text().splitlines()
    assert lines[0] == "the earlier server's last words"
    # each start is marked: the lines of one run (its pid) were not told from an earlier run's
    assert [re.sub(r"\d", "0", line) for line in lines[1:]] == \
        ["==== 0000-00-00 00:00:00 UTC: server started (pscnn server) ===="] * 2
    # what pscnn run quotes when the child fails: its own lines, not the earlier run's nor the marks
    assert cluster.log_tail("server") == ""
    with log.open("a") as fh:
        fh.write("this server's last words\n")
    assert cluster.log_tail("server") == "this server's last words"


def test_a_childs_log_tail_is_read_from_its_end(tmp_path, monkeypatch):
    """A long run's server log (a line per rejected push) was read whole for its last 20 lines:
    2.5 s and over 1 GB of memory for 209 MB.  Now only blocks from its end are read, and the lines
    are those of a whole read, a multi-byte character across a block's edge and all."""
    log = earlier_server_log(tmp_path, monkeypatch)
    with LocalCluster(tmp_path / "run") as cluster:
        cluster.start_server([])
    start = log.stat().st_size
    with log.open("a", encoding="utf-8") as fh:
        fh.writelines(f"line {i}: rejected push from wörker-{i % 7}\r\n" for i in range(20_000))
        fh.write("pscnn server: cannot write the run's outputs")         # no line end
    read = [0]

    class Counted(io.FileIO):
        def read(self, size=-1):
            data = super().read(size)
            read[0] += len(data)
            return data
    monkeypatch.setattr(launcher, "open", lambda path, mode: Counted(path, "r"), raising=False)
    whole = log.read_bytes()[start:].decode(errors="replace")
    size = log.stat().st_size - start
    for lines, block in ((20, launcher.LOG_TAIL_BLOCK), (3, 7), (1, 1), (25_000, 4096)):
        monkeypatch.setattr(launcher, "LOG_TAIL_BLOCK", block)
        read[0] = 0
        assert cluster.log_tail("server", lines) == "\n".join(whole.splitlines()[-lines:])
        assert read[0] < size or lines > 20_000
    assert cluster.log_tail("server", 1) == "pscnn server: cannot write the run's outputs"


# A stand-in child: on SIGTERM it takes STOP_S seconds (as a server writing its checkpoint), then
# exits 0; it says "ready" once its handler is set, and runs 60 s at most.
SLOW_TO_STOP = """
import signal, sys, time
def stop(*_):
    time.sleep(float(sys.argv[1]))
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
for _ in range(600):
    time.sleep(0.1)
sys.exit(3)
"""


def kill_left(cluster: LocalCluster) -> None:
    """SIGKILL whatever of ``cluster``'s children still runs (should close() fail to)."""
    for proc in cluster.procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def add_child(cluster: LocalCluster, name: str, stop_s: float = 0.0) -> subprocess.Popen:
    """A SLOW_TO_STOP stand-in as ``cluster``'s child ``name``, once its SIGTERM handler is set."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TO_STOP, str(stop_s)], stdout=subprocess.PIPE,
                            start_new_session=True)
    cluster.procs[name] = proc
    assert proc.stdout.readline() == b"ready\n"
    proc.stdout.close()
    return proc


def test_stop_all_stops_every_child_of_each_group(tmp_path):
    """stop_all sends SIGTERM to every child whose name has the prefix, all of them, not only
    the first worker; each exits by itself (0), none is killed."""
    with LocalCluster(tmp_path / "run") as cluster:
        for name in ("server", "worker-0", "worker-1", "worker-2", "evaluator"):
            add_child(cluster, name)
        killed = []
        codes = cluster.stop_all(grace=30, on_kill=killed.append)
    assert codes == {"server": 0, "worker-0": 0, "worker-1": 0, "worker-2": 0, "evaluator": 0}
    assert killed == []


def test_stop_all_gives_a_child_its_grace_period_before_killing_it(tmp_path):
    """A child that needs a moment after SIGTERM (the server writes its checkpoint) is waited for
    up to ``grace`` seconds and exits by itself, not SIGKILLed at once."""
    with LocalCluster(tmp_path / "run") as cluster:
        add_child(cluster, "server", stop_s=1.0)
        killed = []
        codes = cluster.stop_all(grace=30, on_kill=killed.append)
    assert codes == {"server": 0}
    assert killed == []


def test_stop_all_continues_a_stopped_child_so_that_it_stops_by_itself(tmp_path):
    """A child stopped (SIGSTOP) when the run is stopped, e.g. Ctrl-C on a run whose server the user
    had paused: SIGTERM stayed pending, and after the grace period it was killed (a server without
    its checkpoint).  It is continued, handles SIGTERM and exits 0."""
    with LocalCluster(tmp_path / "run") as cluster:
        proc = add_child(cluster, "server")
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            killed = []
            codes = cluster.stop_all(grace=5, on_kill=killed.append)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
    assert codes == {"server": 0} and killed == []


def test_close_kills_every_child_still_running(tmp_path):
    """Leaving a LocalCluster (its with block, or close()) kills what is still running."""
    cluster = LocalCluster(tmp_path / "run")
    try:
        proc = add_child(cluster, "worker-0")
        cluster.close()
        assert proc.poll() == -signal.SIGKILL
    finally:
        kill_left(cluster)


# ------------------------------------------------------------------------------ RunOutputs

def touch(path: Path, after: Path | None = None, summary: dict | None = None) -> None:
    """Write ``path`` (a checkpoint or summary.json: ``summary``, by default SUMMARY); newer than
    ``after`` by a millisecond."""
    path.write_text(json.dumps(summary or SUMMARY) if path.name == "summary.json" else "checkpoint")
    if after is not None:
        later = after.stat().st_mtime_ns + 1_000_000
        os.utime(path, ns=(later, later))


def test_an_earlier_runs_summary_is_not_this_runs_end(tmp_path):
    """A folder holding a finished run (checkpoint, then summary.json) that is started over and
    stopped before its first checkpoint: this run did not finish (the 130 path), nor is there a
    checkpoint of it to resume."""
    out = tmp_path / "run"
    out.mkdir()
    touch(out / "checkpoint.npz")
    touch(out / "summary.json", after=out / "checkpoint.npz")
    outputs = RunOutputs(out, resume=False)
    assert not outputs.finished()
    assert outputs.resume_hint() is None


def test_a_summary_older_than_the_last_checkpoint_is_no_end(tmp_path):
    """This run wrote summary.json, but its server wrote a checkpoint after it: a run that goes on
    (its summary is always its last output), so not finished, and --resume continues it."""
    out = tmp_path / "run"
    out.mkdir()
    outputs = RunOutputs(out, resume=False)
    touch(out / "summary.json")
    touch(out / "checkpoint.npz", after=out / "summary.json")
    assert not outputs.finished()
    assert outputs.resume_hint() is not None


def test_a_resumed_run_stopped_before_its_next_checkpoint_can_be_resumed_again(tmp_path):
    """With --resume, the checkpoint it started from is still one to continue from."""
    out = tmp_path / "run"
    out.mkdir()
    touch(out / "checkpoint.npz")
    outputs = RunOutputs(out, resume=True)
    assert outputs.resume_hint() == \
        f"pscnn run: stopped. Continue with the same command plus --resume (run folder {out})"


def test_a_finished_run_gets_no_resume_hint(tmp_path):
    """Checkpoint then summary.json, both of this run: the run is over; nothing to continue."""
    out = tmp_path / "run"
    out.mkdir()
    outputs = RunOutputs(out, resume=False)
    touch(out / "checkpoint.npz")
    touch(out / "summary.json", after=out / "checkpoint.npz")
    assert outputs.finished()
    assert outputs.resume_hint() is None


# ------------------------------------------------------------------------------ run_from_args, in process

class RecordingCluster:
    """LocalCluster's surface for run_from_args, starting nothing: records what would be started,
    each stop_all's order, and answers ``wait`` from ``codes``.  ``hooks`` ``on_wait`` and
    ``on_stop``, when given, run in ``wait`` and ``stop_all`` (e.g. a signal to this process)."""

    made: list = []
    codes: dict = {}
    hooks: dict = {}

    def __init__(self, out, port=None, threads=1, keys=None, peer_timeout=None):
        self.out, self.logs, self.endpoint, self.keys = Path(out), Path(out) / "logs", "tcp://127.0.0.1:1", keys
        self.peer_timeout = peer_timeout
        self.procs, self.started, self.stops = {}, {}, []
        self.on_wait, self.on_stop = self.hooks.get("on_wait"), self.hooks.get("on_stop")
        RecordingCluster.made.append(self)

    def start_server(self, flags, name="server"):
        self.started[name] = list(flags)
        self.procs[name] = None
        return StillRunning()

    def start_worker(self, name, flags=()):
        self.started[name] = list(flags)
        self.procs[name] = None

    def start_evaluator(self, flags=(), name="evaluator"):
        self.started[name] = list(flags)
        self.procs[name] = None

    def wait(self, name, timeout):
        if self.on_wait:
            self.on_wait()
        return self.codes.get(name, 0)

    def log_tail(self, name, lines=20):
        return ""

    def stop_all(self, grace=10.0, order=("worker", "evaluator", "server"), on_kill=None):
        self.stops.append(tuple(order))
        if self.on_stop:
            self.on_stop()
            time.sleep(0.2)                 # the signal is handled in here
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def flag_value(flags: list[str], flag: str) -> str | None:
    """The value a child's command line gives ``flag``, as ``--flag VALUE`` or ``--flag=VALUE``; None if none."""
    for i, word in enumerate(flags):
        if word == flag:
            return flags[i + 1]
        if word.startswith(flag + "="):
            return word[len(flag) + 1:]
    return None


@pytest.fixture
def run_in_process(tmp_path, monkeypatch):
    """`pscnn run ARGV` through main(), on a RecordingCluster; ``follow`` stands for _follow
    (default: writes a finished run's outputs and returns 0).  Returns (code, cluster)."""
    for name in ("made", "codes", "hooks"):       # restored after the test: no hook outlives it
        monkeypatch.setattr(RecordingCluster, name, [] if name == "made" else {})
    monkeypatch.setattr(launcher, "LocalCluster", RecordingCluster)
    monkeypatch.setattr(launcher, "check_local_setup", lambda *a, **kw: None)
    out = tmp_path / "run"

    def finished(cluster, bar):
        out.mkdir(exist_ok=True)
        touch(out / "checkpoint.npz")
        touch(out / "summary.json", after=out / "checkpoint.npz")
        return 0

    def run(*argv, follow=finished, codes=None, **hooks):
        RecordingCluster.codes, RecordingCluster.hooks = codes or {}, hooks
        monkeypatch.setattr(launcher, "_follow", follow)
        code = main(["run", "--model", "light", "--out", str(out), "--no-progress", *argv])
        return code, (RecordingCluster.made[0] if RecordingCluster.made else None)
    return run


def test_pscnn_run_hands_its_settings_to_the_children(run_in_process, tmp_path):
    """The server waits for every worker (--wait-for-workers = --workers: they start together);
    the workers get --overlap and the MNIST folder; the evaluator its --test-limit, --every and
    the MNIST folder."""
    code, cluster = run_in_process("--workers", "3", "--overlap", "--mode", "async", "--test-limit", "500",
                                   "--eval-every", "7", "--mnist-dir", str(tmp_path))
    assert code == 0
    assert set(cluster.started) == {"server", "worker-0", "worker-1", "worker-2", "evaluator"}
    assert flag_value(cluster.started["server"], "--wait-for-workers") == "3"
    for name in ("worker-0", "worker-1", "worker-2"):
        assert "--overlap" in cluster.started[name]
        assert flag_value(cluster.started[name], "--mnist-dir") == str(tmp_path)
    evaluator = cluster.started["evaluator"]
    assert flag_value(evaluator, "--test-limit") == "500" and flag_value(evaluator, "--every") == "7.0"
    assert flag_value(evaluator, "--mnist-dir") == str(tmp_path)


def test_pscnn_run_without_an_evaluator_has_the_server_score_at_once(run_in_process):
    """--no-evaluator: no evaluator is started, and the server waits 0 s for a final report
    that none will send (else it would wait --final-eval-timeout, 120 s by default)."""
    code, cluster = run_in_process("--workers", "1", "--no-evaluator")
    assert code == 0
    assert "evaluator" not in cluster.started
    assert float(flag_value(cluster.started["server"], "--final-eval-timeout")) == 0.0


def test_pscnn_run_refuses_an_eval_every_that_no_evaluator_would_take(run_in_process, capsys):
    """--eval-every with --no-evaluator was dropped without a word; without it the evaluator
    keeps its own default period."""
    code, cluster = run_in_process("--workers", "1", "--no-evaluator", "--eval-every", "5")
    assert code == 2 and cluster is None
    assert "--eval-every sets the evaluator's period, and --no-evaluator starts none" in capsys.readouterr().err
    code, cluster = run_in_process("--workers", "1")
    assert code == 0 and flag_value(cluster.started["evaluator"], "--every") is None


def test_pscnn_run_refuses_a_final_eval_timeout_that_no_evaluator_would_use(run_in_process, capsys):
    """--final-eval-timeout with --no-evaluator was replaced by 0 without a word."""
    code, cluster = run_in_process("--workers", "1", "--no-evaluator", "--final-eval-timeout", "30")
    assert code == 2 and cluster is None
    assert ("--final-eval-timeout waits for the evaluator's final report, and --no-evaluator starts none"
            in capsys.readouterr().err)


@pytest.mark.parametrize("flags,given", [([], None), (["--final-eval-timeout", "30"], "30.0")])
def test_pscnn_run_hands_the_final_eval_timeout_given_to_the_server(run_in_process, flags, given):
    """With an evaluator the value given reaches the server; none given, the server keeps its default."""
    code, cluster = run_in_process("--workers", "1", *flags)
    assert code == 0 and flag_value(cluster.started["server"], "--final-eval-timeout") == given


def test_a_client_that_exited_with_an_error_at_the_end_makes_the_run_exit_1(run_in_process, capsys):
    """The server finished the run (report printed), but worker-0 exited 1: the launcher names it
    and exits 1."""
    code, _ = run_in_process("--workers", "2", codes={"worker-0": 1})
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "pscnn run: worker-0 exited with 1" in captured.err
    assert "run finished: mode" in captured.out


def test_a_trainer_the_server_dropped_is_named_but_does_not_fail_a_finished_run(run_in_process, capsys):
    """worker-1 exited 3 (the server dropped it for NaN or Inf pushes) and the others finished the
    run: the launcher names it, the report counts it, and the run exits 0.  Any other failure
    still makes it 1."""
    code, _ = run_in_process("--workers", "2", codes={"worker-1": 3})
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "pscnn run: worker-1 exited with 3" in captured.err
    assert "run finished: mode" in captured.out
    code, _ = run_in_process("--workers", "2", codes={"worker-1": 3, "worker-0": 1})
    assert code == 1


def test_the_bar_ends_on_the_runs_final_figures(run_in_process, tmp_path):
    """The server ends the run between two status polls: the bar was closed as last seen, 7 of 40
    batches and the accuracy before the final evaluation, above a report saying 0.9."""
    bars = []

    def follow(cluster, bar):
        bar.total, bar.n = 40, 7
        bar.set_description("test acc 0.1380", refresh=False)
        bars.append(bar)
        write_run_outputs(tmp_path / "run", summary=SUMMARY)
        return 0
    code, _ = run_in_process(follow=follow)
    assert code == 0
    assert bars[0].n == 40
    assert bars[0].desc.startswith("test acc 0.9000 at update 4")      # SUMMARY's final weights


def test_the_bar_shows_the_servers_rate_alone(run_in_process, monkeypatch):
    """tqdm's own rate (batches over the time since the bar started, start-up and the final
    evaluation included) sat beside the server's images/s and disagreed with it: make run showed
    29.07 batch/s (1,860 images/s) next to 1,418 img/s.  And the count it shows is named: a sync
    run's 200/200, beside "at update 100", read as its updates."""
    import tqdm as tqdm_module
    made = []

    def recording_tqdm(*args, **kwargs):
        made.append(kwargs)
        return real_tqdm(*args, **kwargs)
    real_tqdm = tqdm_module.tqdm
    monkeypatch.setattr(tqdm_module, "tqdm", recording_tqdm)
    code, _ = run_in_process()
    assert code == 0 and len(made) == 1
    shown = io.StringIO()
    bar = real_tqdm(**{**made[0], "disable": False, "file": shown})     # the run's bar, drawn
    bar.total = 40
    bar.update(7)
    bar.set_postfix_str("epoch 1/3, 1418 img/s, loss 0.3", refresh=True)
    bar.close()
    assert "7/40 batches [" in shown.getvalue() and "epoch 1/3, 1418 img/s" in shown.getvalue()
    assert "batch/s" not in shown.getvalue() and "it/s" not in shown.getvalue()


def test_an_unusable_logs_folder_or_log_file_is_one_line(tmp_path):
    """OUT/logs a file: "OUT/logs: cannot write: File exists"; OUT/logs/server.log a folder: a traceback."""
    from cnn_core.runlog import RunLogError
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "logs").write_text("x")
    with pytest.raises(RunLogError) as exc:
        LocalCluster(tmp_path / "a")
    assert str(exc.value) == f"{tmp_path / 'a' / 'logs'}: is a file, not a folder"
    (tmp_path / "b" / "logs" / "server.log").mkdir(parents=True)
    with LocalCluster(tmp_path / "b") as cluster:
        with pytest.raises(RunLogError) as exc:
            cluster.start_server(["--model", "light"])
        assert not cluster.procs                    # nothing was started
    assert str(exc.value) == f"{tmp_path / 'b' / 'logs' / 'server.log'}: cannot write: Is a directory"


TINY_RUN = ["--workers", "1", "--model", "light", "--train-limit", "128", "--test-limit", "64", "--epochs", "1",
            "--no-progress"]


def test_pscnn_run_is_not_failed_by_a_port_taken_after_it_was_found_free(tmp_path, monkeypatch, capsys, mnist_dir):
    """free_port() finds a port free, and another process may take it before the server, started a
    second later, binds it: pscnn run failed, "cannot bind tcp://127.0.0.1:P: Address already in use"
    and "once what is reported above is fixed, the same command starts the run" (with nothing to fix),
    and its clients, started with the server, had joined whatever took the port (another pscnn run's
    server: its evaluator's score went into that run's metrics.jsonl).  Here every port found free is
    taken at once; the server binds a free port itself, and the clients go where it listens."""
    taken = []

    def taken_at_once():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        holder = socket.socket()
        holder.bind(("127.0.0.1", port))
        holder.listen()
        taken.append(holder)
        return port
    monkeypatch.setattr(launcher, "free_port", taken_at_once)
    out = tmp_path / "run"
    try:
        code = main(["run", *TINY_RUN, "--mnist-dir", mnist_dir, "--out", str(out)])
    finally:
        for holder in taken:
            holder.close()
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Address already in use" not in err
    endpoint = re.search(r"pscnn run: server on (tcp://127\.0\.0\.1:\d+),", err).group(1)
    assert endpoint != "tcp://127.0.0.1:0"
    # the address it listened on, as config.json documents it: not the port 0 it was told to bind
    assert json.loads((out / "config.json").read_text())["server"]["bind"] == endpoint
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["evaluator.log", "server.log", "worker-0.log"]


def test_a_server_that_could_not_bind_its_port_gets_no_clients(tmp_path, monkeypatch, capsys, mnist_dir):
    """--port P was found free (check_port_free) and taken before the server bound it: the workers and
    the evaluator, started with the server, joined whatever took it (another pscnn server's run).  They
    start once their server listens now: here never, and the run ends on the server's line."""
    monkeypatch.setattr(launcher, "check_port_free", lambda endpoint: None)     # free when checked
    out = tmp_path / "run"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = main(["run", *TINY_RUN, "--port", str(port), "--mnist-dir", mnist_dir, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"pscnn run: the server exited with 1: cannot bind tcp://127.0.0.1:{port}: Address already in use" in err
    assert "server on" not in err
    assert [p.name for p in (out / "logs").iterdir()] == ["server.log"]         # no client was started


def test_a_server_that_cannot_write_its_endpoint_file_says_so_and_leaves_its_folder_alone(tmp_path, capsys):
    folder, out = tmp_path / "a-folder", tmp_path / "run"
    folder.mkdir()
    assert main(["server", "--bind", "tcp://127.0.0.1:0", "--endpoint-file", str(folder), "--model", "light",
                 "--out", str(out)]) == 1
    error_line(capsys.readouterr().err, f"--endpoint-file {folder}: cannot write: Is a directory", alone=True)
    assert not out.exists() and not list(folder.iterdir())


@pytest.mark.parametrize("workers,max_workers,refused", [(2, 1, True), (2, 2, False)])
def test_run_refuses_more_workers_than_the_server_admits(workers, max_workers, refused):
    """--workers above --max-workers is refused before anything starts; equal is fine."""
    args = parse_args(["run", "--model", "light", "--workers", str(workers), "--max-workers", str(max_workers)])
    if refused:
        with pytest.raises(CliError, match=f"--workers {workers} exceeds --max-workers {max_workers}"):
            launcher.check_run_args(args)
    else:
        launcher.check_run_args(args)


@pytest.mark.parametrize("workers,train_limit,refused", [
    ("11", "640", "the 10 batches of an epoch (640 training images, --batch-size 64): a worker computes one batch "
                  "at a time, so 1 of them would have none"),
    ("2000", "0", "the 938 batches of an epoch (60,000 training images, --batch-size 64): a worker computes one "
                  "batch at a time, so 1,062 of them would have none"),
    ("10", "640", None)])
def test_run_refuses_more_workers_than_an_epoch_has_batches(workers, train_limit, refused):
    """10 batches an epoch and 20 workers: 10 never computed in sync mode, and the report said
    "10 workers" for a run asked to use 20; now one line before anything starts."""
    args = parse_args(["run", "--model", "light", "--workers", workers, "--max-workers", "2000",
                       "--train-limit", train_limit])
    if refused:
        with pytest.raises(CliError, match=re.escape(f"--workers {workers} exceeds {refused}")):
            launcher.check_run_args(args)
    else:
        launcher.check_run_args(args)


@pytest.mark.parametrize("wait_for,refused", [("3", True), ("2", False), ("1", False)])
def test_run_refuses_a_start_barrier_for_more_workers_than_it_starts(wait_for, refused):
    """`pscnn run --workers 2 --wait-for-workers 3` handed out no work for --start-timeout (60 s),
    then trained with the 2 it had started."""
    args = parse_args(["run", "--model", "light", "--workers", "2", "--wait-for-workers", wait_for])
    if refused:
        with pytest.raises(CliError, match=re.escape(
                "--wait-for-workers 3 exceeds --workers 2: the run's workers would wait --start-timeout for "
                "trainers it never starts")):
            launcher.check_run_args(args)
    else:
        launcher.check_run_args(args)


def test_run_refuses_a_start_barrier_the_server_could_never_lift():
    """--wait-for-workers above --max-workers: one line from `pscnn run` itself (exit 2)."""
    args = parse_args(["run", "--model", "light", "--workers", "1", "--wait-for-workers", "3", "--max-workers", "2"])
    with pytest.raises(CliError, match="--wait-for-workers 3 exceeds --max-workers 2"):
        launcher.check_run_args(args)


@pytest.mark.parametrize("mode,refused", [("sync", True), ("ssp", True), ("async", False)])
def test_run_refuses_overlap_outside_async_mode(mode, refused):
    """--overlap with --mode sync or ssp: the workers only warned in their logs and ran without it."""
    args = parse_args(["run", "--model", "light", "--overlap", "--mode", mode])
    if refused:
        with pytest.raises(CliError, match=f"--overlap applies to --mode async only, not to --mode {mode}"):
            launcher.check_run_args(args)
    else:
        launcher.check_run_args(args)


def test_run_on_a_taken_port_is_one_line_before_anything_starts(run_in_process, capsys):
    """--port naming a port in use: exit 1 with one line, and no cluster is made (no child started
    to join whatever listens there)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, cluster = run_in_process("--workers", "1", "--port", str(port))
    err = capsys.readouterr().err
    assert code == 1, err
    assert cluster is None
    assert f"cannot bind tcp://127.0.0.1:{port}" in err and "another pscnn server or run" in err


def test_an_interrupted_run_stops_the_server_first(run_in_process):
    """Ctrl-C: the server is stopped first (its checkpoint then holds whole sync rounds), then the
    workers and the evaluator."""
    def interrupted(cluster, bar):
        raise KeyboardInterrupt
    code, cluster = run_in_process("--workers", "1", follow=interrupted)
    assert code == 130
    assert cluster.stops == [("server", "worker", "evaluator")]


def readme_bullet(start: str, heading: str = "Stopping and resuming") -> str:
    """The bullet of README's section ``heading`` that starts with ``start``, on one line."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    (bullet,) = [" ".join(b.split()) for b in section.split("\n* ") if b.startswith(start)]
    return bullet


def test_the_readme_gives_the_exit_status_of_an_interrupted_run_and_train():
    """Both exit 130 on Ctrl-C (above, and main's): README's "Stopping and resuming" gave neither's."""
    run = readme_bullet("Ctrl-C on `pscnn run`")
    assert "exits with status 130" in run, run
    train = readme_bullet("Ctrl-C (SIGTERM, SIGHUP) on `pscnn train`")
    assert "(exit status 130)" in train, train


def test_the_readme_says_who_scores_a_resumed_finished_runs_final_weights():
    """pscnn run starts an evaluator for them (_run: not with --no-evaluator, nor when the checkpoint
    holds their score): README said the server scored them."""
    resume = readme_bullet("The same command with `--resume`")
    assert "An evaluator scores the final weights first (the server itself with `--no-evaluator`)" in resume, resume
    checkpoints = readme_bullet("`--resume` of a run that had finished", heading="Checkpoints")
    assert "starts no client" not in checkpoints and "an evaluator only for final weights not scored yet" \
        in checkpoints, checkpoints


def test_a_server_that_exits_0_before_the_end_of_the_run_is_a_run_stopped_early(run_in_process, capsys):
    """A server stopped by a SIGTERM from outside pscnn run checkpoints and exits 0, with no summary:
    the launcher waited --peer-timeout + 10 s for clients that wait for the server to come back,
    then said "no summary" (and exited 0 when they had exited 0).  It is a run stopped early."""
    def stopped_from_outside(cluster, bar):
        write_run_outputs(cluster.out)              # a checkpoint, no summary.json
        return 0
    code, cluster = run_in_process("--workers", "1", follow=stopped_from_outside)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "pscnn run: the server exited with 0 before the end of the run" in err
    assert f"Continue with the same command plus --resume (run folder {cluster.out})" in err
    assert "no summary" not in err
    assert cluster.stops == [("worker", "evaluator", "server")]      # at once, not after a wait


def test_a_run_ended_early_stops_the_children_left(tmp_path, capsys):
    """The server exited with an error: _ended_early stops what is still running (the clients)."""
    cluster = RecordingCluster(tmp_path / "run")
    outputs = RunOutputs(tmp_path / "run", resume=False)
    assert launcher._ended_early(cluster, outputs, 3) == 3
    assert len(cluster.stops) == 1


def write_run_outputs(out: Path, summary: dict | None = None) -> None:
    """What a server leaves in run folder ``out``: its checkpoint, then (a run it ended) summary.json."""
    out.mkdir(exist_ok=True)
    touch(out / "checkpoint.npz")
    if summary is not None:
        touch(out / "summary.json", after=out / "checkpoint.npz", summary=summary)


def test_the_run_report_gives_accuracies_as_pscnn_train_does(tmp_path, capsys):
    """pscnn run's report said "test accuracy 0.6000" and "3:0.000" for a class with no test image
    (--test-limit 5), where pscnn train's says "60.00%" and "3: n/a", and its own time-to-accuracy
    line, the plots and the docs give percent."""
    from cnn_core.training import format_report
    per_class = [1.0, 0.5] + [0.0] * 8
    matrix = [[0] * 10 for _ in range(10)]
    matrix[0][0], matrix[1][1], matrix[1][2], matrix[2][3] = 1, 1, 1, 1      # classes 3-9: no test image
    summary = {**SUMMARY, "test_accuracy": 0.6, "per_class_accuracy": per_class, "confusion_matrix": matrix}
    launcher._print_report(summary, tmp_path / "summary.json")
    out = capsys.readouterr().out.splitlines()
    expected = "0: 100.0%  1: 50.0%  2: 0.0%  3: n/a  4: n/a  5: n/a  6: n/a  7: n/a  8: n/a  9: n/a"
    assert "  test accuracy      60.00%" in out
    assert f"  per-class accuracy {expected}" in out
    assert f"per-class accuracy: {expected}" in format_report(summary).splitlines()     # the same words


@pytest.mark.parametrize("status", ["complete", "diverged"])
def test_a_run_stopped_after_the_server_ended_it_still_gets_its_report(tmp_path, capsys, status):
    """_follow stopped the run (a failed evaluator), but the server had finished it all the same,
    or it ended diverged (exit 1): the launcher prints the report from summary.json, not a
    --resume hint for a run that is over, and exits 1 either way."""
    cluster = RecordingCluster(tmp_path / "run")
    outputs = RunOutputs(cluster.out, resume=False)
    error = "training diverged: the last 3 pushes, from worker-0, were not finite" if status == "diverged" else None
    write_run_outputs(cluster.out, summary={**SUMMARY, "status": status, "error": error})
    assert launcher._ended_early(cluster, outputs, 1) == 1
    captured = capsys.readouterr()
    assert "pscnn run: the server had ended the run (summary.json written); its report follows" in captured.err
    assert "--resume" not in captured.err
    # a diverged run's heading said "run finished", above "status diverged: training diverged: ..."
    heading = "run stopped" if status == "diverged" else "run finished"
    assert f"{heading}: mode sync, 1 worker, 1 epoch" in captured.out
    assert "test accuracy      90.00%" in captured.out
    assert ("  why                training diverged: the last 3 pushes" in captured.out) == (status == "diverged")
    assert "diverged: training diverged" not in captured.out


@pytest.mark.parametrize("server_code, expected", [(1, 1), (-signal.SIGKILL, 1), (3, 3)])
def test_a_run_stopped_before_its_end_says_how_to_continue(tmp_path, capsys, server_code, expected):
    """Stopped (or the server failed) after a checkpoint and before a summary: the --resume hint,
    no report; the server's own exit code, or 1 for a server killed by a signal."""
    cluster = RecordingCluster(tmp_path / "run")
    outputs = RunOutputs(cluster.out, resume=False)
    write_run_outputs(cluster.out)
    assert launcher._ended_early(cluster, outputs, server_code) == expected
    captured = capsys.readouterr()
    assert f"Continue with the same command plus --resume (run folder {cluster.out})" in captured.err
    assert "run finished" not in captured.out and "report follows" not in captured.err


def test_a_run_stopped_before_its_first_update_has_nothing_to_continue(tmp_path, capsys):
    """The server's checkpoint holds version 0 (every worker failed on a corrupt training set):
    --resume would only start the run over, so the launcher says that nothing was trained and
    that the same command starts the run once the reported problem is fixed."""
    cluster = RecordingCluster(tmp_path / "run")
    outputs = RunOutputs(cluster.out, resume=False)
    cluster.out.mkdir()
    save_checkpoint(cluster.out / "checkpoint.npz", {}, {"step": 0})
    assert launcher._ended_early(cluster, outputs, 1) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "pscnn run: stopped before the first update, with nothing to continue; once what is reported above is "
        f"fixed, the same command starts the run (run folder {cluster.out})"), err
    assert "--resume" not in err


def test_a_server_killed_before_its_first_checkpoint_leaves_a_line_on_what_to_do(tmp_path, capsys):
    """kill -9 (the OOM killer) before the server's first checkpoint: the launcher said only that
    the server was killed, and nothing of what to do (--resume has nothing to continue)."""
    cluster = RecordingCluster(tmp_path / "run")
    outputs = RunOutputs(cluster.out, resume=False)
    cluster.out.mkdir()
    assert launcher._ended_early(cluster, outputs, -9) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "pscnn run: stopped before the server's first checkpoint, with nothing to continue; once what is reported "
        f"above is fixed, the same command starts the run again (run folder {cluster.out})"), err


def test_a_run_stopped_after_updates_says_how_to_continue_from_its_checkpoint(tmp_path, capsys):
    """A readable checkpoint of version 3: the --resume hint."""
    cluster = RecordingCluster(tmp_path / "run")
    outputs = RunOutputs(cluster.out, resume=False)
    cluster.out.mkdir()
    save_checkpoint(cluster.out / "checkpoint.npz", {}, {"step": 3})
    assert launcher._ended_early(cluster, outputs, 1) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"pscnn run: stopped. Continue with the same command plus --resume (run folder {cluster.out})"


# ------------------------------------------------------------------------------ `pscnn run` interrupted

def test_ctrl_c_after_the_run_finished_prints_the_report(run_in_process, tmp_path, capsys):
    """Ctrl-C while the server lingers for its clients after writing summary.json: the run had
    finished.  `pscnn run` said "Continue with ... --resume" and exited 130 without a report."""
    def follow(cluster, bar):
        write_run_outputs(tmp_path / "run", summary=SUMMARY)
        raise KeyboardInterrupt
    code, _ = run_in_process(follow=follow)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "pscnn run: the run had finished before the interrupt" in err, err
    assert "--resume" not in err.split("interrupted")[-1], err
    assert "run finished: mode sync" in out


def test_ctrl_c_while_waiting_for_the_clients_at_the_end_prints_the_report(run_in_process, tmp_path, capsys):
    """The server exited 0 (summary written); a signal while the launcher waits for its clients
    to exit ended as a bare "pscnn: interrupted" (130)."""
    def follow(cluster, bar):
        write_run_outputs(tmp_path / "run", summary=SUMMARY)
        return 0

    def interrupted():
        raise KeyboardInterrupt
    code, cluster = run_in_process(follow=follow, on_wait=interrupted)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "pscnn: interrupted" not in err and "the run had finished before the interrupt" in err, err
    assert cluster.stops                    # the clients still running were stopped
    assert "run finished: mode sync" in out


def test_a_second_ctrl_c_does_not_cut_the_shutdown_short(run_in_process, tmp_path, capsys):
    """A second Ctrl-C while the server is being stopped (it writes its checkpoint): it raised
    KeyboardInterrupt inside stop_all, and the cluster's close() SIGKILLed every child.  Now the
    shutdown goes on, saying so once, and ends with the --resume hint."""
    def follow(cluster, bar):
        write_run_outputs(tmp_path / "run")
        raise KeyboardInterrupt

    def second_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
    before = signal.getsignal(signal.SIGINT)     # (an earlier in-process `pscnn bench` may have set one)
    code, cluster = run_in_process(follow=follow, on_stop=second_ctrl_c)
    err = capsys.readouterr().err
    assert code == 130, err
    assert cluster.stops, err
    assert "pscnn: interrupted" not in err, err
    assert err.count("still stopping") == 1, err
    assert err.strip().splitlines()[-1] == \
        f"pscnn run: stopped. Continue with the same command plus --resume (run folder {tmp_path / 'run'})", err
    # restored: the handler the launcher found, main()'s own where Ctrl-C had a Python handler
    assert signal.getsignal(signal.SIGINT) is (cli.interrupt_noted if callable(before) else before)


def stop_signals_at_once(*signals) -> None:
    """Send ``signals`` to this thread (the main one) so that they are pending together, as
    systemd's stop (SIGTERM, then SIGHUP at once) or a closed terminal with a kill makes them:
    Python then runs their handlers one after the other, in one go.  To the thread, not the
    process: another thread of the test process would take each one as it comes."""
    mask = set(signals)
    signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        for sig in signals:
            signal.pthread_kill(threading.get_ident(), sig)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, mask)


def test_a_stop_signal_pending_with_the_first_does_not_cut_the_shutdown_short(run_in_process, tmp_path, capsys):
    """SIGTERM and SIGHUP together (a real `pscnn run` got them so every time): SIGHUP's handler
    raised KeyboardInterrupt, and Python ran the handler of the SIGTERM pending with it as
    _interrupted began, before it had set another: a second KeyboardInterrupt, a bare "pscnn:
    interrupted", and the cluster's close() SIGKILLed every child, the server before its
    checkpoint (the run's progress lost).  Here the pending one's handler, whatever was set once
    the first had raised, runs where _interrupted stops the children; now it does nothing."""
    pending = []

    def follow(cluster, bar):
        write_run_outputs(tmp_path / "run")
        try:
            signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
        finally:
            pending.append(signal.getsignal(signal.SIGTERM))   # what Python finds for the pending SIGTERM
    code, cluster = run_in_process(follow=follow, on_stop=lambda: pending[0](signal.SIGTERM, None))
    err = capsys.readouterr().err
    assert code == 130, err
    assert cluster.stops and cluster.stops[0][0] == "server", err
    assert "pscnn: interrupted" not in err and "still stopping" not in err, err
    assert err.strip().splitlines()[-1] == \
        f"pscnn run: stopped. Continue with the same command plus --resume (run folder {tmp_path / 'run'})", err


def test_stop_signals_at_once_while_stopping_print_no_traceback(run_in_process, tmp_path, capsys, monkeypatch):
    """SIGINT, SIGTERM and SIGHUP together while the children are being stopped: the first one's
    handler set SIG_IGN, and Python printed a traceback for each other one already pending
    ("OSError: Signal 15 ignored due to race condition").  Now the shutdown goes on, saying so
    once, and nothing else."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    def follow(cluster, bar):
        write_run_outputs(tmp_path / "run")
        raise KeyboardInterrupt
    code, cluster = run_in_process(follow=follow,
                                   on_stop=lambda: stop_signals_at_once(signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    err = capsys.readouterr().err
    assert code == 130, err
    assert not unraisable, [str(u.exc_value) for u in unraisable]
    assert err.count("still stopping") == 1, err
    assert err.strip().splitlines()[-1] == \
        f"pscnn run: stopped. Continue with the same command plus --resume (run folder {tmp_path / 'run'})", err

# ------------------------------------------------------------------------------ _follow, on stand-ins

# A stand-in server: exits with the code written in the file argv[1], once it exists; 20 s at most.
SERVER_UNTIL = """
import sys, time
from pathlib import Path
for _ in range(200):
    if Path(sys.argv[1]).exists():
        sys.exit(int(Path(sys.argv[1]).read_text()))
    time.sleep(0.1)
sys.exit(3)
"""


class Bar:
    """tqdm's surface for _follow, recording what it was shown."""

    def __init__(self):
        self.total, self.n, self.postfix, self.description, self.closed = None, 0, None, None, False

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def set_description(self, text, refresh=True):
        self.description = text

    def refresh(self):
        pass

    def close(self):
        self.closed = True


def test_the_bar_finished_from_a_summary_of_the_wrong_kind_is_left_as_it_was(tmp_path):
    """_finish_bar trusted summary.json as print_report did: one holding a list raised
    AttributeError, lists nested 100,000 deep RecursionError, out of pscnn run; a NaN accuracy
    set "test acc nan".  The bar is now left as it was (print_report says why), and a readable
    summary still finishes it."""
    path = tmp_path / "summary.json"
    for text in ("[1, 2]", "[" * 100_000, '{"status": "complete", "test_accuracy": NaN, "updates": 4}'):
        path.write_text(text)
        bar = Bar()
        launcher._finish_bar(bar, path)
        assert bar.description is None, (text[:40], bar.description)
    path.write_text('{"status": "complete", "test_accuracy": 0.5, "updates": 4}')
    bar = Bar()
    bar.total = 8
    launcher._finish_bar(bar, path)
    assert bar.n == 8 and bar.description == "test acc 0.5000 at update 4", bar.description


@pytest.fixture
def stand_ins(tmp_path):
    """A LocalCluster holding a SERVER_UNTIL server and a worker stand-in; ``end(code)`` lets the
    server exit with ``code``.  Every process is killed afterwards."""
    cluster = LocalCluster(tmp_path / "run")
    marker = tmp_path / "server-exit-code"
    log = open(cluster.logs / "server.log", "ab")  # noqa: SIM115  (closed by cluster.close())
    cluster._files.append(log)
    cluster.procs["server"] = subprocess.Popen([sys.executable, "-c", SERVER_UNTIL, str(marker)],
                                               stdout=log, stderr=subprocess.STDOUT)
    cluster.procs["worker-0"] = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(60)\n"])

    def end(code: int) -> None:
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(str(code))
        tmp.replace(marker)             # whole, at once
    cluster.end = end
    try:
        yield cluster
    finally:
        try:
            cluster.close()
        finally:
            kill_left(cluster)


def test_follow_shows_progress_and_the_start_barrier_on_the_bar(stand_ins):
    """The bar follows the server's status: its total and batches done, and while the start barrier
    holds, how many workers are ready."""
    bar = bar_following(stand_ins, {"started": False, "ready": 1, "batches_total": 40, "batches_done": 7,
                                    "done": False})
    assert (bar.total, bar.n) == (40, 7)
    assert bar.postfix == "waiting for the workers: 1 of 1 ready"


@pytest.mark.parametrize("loss,shown", [(2.0183, "loss 2.018"), (0.04567, "loss 0.04567"),
                                         (2.8765028655591414e28, "loss 2.877e+28")])
def test_the_bar_shows_the_loss_in_four_significant_digits(stand_ins, loss, shown):
    """A loss on its way to diverging showed as 28765028655591414036900610048.000 (fixed point),
    pushing the rest of the bar off the line; a small one as 0.046."""
    bar = bar_following(stand_ins, {**TRAINING, "loss": loss})
    assert bar.postfix == f"epoch 1/2, 8129 img/s, {shown}"


# A status answer while training (sync mode: a round of two, both arrived).
TRAINING = {"started": True, "batches_total": 64, "batches_done": 2, "done": False, "loss": 0.25, "epoch": 0,
            "epochs": 2, "images_per_second": 8129.4, "round_members": 2, "round_arrived": 2}


def bar_following(stand_ins, answer: dict, exit_code: int = 0) -> Bar:
    """The bar after _follow saw ``answer`` twice, the server exiting ``exit_code`` after the second."""
    bar, answers = Bar(), []

    def status(timeout=1.0):
        answers.append(1)
        if len(answers) == 2:
            stand_ins.end(exit_code)
        return answer
    stand_ins.status = status
    assert launcher._follow(stand_ins, bar) == exit_code
    return bar


@pytest.mark.parametrize("arrived,shown", [(1, "epoch 1/2, 0 img/s, loss 0.25, round waiting on 1 of 2 workers"),
                                           (0, "epoch 1/2, 0 img/s, loss 0.25")])
def test_the_bar_says_what_a_stalled_sync_round_waits_on(stand_ins, arrived, shown):
    """A dead worker's round waits out --peer-timeout: the bar sat at 0 img/s without saying why.
    (A round none of whose gradients has arrived is computing, not waiting on anyone.)"""
    bar = bar_following(stand_ins, {**TRAINING, "images_per_second": 0.0, "round_arrived": arrived})
    assert bar.postfix == shown


def test_the_bar_says_what_a_round_waits_on_before_a_short_peer_timeout_drops_the_worker(stand_ins):
    """With --peer-timeout 5 the hint came once the server's images/s (over 5 s) fell to 0: as the
    dead worker was declared, so it was never seen.  It now comes after half of --peer-timeout with
    no batch done, while the server's images/s still counts the last updates.  Two answers the
    poll period (0.5 s) apart, with nothing done between: more than half of a 0.4 s timeout."""
    stand_ins.peer_timeout = 0.4
    bar = bar_following(stand_ins, {**TRAINING, "round_arrived": 1})
    assert bar.postfix == "epoch 1/2, 8129 img/s, loss 0.25, round waiting on 1 of 2 workers"
    assert launcher.round_wait_hint_after(5.0) == 2.5 and launcher.round_wait_hint_after(60.0) == 5.0
    assert launcher.round_wait_hint_after(None) == 5.0


def test_the_start_barrier_on_the_bar_counts_the_workers_the_server_waits_for(stand_ins):
    """`pscnn run --workers 4 --wait-for-workers 2`: the bar said "1 of 4 ready" (the workers
    started), and the run started at 2 of them."""
    bar = bar_following(stand_ins, {"started": False, "ready": 1, "wait_for_workers": 2, "batches_total": 40,
                                    "batches_done": 0, "done": False})
    assert bar.postfix == "waiting for the workers: 1 of 2 ready"


def test_the_bar_says_when_training_diverged(stand_ins):
    """The server stops a diverged run and waits for its final evaluation: the bar kept showing
    the last epoch, images/s and loss, as if training went on."""
    bar = bar_following(stand_ins, {"started": True, "batches_total": 64, "batches_done": 2, "done": True,
                                    "loss": 2.9e28, "epoch": 0, "epochs": 2, "images_per_second": 0.0,
                                    "error": "training diverged: the last 32 pushes had a NaN or Inf loss or "
                                             "gradient"}, exit_code=1)
    assert bar.postfix == "training diverged"


def test_the_bar_says_when_training_is_over_and_the_final_evaluation_is_awaited(stand_ins):
    """Training is over and the server waits for the evaluator's final report (up to
    --final-eval-timeout): the bar showed the last epoch, images/s and loss, as if training went on."""
    bar = bar_following(stand_ins, {**TRAINING, "batches_done": 64, "epoch": 2, "done": True, "finished": False})
    assert bar.postfix == "training finished; waiting for the final evaluation"


def test_the_bar_says_when_the_server_scores_the_final_weights_itself(stand_ins):
    """Scoring them itself (no evaluator), the server answers between two batches of the test set:
    the bar said it waited for a final evaluation, as for an evaluator's report."""
    bar = bar_following(stand_ins, {**TRAINING, "batches_done": 64, "epoch": 2, "done": True, "finished": False,
                                    "scoring": True})
    assert bar.postfix == "training finished; the server scores the final weights"


def test_the_bar_says_the_results_are_written_once_the_final_evaluation_is_in(stand_ins):
    """A resumed run whose checkpoint holds its final evaluation waits for none: the bar said
    "waiting for the final evaluation" while its server wrote the results."""
    bar = bar_following(stand_ins, {**TRAINING, "batches_done": 64, "epoch": 2, "done": True, "finished": False,
                                    "final_evaluation": True})
    assert bar.postfix == "training finished; writing the results"


def test_a_server_that_ended_a_diverged_run_is_one_line_above_its_report(stand_ins, capsys):
    """The server exits 1 once a diverged run's summary is written: its exit came with the last
    20 lines of its log (rejected pushes, mostly) above a report saying the same; now one line
    says why."""
    error = "training diverged: the last 8 pushes, from 2 trainers, had a NaN or Inf loss or gradient"
    err = err_of_a_server_exiting_with(stand_ins, capsys, "02:03:40 WARNING server: rejected push from worker-0",
                                       f"pscnn server: {error}", {"batches_done": 4, "error": error})
    assert f"pscnn run: the server exited with 1: {error}\n" in err
    assert "rejected push" not in err


def err_of_a_server_exiting_with(stand_ins, capsys, repeated: str, last: str, status: dict) -> str:
    """What pscnn run prints of a server that exits 1 once its log holds 20 ``repeated`` lines then
    ``last`` (its own line saying why), its final status ``status`` (over a 64-batch run, done)."""
    with open(stand_ins.logs / "server.log", "a") as log:
        log.write(f"{repeated}\n" * 20 + f"{last}\n")

    def final_status(timeout=1.0):
        stand_ins.end(1)
        return {"started": True, "batches_total": 64, "done": True, "loss": None, "error": None, **status}
    stand_ins.status = final_status
    assert launcher._follow(stand_ins, Bar()) == 1
    return capsys.readouterr().err


def test_the_bar_says_when_the_runs_outputs_cannot_be_written(stand_ins):
    """A full disk at the end: the server tries again for minutes, and the bar said it waited for
    the final evaluation."""
    bar = bar_following(stand_ins, {**TRAINING, "batches_done": 64, "epoch": 2, "done": True, "finished": False,
                                    "write_failing": "summary.json: cannot write: No space left on device"})
    assert bar.postfix == "training finished; cannot write the run's outputs, trying again (see logs/server.log)"


def test_a_server_that_could_not_write_the_runs_outputs_is_one_line(stand_ins, capsys):
    """A full disk at the end: the server retries for FINAL_WRITE_PATIENCE_S, then exits 1 with one
    line saying so.  pscnn run showed the last 20 lines of its log, the retries, above it."""
    error = ("the run's outputs could not be written to run for 300 s: [Errno 28] No space left on device; --resume "
             "would continue from version 12, the last checkpoint written")
    err = err_of_a_server_exiting_with(stand_ins, capsys, "02:03:40 ERROR   server: cannot write the run's outputs",
                                       f"pscnn server: {error}", {"batches_done": 64})
    assert f"pscnn run: the server exited with 1: {error}\n" in err and "cannot write" not in err, err


def test_the_bar_names_the_update_its_test_accuracy_is_of(stand_ins):
    """The evaluator scores every 10 s: for a short run's first seconds the bar showed the
    untrained weights' "test acc 0.1380" next to a loss of 0.25, as if the run were not learning."""
    bar = bar_following(stand_ins, {"started": True, "batches_total": 282, "batches_done": 84, "done": False,
                                    "loss": 0.25, "epoch": 0, "epochs": 3, "images_per_second": 11473.8,
                                    "test_accuracy": 0.138, "eval_version": 0})
    assert bar.description == "test acc 0.1380 at update 0"


def test_a_server_with_its_results_written_and_no_client_left_is_stopped(stand_ins):
    """A server resuming a finished run lingers --peer-timeout for clients yet to connect; `pscnn run`
    starts none then (or they have all exited): it waited out the linger.  Now it stops the server,
    which exits 0 on SIGTERM once its results are written (this stand-in: 1 if left to linger)."""
    stand_ins.procs["worker-0"].kill()
    stand_ins.procs["worker-0"].wait(10)
    stand_ins.procs["server"].kill()
    stand_ins.procs["server"].wait(10)
    stand_ins.procs["server"] = server = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                               "print('ready', flush=True)\ntime.sleep(20)\nsys.exit(1)\n"],
        stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline() == "ready\n"       # its SIGTERM handler is in place
    server.stdout.close()
    stand_ins.status = lambda timeout=1.0: {"started": True, "batches_total": 64, "batches_done": 64, "done": True,
                                            "finished": True, "loss": None}
    bar = Bar()
    assert launcher._follow(stand_ins, bar) == 0
    # its first answer, which went to stopping it: the bar ended at "0/?" above the whole run's report
    assert (bar.total, bar.n) == (64, 64)


def test_a_resumed_runs_bar_counts_its_rate_from_where_it_resumed(stand_ins):
    """A resumed run starts at the checkpoint's 408 of 938 batches: tqdm took them as done in this
    run's time, and showed twice its batches/s and too short a time left."""
    bar, answers = tqdm(total=None, file=io.StringIO()), []

    def status(timeout=1.0):
        answers.append(1)
        if len(answers) == 3:
            stand_ins.end(0)
        if len(answers) == 1:
            return {"started": False, "ready": 0, "batches_total": 938, "batches_done": 408, "done": False}
        return {"started": True, "batches_total": 938, "batches_done": 500, "done": False, "loss": None}
    stand_ins.status = status
    assert launcher._follow(stand_ins, bar) == 0
    assert (bar.n, bar.initial) == (500, 408)
    assert bar.format_dict["initial"] == 408          # tqdm's rate: (n - initial) / elapsed


def test_a_resumed_runs_bar_counts_its_rate_from_where_it_resumed_with_no_start_barrier(stand_ins):
    """One worker (or --wait-for-workers 1): the server starts at once, so no answer says
    started false, and the checkpoint's 408 batches counted as done at this run's rate."""
    bar, answers = tqdm(total=None, file=io.StringIO()), []

    def status(timeout=1.0):
        answers.append(1)
        if len(answers) == 3:
            stand_ins.end(0)
        return {"started": True, "batches_total": 938, "batches_done": 408 + 46 * (len(answers) - 1),
                "done": False, "loss": None}
    stand_ins.status = status
    assert launcher._follow(stand_ins, bar) == 0
    assert (bar.n, bar.initial) == (500, 408)


def test_an_interrupt_lost_while_pscnn_run_follows_its_server_is_taken_up_at_the_next_poll(stand_ins, monkeypatch):
    """pscnn run's handler (_interrupt) silences every stop signal, then raises KeyboardInterrupt.
    Raised inside a zmq socket's __del__, which each status poll runs in the launcher's main thread,
    the exception was lost ("Exception ignored"), and pscnn run followed the run to its end, deaf
    to every later Ctrl-C, SIGTERM and SIGHUP.  Now the next poll takes it up: the run is interrupted."""
    import weakref
    lost, answers = [], []
    monkeypatch.setattr(sys, "unraisablehook", lost.append)

    class Socket:                       # its __del__ as pyzmq's: Python code the handler can run in
        pass

    def status(timeout=1.0):
        answers.append(1)
        if len(answers) == 1:
            sock = Socket()
            ref = weakref.ref(sock, lambda _ref: launcher._interrupt(signal.SIGINT, None))
            del sock
            assert ref() is None and [type(u.exc_value) for u in lost] == [KeyboardInterrupt]
        if len(answers) == 3:
            stand_ins.end(0)            # the run's end (the old code got there)
        return {"started": True, "batches_total": 40, "batches_done": 7, "done": False, "loss": None}
    stand_ins.status = status
    with pytest.raises(KeyboardInterrupt):
        launcher._follow(stand_ins, Bar())
    assert len(answers) == 1


def test_follow_stops_the_run_when_every_worker_left_before_the_end(stand_ins, capsys):
    """Every worker gone while the server says training is not done: the run is stopped, the
    server first (it checkpoints), and _follow returns 1."""
    stops = []
    stand_ins.stop_all = lambda grace, order, on_kill=None: stops.append(tuple(order)) or stand_ins.end(0)
    stand_ins.procs["worker-0"].kill()
    stand_ins.procs["worker-0"].wait(5)
    stand_ins.status = lambda timeout=1.0: {"batches_total": 40, "batches_done": 7, "done": False}
    assert launcher._follow(stand_ins, Bar()) == 1
    assert "every worker has exited before the end of training; stopping the server" in capsys.readouterr().err
    assert stops == [("server", "worker", "evaluator")]


@pytest.mark.parametrize("answer, said", [
    ({"batches_done": 7, "done": False}, "its status answer has batches_total None, not a count"),
    ({**TRAINING, "loss": "low"}, "its status answer has loss 'low', not a number"),
    ({"started": False, "batches_total": 40, "batches_done": 0, "done": False},
     "its status answer has ready None, not a count"),
    ({**TRAINING, "test_accuracy": [0.9]}, "its status answer has test_accuracy [0.9], not a number"),
    # each read by the bar's line: a traceback out of pscnn run when it was none
    ({**TRAINING, "images_per_second": "fast"}, "its status answer has images_per_second 'fast', not a number"),
    ({**TRAINING, "epoch": None}, "its status answer has epoch None, not a number"),
    ({**TRAINING, "epochs": "2"}, "its status answer has epochs '2', not a number"),
    ([1, 2], "its status answer is a list, not an object"),
    (BadReply("tcp://127.0.0.1:1 answered a status request with 'error'"),
     "tcp://127.0.0.1:1 answered a status request with 'error'"),
])
def test_follow_stops_the_run_in_one_line_on_a_status_answer_it_cannot_read(stand_ins, capsys, answer, said):
    """A field missing raised KeyError (a traceback) out of pscnn run, a BadReply its one line, and
    either way leaving the cluster SIGKILLed every child, the server before its checkpoint.  Now the
    run is stopped, the server first, with one line saying why, and _follow returns 1."""
    stops = []
    stand_ins.stop_all = lambda grace, order, on_kill=None: stops.append(tuple(order)) or stand_ins.end(0)

    def status(timeout=1.0):
        if isinstance(answer, Exception):
            raise answer
        return answer
    stand_ins.status = status
    bar = Bar()
    assert launcher._follow(stand_ins, bar) == 1
    assert capsys.readouterr().err == (f"pscnn run: cannot follow the server: {said}; stopping it (it checkpoints), "
                                       "then the workers and the evaluator\n")
    assert stops == [("server", "worker", "evaluator")] and bar.closed


def test_follow_stops_the_server_first_when_the_evaluator_fails(stand_ins, capsys):
    """An evaluator that exits 1: the run is stopped in the order server, workers, evaluator."""
    stops = []
    stand_ins.stop_all = lambda grace, order, on_kill=None: stops.append(tuple(order)) or stand_ins.end(0)
    evaluator = subprocess.Popen([sys.executable, "-c", "import sys\nsys.exit(1)\n"])
    evaluator.wait(30)
    stand_ins.procs["evaluator"] = evaluator
    stand_ins.status = lambda timeout=1.0: None
    assert launcher._follow(stand_ins, Bar()) == 1
    assert stops == [("server", "worker", "evaluator")]


def test_an_evaluator_killed_after_training_finished_does_not_stop_the_run(stand_ins, capsys):
    """The evaluator killed during the final evaluation (the OOM killer): the run was stopped, the
    server with it, so a finished training left no summary, only a checkpoint to --resume.  The
    server scores the final weights itself; _follow waits for it to end the run."""
    stops, answers = [], []
    stand_ins.stop_all = lambda grace, order, on_kill=None: stops.append(tuple(order)) or stand_ins.end(0)
    evaluator = subprocess.Popen([sys.executable, "-c", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"])
    evaluator.wait(30)
    stand_ins.procs["evaluator"] = evaluator

    def status(timeout=1.0):
        answers.append(1)
        if len(answers) == 3:
            stand_ins.end(0)            # the server wrote the summary and exits
        return {"batches_total": 40, "batches_done": 40, "done": True} if len(answers) == 1 else None
    stand_ins.status = status
    assert launcher._follow(stand_ins, Bar()) == 0
    assert stops == []
    assert "the evaluator failed after training finished; the server scores the final weights itself" \
        in capsys.readouterr().err


@pytest.mark.parametrize("code", [3, 1])
def test_a_failed_server_is_reported_with_its_log_tail(tmp_path, capsys, code):
    """A server that exits with an error code: its code and the last lines of its log (why); a
    server whose last line says why in one line (as a client's), or killed by a signal (its log
    cannot say why), gets one line."""
    for log, said in (("Traceback (most recent call last):\nValueError: the reason\n",
                       f"; last lines of its log:\nTraceback (most recent call last):\nValueError: the reason\n"),
                      ("a line before\npscnn: error: the reason\n", ": the reason\n")):
        with LocalCluster(tmp_path / "run") as cluster:
            (cluster.logs / "server.log").write_text(log)
            server = subprocess.Popen([sys.executable, "-c", f"import sys\nsys.exit({code})\n"])
            server.wait(30)
            cluster.procs["server"] = server
            assert launcher._follow(cluster, Bar()) == code
        err = capsys.readouterr().err
        assert f"pscnn run: the server exited with {code}{said}" in err, err


# ------------------------------------------------------------------------------ pscnn.cli helpers

def test_stop_with_launcher_asks_for_sigterm_when_the_launcher_dies(monkeypatch):
    """In a child of a launcher: PR_SET_PDEATHSIG with SIGTERM (the server then checkpoints and the
    clients say goodbye; SIGKILL would lose the checkpoint), and the variable is spent."""
    calls = []

    class Libc:
        def prctl(self, *args):
            calls.append(args)
            return 0
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Libc())
    environ = {"PSCNN_LAUNCHER_PID": str(os.getppid())}     # its launcher is alive
    cli.stop_with_launcher(environ)
    assert calls == [(1, int(signal.SIGTERM), 0, 0, 0)]
    assert "PSCNN_LAUNCHER_PID" not in environ


def test_every_command_follows_its_launcher_first(monkeypatch, capsys):
    """main() calls stop_with_launcher before anything else, even before parsing the command line."""
    called = []
    monkeypatch.setattr(cli, "stop_with_launcher", lambda *a: called.append(True))

    def refuse(argv=None, environ=os.environ):
        assert called, "stop_with_launcher was not called first"
        raise CliError("bad flag")
    monkeypatch.setattr(cli, "parse_args", refuse)
    assert main(["status"]) == 2
    assert called == [True]


def test_main_exits_130_when_interrupted(monkeypatch, capsys):
    """Ctrl-C in any command: "pscnn: interrupted" and exit 130 (128 + SIGINT), as shells expect."""
    monkeypatch.setattr(cli, "stop_with_launcher", lambda *a: None)

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert main(["status", "--server", "tcp://127.0.0.1:1"]) == 130
    assert capsys.readouterr().err.strip() == "pscnn: interrupted"


def test_pscnn_train_stops_on_sighup_as_on_sigterm():
    """`pscnn train`: SIGTERM and SIGHUP (the terminal closed) both end it as Ctrl-C does."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        cli.stop_on_signals("train")
        with pytest.raises(KeyboardInterrupt):
            signal.getsignal(sig)(sig, None)
        # the stop happens once: a repeat is ignored, Ctrl-C still interrupts; and SIG_IGN from the
        # start of Python's exit, which keeps it (a Python handler it resets to SIG_DFL: a kill)
        for repeat in (signal.SIGTERM, signal.SIGHUP):
            assert signal.getsignal(repeat)(repeat, None) is None
        cli._ignore_stop_signals_at_exit()
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


@pytest.mark.parametrize("command, stopped_by", [("train", KeyboardInterrupt), ("worker", SystemExit)])
def test_stop_signals_at_once_stop_a_command_once_and_print_no_traceback(command, stopped_by, monkeypatch):
    """SIGTERM and SIGHUP together (systemd's stop): the first one's handler set SIG_IGN and
    stopped the command, and Python printed a traceback for the other, already pending ("OSError:
    Signal 15 ignored due to race condition"), on `pscnn train`'s terminal or in a worker's log."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    cli.stop_on_signals(command)
    with pytest.raises(stopped_by):
        stop_signals_at_once(signal.SIGTERM, signal.SIGHUP)
    assert not unraisable, [str(u.exc_value) for u in unraisable]
    stop_signals_at_once(signal.SIGTERM, signal.SIGHUP)      # a repeat: nothing
    assert not unraisable, [str(u.exc_value) for u in unraisable]


def signalled_in_a_c_extensions_import(sig: int):
    """What a command does first once it is known (cli.inline_config_files), standing for an import
    of a C extension that signal ``sig`` comes during: such an import (numpy's of datetime,
    PyCapsule_Import) raises ImportError for whatever it meets, the signal's exception too."""
    def import_a_c_extension(args):
        try:
            os.kill(os.getpid(), sig)                # handled here, at the next bytecode
            time.sleep(1)                            # (a sleep returns early for a signal's exception)
        except BaseException:
            raise ImportError('PyCapsule_Import could not import module "datetime"') from None
        raise AssertionError(f"signal {sig} was not handled")
    return import_a_c_extension


@pytest.mark.parametrize("command, argv, code, err", [
    ("server", ["--bind", "tcp://127.0.0.1:1"], 0, ""),
    ("run", ["--no-progress"], 130, "pscnn: interrupted")])
def test_a_stop_signal_while_a_c_extension_is_imported_stops_the_command_without_a_traceback(
        command, argv, code, err, tmp_path, monkeypatch, capsys):
    """SIGTERM while numpy loads (a command's first second): its handler's SystemExit or
    KeyboardInterrupt, raised inside numpy's import of datetime, came out as an ImportError
    (PyCapsule_Import replaces whatever the import raised), and the command ended with numpy's
    advice on broken installs, a traceback and exit status 1.  Such an import, stood for here by
    what the command does first once it is known, raises ImportError for whatever it meets."""
    monkeypatch.setattr(cli, "stop_with_launcher", lambda *a: None)
    monkeypatch.setattr(cli, "inline_config_files", signalled_in_a_c_extensions_import(signal.SIGTERM))
    assert main([command, "--out", str(tmp_path / "run"), *argv]) == code
    assert capsys.readouterr().err.strip() == err


def test_an_import_error_without_a_stop_signal_is_not_taken_for_one(tmp_path, monkeypatch):
    """What a stop in an import turns into is a stop only when a stop signal came: a broken install
    still says so."""
    monkeypatch.setattr(cli, "stop_with_launcher", lambda *a: None)

    def broken_install(args):
        raise ImportError("numpy is broken")
    monkeypatch.setattr(cli, "inline_config_files", broken_install)
    with pytest.raises(ImportError, match="numpy is broken"):
        main(["server", "--bind", "tcp://127.0.0.1:1", "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("command, module, entry", [("train", "cnn_core.training", "train_from_args"),
                                                     ("run", "pscnn.launcher", "run_from_args")])
def test_a_stop_lost_while_train_or_run_loaded_interrupts_it_before_it_starts(command, module, entry, tmp_path,
                                                                             monkeypatch, capsys):
    """A SIGTERM while `pscnn train` or `pscnn run` loaded, whose KeyboardInterrupt was lost (raised
    in a weakref callback as a module loaded): the command went on, trained or started its run, and
    ignored the stop signals that followed.  Now it is interrupted once loaded: 130."""
    import importlib
    monkeypatch.setattr(cli, "stop_with_launcher", lambda *a: None)
    monkeypatch.setattr(cli, "inline_config_files", lambda args: lose_a_stop_signal(command))
    started = []
    monkeypatch.setattr(importlib.import_module(module), entry, lambda args: started.append(args) or 0)
    assert main([command, "--out", str(tmp_path / "run")]) == 130
    assert started == []
    assert capsys.readouterr().err.strip() == "pscnn: interrupted"


@pytest.mark.parametrize("command, argv", [("train", ["--out", "{out}"]),
                                           ("server", ["--bind", "tcp://127.0.0.1:1", "--out", "{out}"]),
                                           ("worker", ["--server", "tcp://127.0.0.1:1"])])
def test_ctrl_c_while_a_c_extension_is_imported_interrupts_the_command_without_a_traceback(
        command, argv, tmp_path, monkeypatch, capsys):
    """Ctrl-C while numpy loads (a command's first second): Python's KeyboardInterrupt, raised inside
    numpy's import of datetime, came out as numpy's ImportError ("Importing the numpy C-extensions
    failed"), a traceback and exit status 1.  Now it is what a Ctrl-C a moment later is: "pscnn:
    interrupted", 130.  The import is stood for as in the SIGTERM test above."""
    monkeypatch.setattr(cli, "stop_with_launcher", lambda *a: None)
    monkeypatch.setattr(cli, "inline_config_files", signalled_in_a_c_extensions_import(signal.SIGINT))
    assert main([command, *(arg.format(out=tmp_path / "run") for arg in argv)]) == 130
    assert capsys.readouterr().err.strip() == "pscnn: interrupted"


def test_ctrl_c_while_the_command_line_is_parsed_interrupts_without_a_traceback(monkeypatch, capsys):
    """Ctrl-C while the parser is built (pscnn bench's modules load then: a tenth of a second) came
    out of main() as a KeyboardInterrupt, a traceback."""
    monkeypatch.setattr(cli, "stop_with_launcher", lambda *a: None)
    real_build_parser = cli.build_parser

    def interrupted_build_parser():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        return real_build_parser()
    monkeypatch.setattr(cli, "build_parser", interrupted_build_parser)
    try:
        code = main(["status", "--server", "tcp://127.0.0.1:1"])
    except KeyboardInterrupt:
        code = "KeyboardInterrupt out of main()"
    assert code == 130
    assert capsys.readouterr().err.strip() == "pscnn: interrupted"


@pytest.mark.parametrize("command, module, entry", [("train", "cnn_core.training", "train_from_args"),
                                                     ("run", "pscnn.launcher", "run_from_args")])
def test_a_ctrl_c_lost_while_train_or_run_loaded_interrupts_it_before_it_starts(command, module, entry, tmp_path,
                                                                               monkeypatch, capsys):
    """A Ctrl-C whose KeyboardInterrupt was lost as a module loaded (see the SIGTERM test above): the
    command trained, or started its whole run, as if no Ctrl-C had come."""
    import importlib
    monkeypatch.setattr(cli, "stop_with_launcher", lambda *a: None)
    monkeypatch.setattr(cli, "inline_config_files", lambda args: lose_a_stop_signal(command, signal.SIGINT))
    started = []
    monkeypatch.setattr(importlib.import_module(module), entry, lambda args: started.append(args) or 0)
    assert main([command, "--out", str(tmp_path / "run")]) == 130
    assert started == []
    assert capsys.readouterr().err.strip() == "pscnn: interrupted"


def run_in_a_weakref_callback(callback):
    """Run ``callback`` in a weakref callback, as importlib's module locks end (see lose_a_stop_signal):
    what it raises cannot be raised, and goes to sys.unraisablehook."""
    import weakref
    module_lock = type("ModuleLock", (), {})()
    ref = weakref.ref(module_lock, lambda _ref: callback())
    del module_lock
    assert ref() is None


def raise_value_error():
    raise ValueError("a lost error that is not a stop")


@pytest.mark.parametrize("command, sig, module, entry, argv", [
    ("train", signal.SIGINT, "cnn_core.training", "train_from_args", ["--out", "{tmp}/run"]),
    ("run", signal.SIGTERM, "pscnn.launcher", "run_from_args", ["--out", "{tmp}/run"]),
    ("server", signal.SIGTERM, "server.server", "serve_from_args", ["--bind", "tcp://127.0.0.1:1", "--out", "{tmp}/run"]),
    ("keys", signal.SIGINT, "pscnn.curve", "keys_from_args", ["{tmp}/keys"])])
def test_a_stop_lost_as_a_command_loaded_prints_no_traceback_but_other_lost_errors_do(
        command, sig, module, entry, argv, tmp_path, monkeypatch, capsys):
    """A Ctrl-C or stop signal whose exception was lost in a weakref callback (see
    lose_a_stop_signal) is taken up, but Python printed it first: "Exception ignored in: ...", a
    traceback ending in KeyboardInterrupt (or a server's SystemExit: 0), above "pscnn:
    interrupted"; pscnn keys (download, status, bench) went on as if no Ctrl-C had come.  Now
    main()'s sys.unraisablehook leaves those unprinted, each command takes its stop up; an exception lost
    there that is not a stop still reaches the hook main() found, and that hook is back after."""
    import importlib
    monkeypatch.setattr(cli, "stop_with_launcher", lambda *a: None)
    reached = []
    monkeypatch.setattr(sys, "unraisablehook", reached.append)

    def lose_a_stop_and_an_error(args):
        run_in_a_weakref_callback(lambda: signal.raise_signal(sig))
        run_in_a_weakref_callback(raise_value_error)
    monkeypatch.setattr(cli, "inline_config_files", lose_a_stop_and_an_error)
    started = []
    monkeypatch.setattr(importlib.import_module(module), entry,
                        lambda args: 0 if cli.stop_raised() and command == "server" else started.append(args) or 0)
    assert main([command, *(arg.format(tmp=tmp_path) for arg in argv)]) == (0 if command == "server" else 130)
    assert started == []
    assert [type(u.exc_value) for u in reached] == [ValueError]
    assert sys.unraisablehook == reached.append
    assert capsys.readouterr().err.strip() == ("" if command == "server" else "pscnn: interrupted")


ROOT = Path(__file__).resolve().parents[1]
# An import hook ahead of the others that signals the process ({sig}) as it imports pscnn.cli: the
# module the console script loads once its handlers are set.
SIGNAL_AS_PSCNN_CLI_LOADS = """
import importlib.abc, os, sys
class SignalAsPscnnCliLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pscnn.cli":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), {sig})
        return None
sys.meta_path.insert(0, SignalAsPscnnCliLoads())
"""
# Run as the console script's entry point (pyproject.toml's) runs, with that hook.
SIGNALLED_AS_PSCNN_CLI_LOADS = SIGNAL_AS_PSCNN_CLI_LOADS + """sys.argv = ["pscnn", "train", "--out", {out!r}]
from {module} import {function}
sys.exit({function}())
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_console_script_loads_pscnn_cli_interrupts_without_a_traceback(sig, tmp_path):
    """Ctrl-C, SIGTERM or SIGHUP (the terminal closed) while the console script imported pscnn.cli
    (argparse, json, logging, ...: a tenth of a second on a busy machine), before main() set its
    handlers: a KeyboardInterrupt traceback, or a kill (-15, -1).  The console script notes them
    now, and main() takes them up: `pscnn train` interrupted, 130, before it loads anything."""
    entry = re.search(r'^pscnn = "([\w.]+):(\w+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    code = SIGNALLED_AS_PSCNN_CLI_LOADS.format(sig=int(sig), out=str(tmp_path / "run"), module=entry[1],
                                               function=entry[2])
    proc = popen_taking_ctrl_c([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, err.strip()) == (130, "pscnn: interrupted")
    assert not (tmp_path / "run").exists()


def test_the_console_script_leaves_ctrl_c_ignored_where_its_shell_ignores_it(monkeypatch):
    """A command a non-interactive shell starts in the background has Ctrl-C ignored (SIG_IGN): the
    terminal's Ctrl-C is for the job in the foreground.  The console script's handler, set for that
    signal too before pscnn.cli loads, made it callable, main() took it for Python's own and put its
    interrupt in its place: the background server was interrupted with the foreground job."""
    from pscnn import __main__ as console_script
    seen = []

    def cli_main(argv=None, signals_before=()):
        seen.append(signal.getsignal(signal.SIGINT))
        return 0
    monkeypatch.setattr(cli, "main", cli_main)
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # (the conftest fixture restores the test run's)
    assert console_script.main() == 0
    assert seen == [signal.SIG_IGN]


def test_a_local_clusters_child_stopped_as_it_loads_pscnn_cli_stops_as_a_started_one_does(tmp_path):
    """pscnn run's children ran ``python -m pscnn.cli``, which has no handler until pscnn.cli has
    loaded: a SIGTERM from the launcher (a pscnn run stopped as it started) in that tenth of a
    second killed the server (-15) before its checkpoint and its log's last line.  They run the
    console script's module now (``python -m pscnn``), which notes the stop and hands it to main():
    the server exits 0, as when it is stopped serving."""
    site = tmp_path / "site"            # a sitecustomize: the child inherits PYTHONPATH
    site.mkdir()
    (site / "sitecustomize.py").write_text(SIGNAL_AS_PSCNN_CLI_LOADS.format(sig=int(signal.SIGTERM)))
    cluster = LocalCluster(tmp_path / "run")
    cluster.env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), cluster.env.get("PYTHONPATH", "")])
    with cluster:
        proc = cluster.start("server", ["server", "--bind", "tcp://127.0.0.1:0", "--out", str(tmp_path / "run")])
        code = proc.wait(timeout=120)
    log = (tmp_path / "run" / "logs" / "server.log").read_text()
    assert code == 0, log
    assert "Traceback" not in log


# ------------------------------------------------ found by the audit, fixed

def test_a_signal_while_a_run_ended_early_stops_its_children_finishes_the_shutdown(run_in_process, capsys,
                                                                                  tmp_path):
    """The server exited 3, and a Ctrl-C (SIGTERM, SIGHUP) comes while the launcher stops the
    others: _ended_early ran outside the handler, so the stop was cut short with a bare
    "pscnn: interrupted" and the cluster's close() SIGKILLed every child.  Now it is an
    interrupt like any other: every child stopped, the server first, and the --resume hint."""
    out = tmp_path / "run"

    def server_failed(cluster, bar):
        out.mkdir(exist_ok=True)
        touch(out / "checkpoint.npz")
        interrupt_next_stop[0] = True
        return 3

    interrupt_next_stop = [False]
    real_stop_all = RecordingCluster.stop_all

    def stop_all(self, grace=10.0, order=("worker", "evaluator", "server"), on_kill=None):
        real_stop_all(self, grace, order, on_kill)
        if interrupt_next_stop[0]:
            interrupt_next_stop[0] = False
            raise KeyboardInterrupt
        return {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RecordingCluster, "stop_all", stop_all)
        code, cluster = run_in_process("--workers", "1", follow=server_failed)
    err = capsys.readouterr().err
    assert code == 130, err
    assert "pscnn: interrupted" not in err
    assert cluster.stops[-1] == ("server", "worker", "evaluator")
    assert err.strip().splitlines()[-1] == \
        f"pscnn run: stopped. Continue with the same command plus --resume (run folder {out})", err


def test_a_client_still_running_after_the_run_ended_is_stopped_and_named(run_in_process, capsys):
    """The server exited 0, but worker-0 had not exited --peer-timeout + 10 s later: it was
    reported as "exited with None" with its log, and left for close() to SIGKILL.  Now the
    launcher says it had not exited, stops it (SIGTERM first), prints the report and exits 1."""
    code, cluster = run_in_process("--workers", "2", "--peer-timeout", "1", codes={"worker-0": None})
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "pscnn run: worker-0 had not exited 11 s after the run ended; stopping it" in captured.err.splitlines()
    assert "None" not in captured.err
    assert cluster.stops == [("worker-0",)]
    assert "run finished: mode" in captured.out


def test_the_clients_share_one_deadline_to_exit(run_in_process, monkeypatch):
    """Each client waited up to --peer-timeout + 10 s of its own: five hung clients kept the
    launcher a minute.  The waits now share one deadline."""
    timeouts, clock = [], [1000.0]

    def wait(self, name, timeout):          # each client takes 10 s (of a simulated clock) to exit
        timeouts.append(timeout)
        clock[0] += 10.0
        return 0
    monkeypatch.setattr(RecordingCluster, "wait", wait)
    monkeypatch.setattr(launcher.time, "monotonic", lambda: clock[0])
    code, _ = run_in_process("--workers", "3", "--peer-timeout", "20")
    assert code == 0
    assert timeouts == [30.0, 20.0, 10.0, 0.0, 0.0]


def report_of(tmp_path, capsys, **summary) -> str:
    """print_report's text for SUMMARY with ``summary``'s fields in place."""
    (tmp_path / "summary.json").write_text(json.dumps({**SUMMARY, **summary}))
    launcher.print_report(tmp_path / "summary.json")
    return capsys.readouterr().out


def test_the_final_report_names_the_accuracy_milestones_never_reached(tmp_path, capsys):
    """A run that reached no milestone (or only some) had no time-to-accuracy line (or one naming
    only those reached), as if summary.json had no such field: now the others are said not reached."""
    evaluations = [{"seconds": 1.0, "version": 4, "test_accuracy": 0.93}]
    out = report_of(tmp_path, capsys, evaluations=evaluations, time_to_accuracy={})
    assert "  time to accuracy   90%, 95%, 98%, 99% not reached\n" in out
    out = report_of(tmp_path, capsys, evaluations=evaluations,
                    time_to_accuracy={"0.9": {"seconds": 1.04, "version": 4}})
    assert "  time to accuracy   90%: 1.0 s; 95%, 98%, 99% not reached  (the first evaluation at or above)\n" in out
    out = report_of(tmp_path, capsys, evaluations=[], time_to_accuracy={})     # nothing scored: no line
    assert "time to accuracy" not in out and "  evaluations        0\n" in out


def test_the_final_report_of_an_ssp_run_gives_its_staleness_bound(tmp_path, capsys):
    """summary.json's staleness_bound was left out of the report: the max staleness with nothing
    to hold it against.  Then "max 2 (bound 0)" read as a broken bound: the bound counts pushes
    ahead of the slowest worker, staleness versions, so each is named in its unit."""
    out = report_of(tmp_path, capsys, mode="ssp", staleness_bound=0, staleness={"mean": 0.97, "max": 2})
    assert ("  staleness          mean 0.97, max 2 versions (ssp: each worker at most 0 pushes ahead of the "
            "slowest)\n") in out
    out = report_of(tmp_path, capsys, staleness_bound=None)          # sync or async: no bound
    assert "  staleness          mean 0.00, max 0 versions\n" in out
    # it said "max 1 versions (... at most 1 pushes ...)"
    out = report_of(tmp_path, capsys, mode="ssp", staleness_bound=1, staleness={"mean": 0.5, "max": 1})
    assert ("  staleness          mean 0.50, max 1 version (ssp: each worker at most 1 push ahead of the "
            "slowest)\n") in out


def test_the_final_report_says_where_the_workers_time_went(tmp_path, capsys):
    """A sync round's waiting on its slowest member (and a round held up by a dead worker) showed
    only in timeline.png's title, or by summing metrics.jsonl's step records by hand: the report
    now gives the same split, from summary.json's worker_seconds (it read all of metrics.jsonl at
    the end, 31 s for a million step records).  0.52 s computing, 0.08 s network, 0.1 s waiting."""
    out = report_of(tmp_path, capsys, worker_seconds={"compute": 0.52, "network": 0.08, "server": 0.1})
    assert "  workers' time      74% computing, 11% network, 14% waiting on the server\n" in out, out
    # metrics.jsonl is not read: a step record's timeline there makes no line without the totals
    (tmp_path / "metrics.jsonl").write_text(json.dumps(
        {"kind": "step", "version": 1, "timeline": [["worker-0", 0.0, 0.1, 0.08]]}) + "\n")
    assert "workers' time" not in report_of(tmp_path, capsys)             # a summary from before the field
    assert "workers' time" not in report_of(tmp_path, capsys, worker_seconds=None)     # not known for the run
    no_push = {"compute": 0.0, "network": 0.0, "server": 0.0}
    assert "workers' time" not in report_of(tmp_path, capsys, worker_seconds=no_push)


def test_the_final_report_gives_the_staleness_counts(tmp_path, capsys):
    """The staleness histogram, whose shape experiments 2 and 3 teach (ssp's flat, async's peaked),
    was in summary.json only.  Past 8 entries the last ones are summed: a long async run of many
    workers has a key per staleness seen."""
    out = report_of(tmp_path, capsys, mode="ssp", staleness_bound=0,
                    staleness={"mean": 1.5, "max": 3, "histogram": {"0": 50, "1": 50, "2": 50, "3": 50}})
    assert "  staleness counts   0: 50, 1: 50, 2: 50, 3: 50  (versions stale: gradients applied)\n" in out, out
    histogram = {"0": 365, "1": 719, "2": 228, "3": 58, "4": 18, "5": 7, "6": 3, "7": 2, "9": 3, "10": 2, "11": 2}
    out = report_of(tmp_path, capsys, staleness={"mean": 1.1, "max": 11, "histogram": histogram})
    assert "  staleness counts   0: 365, 1: 719, 2: 228, 3: 58, 4: 18, 5: 7, 6: 3, 7+: 9  (" in out, out
    out = report_of(tmp_path, capsys, staleness={"mean": 0.0, "max": 0})      # no histogram: no line
    assert "staleness counts" not in out


def test_the_final_report_reads_n_a_for_a_figure_missing_true_or_nan(tmp_path, capsys):
    """The report checked its figures with isinstance(x, (int, float)), or not at all: a summary.json
    with a NaN loss printed "nan", an infinite throughput "inf", an ssp bound of true "at most True
    push", a per-class true "100.0%", and a null or missing figure raised TypeError or KeyError out
    of the report.  Each now reads "n/a" (as pscnn train's report does), and the rest is printed."""
    out = report_of(tmp_path, capsys, mode="ssp", staleness_bound=True, test_accuracy=True,
                    test_loss=float("nan"), updates=None, train_images_per_second=float("inf"),
                    per_class_accuracy=[True] + [0.5] * 9)
    assert "  staleness          mean 0.00, max 0 versions\n" in out, out
    assert "  test accuracy      n/a\n" in out and "  test loss          n/a\n" in out, out
    assert "  updates            n/a  (256 samples)\n" in out, out
    assert "  throughput         n/a images/s over 0.3 s\n" in out, out
    assert "per-class accuracy" not in out and "  results in " in out, out
    summary = {key: value for key, value in SUMMARY.items()
               if key not in ("workers", "samples_applied", "train_seconds", "test_accuracy")}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    launcher.print_report(tmp_path / "summary.json")
    out = capsys.readouterr().out
    assert "finished: mode sync, n/a workers, 1 epoch\n" in out and "  test accuracy      n/a\n" in out, out
    assert "  updates            4  (n/a samples)\n" in out and " images/s over n/a s\n" in out, out


def test_the_final_report_of_a_summary_with_values_of_the_wrong_kind_says_what_it_could_not_read(tmp_path, capsys):
    """time_to_accuracy, rejected_messages and the other objects were trusted: a summary.json by hand
    (or from another version) with a list there, a null, a string or NaN count raised AttributeError,
    TypeError or ValueError out of the report, a negative count printed "-4 messages refused", a NaN
    one "nan". Each is now read as missing, the rest printed, and the report names those it could not read."""
    evaluations = [{"seconds": 1.0, "version": 4, "test_accuracy": 0.96}]
    out = report_of(tmp_path, capsys, evaluations=evaluations, rejected_messages={"non_finite": "3"},
                    time_to_accuracy={"0.9": {"seconds": None}, "0.95": {"seconds": 2.0, "version": 4},
                                      "0.98": 5, "high": {"seconds": 1.0}})
    assert "  time to accuracy   95%: 2.0 s; 99% not reached  (the first evaluation at or above)\n" in out, out
    assert ("  could not read     rejected_messages, time_to_accuracy.0.9, time_to_accuracy.0.98, "
            "time_to_accuracy.high  (not what pscnn writes in summary.json)\n") in out, out
    out = report_of(tmp_path, capsys, evaluations=evaluations, time_to_accuracy=[0.9], lease_requeues=1,
                    rejected_messages={"not_leased": -4, "non_finite": float("nan")}, peers_dropped="many")
    assert "  faults             n/a declared dead, 1 lease requeued, 0 messages refused\n" in out, out
    assert "time to accuracy" not in out, out
    assert "  could not read     peers_dropped, rejected_messages, time_to_accuracy  (" in out, out
    out = report_of(tmp_path, capsys, evaluations=7, staleness=[1], per_class_accuracy=0.5, mode=3)
    assert "run finished: mode ?, 1 worker, 1 epoch\n" in out and "  staleness          mean n/a, max n/a " in out
    assert "  evaluations        n/a\n" in out and "  could not read     mode, staleness, evaluations, per_" in out, out
    assert "  results in " in out, out
    for text in ("[1, 2]", "[" * 100_000):       # no JSON object; nested too deep for json to read
        (tmp_path / "summary.json").write_text(text)
        launcher.print_report(tmp_path / "summary.json")
        assert capsys.readouterr().err.startswith("pscnn run: no summary (")


def test_the_final_report_of_a_summary_with_an_int_past_floats_range_reads_n_a(tmp_path, capsys):
    """json reads a 1 followed by 400 zeros as an int that float() cannot hold: the report's number
    checks raised OverflowError out of it.  Such a figure is unreadable as any other."""
    huge = 10**400
    out = report_of(tmp_path, capsys, updates=huge, test_loss=huge, staleness={"mean": huge, "max": 1})
    assert "  test loss          n/a\n" in out and "  updates            n/a  (256 samples)\n" in out, out
    assert "  staleness          mean n/a, max 1 version\n" in out, out
    assert "  could not read     test_loss, updates, staleness.mean  (" in out, out


def test_the_final_report_counts_agree_with_their_nouns(tmp_path, capsys):
    """A run of one update of one sample said "(1 samples)"."""
    out = report_of(tmp_path, capsys, workers=1, epochs=1, updates=1, samples_applied=1)
    assert "finished: mode sync, 1 worker, 1 epoch\n" in out and "  updates            1  (1 sample)\n" in out
    out = report_of(tmp_path, capsys, workers=2, epochs=2, updates=2, samples_applied=2)
    assert "finished: mode sync, 2 workers, 2 epochs\n" in out and "  updates            2  (2 samples)\n" in out


def test_the_final_report_on_a_closed_terminal_is_no_traceback(tmp_path, monkeypatch, capsys):
    """SIGHUP after the run finished, the terminal gone: print_report's writes raised EIO out
    of main() (a traceback); now the report is dropped, as _say drops its lines."""
    class GoneTerminal(io.StringIO):
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    monkeypatch.setattr(sys, "stdout", GoneTerminal())
    launcher.print_report(tmp_path / "summary.json")        # no exception


def test_pscnn_run_in_an_unfinished_runs_folder_says_how_pscnn_run_continues_it(run_in_process, tmp_path, capsys):
    """The warning printed by `pscnn run` before starting over told the user to 'stop this server and
    start it again with --resume (PSCNN_RESUME=1 in Compose)': the server's advice, not the run's."""
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(out / "checkpoint.npz", {}, {"step": 5, "extra": {"work": {"epoch": 0, "epochs": 1}}})
    code, _ = run_in_process("--workers", "1")
    err = capsys.readouterr().err
    assert code == 0, err
    [warning] = [line for line in err.splitlines() if "unfinished run" in line]
    assert warning.startswith(f"pscnn run: {out} holds the checkpoint of an unfinished run (version 5, ")
    assert warning.endswith("to continue that run instead, stop this run (Ctrl-C) and run the same command "
                            "plus --resume"), warning


@pytest.mark.parametrize("status", ["complete", "diverged"])
def test_ctrl_c_once_the_run_has_ended_exits_as_the_run_did(status, tmp_path, monkeypatch, capsys, mnist_file_names):
    """Ctrl-C while the clients of an ended run were exiting: the report, and 0 for a complete run.
    A diverged one exited 0 too, below "its results are complete", where it exits 1 uninterrupted."""
    out = tmp_path / "run"
    error = "training diverged: the last 8 pushes, from 2 trainers, had a NaN or Inf loss or gradient"

    def ended_then_interrupted(cluster, bar):
        out.mkdir(exist_ok=True)
        (out / "summary.json").write_text(json.dumps({
            "status": status, "error": error if status == "diverged" else None, "mode": "sync", "workers": 2,
            "epochs": 1, "updates": 5, "samples_applied": 640, "train_images_per_second": 100.0,
            "train_seconds": 6.4}))
        raise KeyboardInterrupt
    monkeypatch.setattr(launcher, "LocalCluster", NoProcesses)
    monkeypatch.setattr(launcher, "_follow", ended_then_interrupted)
    assert main(["run", "--model", "light", "--out", str(out), "--no-progress"]) == (1 if status == "diverged" else 0)
    captured = capsys.readouterr()
    said = ("the run had diverged before the interrupt; its report follows" if status == "diverged" else
            "the run had finished before the interrupt; its results are complete")
    assert f"pscnn run: {said}\n" in captured.err, captured.err
    assert ("run stopped" if status == "diverged" else "run finished") in captured.out


def test_ctrl_c_whose_checkpoint_could_not_be_written_says_so(tmp_path, monkeypatch, capsys, mnist_file_names):
    """Stopped by Ctrl-C, the server could not write its checkpoint (a full disk) and exited 1
    saying from which version --resume would continue: pscnn run said only "Continue with the same
    command plus --resume", as if nothing were lost."""
    out = tmp_path / "run"
    why = ("interrupted, and the checkpoint could not be written (checkpoint.npz: cannot write: No space left on "
           "device); --resume would continue from version 12, the last checkpoint written")

    class ServerExits1(LocalCluster):
        start_worker = start_evaluator = lambda self, *a, **k: None

        def start_server(self, *args, **kwargs):
            return StillRunning()

    def interrupted(cluster, bar):
        (cluster.logs / "server.log").write_text(f"12:00:00 WARNING server: interrupted\npscnn server: {why}\n")
        cluster.procs["server"] = subprocess.Popen([sys.executable, "-c", "import sys\nsys.exit(1)\n"])
        cluster.procs["server"].wait(30)
        raise KeyboardInterrupt
    monkeypatch.setattr(launcher, "LocalCluster", ServerExits1)
    monkeypatch.setattr(launcher, "_follow", interrupted)
    assert main(["run", "--model", "light", "--out", str(out), "--no-progress"]) == 130
    assert f"pscnn run: the server exited with 1: {why}\n" in capsys.readouterr().err


def test_the_report_names_trainers_dropped_for_nan_pushes(tmp_path, capsys):
    """A trainer dropped for NaN or Inf pushes exits 0, told to stop: the report's faults line said
    only that messages were refused, not that a worker had left the run."""
    summary = {"status": "complete", "mode": "async", "workers": 2, "epochs": 1, "updates": 10,
               "samples_applied": 640, "train_images_per_second": 100.0, "train_seconds": 6.4,
               "peers_dropped": {"dropped for NaN or Inf pushes": 1}, "lease_requeues": 8,
               "rejected_messages": {"non_finite": 8}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    launcher.print_report(tmp_path / "summary.json")
    assert ("  faults             0 declared dead, 1 trainer dropped for NaN or Inf pushes, 8 leases requeued, "
            "8 messages refused\n") in capsys.readouterr().out


def test_run_refuses_more_workers_than_this_machines_memory_holds_steps_of(monkeypatch, tmp_path):
    """Each worker checked its own step alone against the same free memory: 4 workers that each fit,
    but not together, all started, and the OOM killer ended some at their first batch.  Now pscnn run
    checks --workers steps at once before anything starts; GPU workers' memory is the GPU's."""
    from cnn_core import memory
    from cnn_core.errors import ConfigError
    from cnn_core.model import build_model
    need, layer, most = build_model("light").training_step_bytes(64)
    monkeypatch.setattr(memory, "available_memory", lambda: 3 * need)
    launcher.check_run_args(parse_args(["run", "--model", "light", "--workers", "3"]))
    with pytest.raises(ConfigError) as refused:
        launcher.check_run_args(parse_args(["run", "--model", "light", "--workers", "4"]))
    assert str(refused.value) == (
        f"--workers 4 and --batch-size 64: 4 training steps at once, on 64 images each, would take an estimated "
        f"{4 * need / 1e9:.2f} GB of memory (layer {layer!r} the most, {most / 1e9:.2f} GB a step), more than the "
        f"{3 * need / 1e9:.2f} GB available; fewer workers, a smaller batch or a smaller model need less; "
        "--no-memory-check (or PSCNN_NO_MEMORY_CHECK=1) skips this check")
    launcher.check_run_args(parse_args(["run", "--model", "light", "--workers", "4", "--device", "gpu"]))
    launcher.check_run_args(parse_args(["run", "--model", "light", "--workers", "4", "--no-memory-check"]))
    # --resume: the server's own model, built to resume, is checked instead
    monkeypatch.setattr(launcher, "ParameterServer", lambda cfg: SimpleNamespace(
        work=SimpleNamespace(done=False), final_eval=None, store=SimpleNamespace(model=build_model("light"))))
    with pytest.raises(ConfigError, match="^--workers 4 and --batch-size 64: 4 training steps at once"):
        launcher.run_from_args(parse_args(["run", "--model", "light", "--workers", "4", "--resume",
                                           "--out", str(tmp_path / "run"), "--mnist-dir", str(tmp_path / "none")]))


def test_run_no_memory_check_skips_its_check_and_its_workers(run_in_process, monkeypatch):
    """pscnn run --no-memory-check must skip its own check of --workers steps at once and hand the
    switch to its workers, whose own check would refuse the batch instead."""
    from cnn_core import memory
    monkeypatch.setattr(memory, "available_memory", lambda: 1)
    code, cluster = run_in_process("--workers", "2", "--no-memory-check")
    assert code == 0
    assert [name for name, flags in cluster.started.items() if "--no-memory-check" in flags] == ["worker-0", "worker-1"]
    code, _ = run_in_process("--workers", "2", "--no-memory-check", "--memory-check")    # the opposite undoes it
    assert code == 1 and len(RecordingCluster.made) == 1, "refused before a second cluster started"


FULL_BATCH_WARNING = ("--batch-size 1000000 exceeds the 640 training images: every update takes all 640 of them, "
                      "one batch an epoch (full-batch training)")


def test_a_batch_larger_than_the_training_set_is_said_once_and_the_summary_records_the_batch_trained(
        tmp_path, mnist_dir, caplog):
    """pscnn run (its server too) with --batch-size 1000000 --train-limit 640 trained silently as
    full-batch, each epoch one batch of 640, and its summary.json and the server's log said batches of
    1000000.  A warning now says so (once here, once in the server's log), and the summary records
    the batch of 640 it trained; its config, the flag as given."""
    import logging
    out = tmp_path / "run"
    code = main(["run", "--workers", "1", "--model", "light", "--batch-size", "1000000", "--train-limit", "640",
                 "--test-limit", "100", "--no-evaluator", "--no-progress", "--mnist-dir", mnist_dir, "--out", str(out)])
    assert code == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--batch-size" in r.getMessage()]
    assert said == [FULL_BATCH_WARNING]
    server_log = (out / "logs" / "server.log").read_text()
    assert server_log.count(FULL_BATCH_WARNING) == 1 and " 1 epoch x 1 batch of 640, " in server_log, server_log
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["batch_size"], summary["config"]["batch_size"], summary["updates"]) == (640, 1000000, 1)


def test_pscnn_run_draws_no_progress_bar_into_a_pipe(tmp_path, mnist_dir, capsys):
    """Without --no-progress, `pscnn run > run.log 2>&1` filled the log with the bar's redraws, one line
    of carriage returns, where pscnn train's bar is drawn only on a terminal."""
    code = main(["run", "--workers", "1", "--model", "light", "--train-limit", "640", "--test-limit", "100",
                 "--no-evaluator", "--mnist-dir", mnist_dir, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "\r" not in err and " batches [" not in err, err[-3000:]
