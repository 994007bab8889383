"""What the test modules share: an error as the user sees it, one line naming the problem; a
process interrupted with Ctrl-C at the right moment, and one started so that Ctrl-C reaches it;
the check that a test's mid-run action did come mid-run; the records of an evaluation history
that set a new best; a count of the models a check builds; arrays with one flaw, for the fuzz tests.

A module, not conftest.py: conftest holds fixtures, and pytest does not mean it to be imported.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from pscnn.launcher import wait_for


def one_line_naming(message, *needles) -> str:
    """``message`` (a string, or an exception: its str()) is one line that holds each needle (str()
    of each: a path will do).  Returns it."""
    message = str(message)
    assert message and "\n" not in message, message
    for needle in map(str, needles):
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# A line in which pscnn reports an error: "pscnn: error: ", or argparse's "pscnn COMMAND: error: ".  Not
# a line that quotes one (pscnn bench's progress line on a run whose worker failed).
REPORTS_AN_ERROR = re.compile(r"pscnn( [\w-]+)*: error: ")


def error_line(stderr: str, *needles, starts: str = "pscnn: error: ", alone: bool = False) -> str:
    """The error line that ends ``stderr``, checked: no traceback, no other line reports an error
    (argparse's usage lines, a log or progress may stand above it; with ``alone``, nothing may), it
    starts with ``starts`` and holds each needle.  Returns it."""
    tail = stderr[-3000:]
    assert "Traceback" not in stderr, tail
    lines = stderr.strip().splitlines()
    assert lines and [line for line in lines if REPORTS_AN_ERROR.match(line)] == lines[-1:], tail
    assert len(lines) == 1 or not alone, tail
    assert lines[-1].startswith(starts), tail
    return one_line_naming(lines[-1], *needles)


def exit_error_line(proc: subprocess.CompletedProcess, code: int, *needles, **how) -> str:
    """``proc`` exited ``code``, and its stderr ends with the error line (:func:`error_line`, ``how`` its
    keywords).  Returns the line."""
    assert proc.returncode == code, \
        f"exit {proc.returncode}, expected {code}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return error_line(proc.stderr, *needles, **how)


def popen_taking_ctrl_c(argv: list, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(argv, **kwargs)`` for a child the test stops with SIGINT, as Ctrl-C would.

    A test run started in the background (``nohup make test &``, a script's ``make test &``) ignores
    SIGINT, and a child inherits that: Python then sets no Ctrl-C handler, and the SIGINT never
    reached it (a worker ran on to its --give-up-after).  A handled signal is back at its default
    in a child after exec, so a handler here for the moment of the start gives the child SIGINT as
    a terminal's foreground process has it."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(argv, **kwargs)
    finally:
        signal.signal(signal.SIGINT, before)


def interrupt_when(proc: subprocess.Popen, predicate, timeout: float, what: str) -> str:
    """Ctrl-C (SIGINT) on ``proc`` once ``predicate()`` holds; its stderr.  Killed if anything fails.
    ``proc``: started by :func:`popen_taking_ctrl_c`, else a test run in the background never stops it."""
    try:
        wait_for(predicate, timeout, what, interval=0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return err


def raced(action: str, how_far: str) -> str:
    """Why a test whose ``action`` must come mid-run fails when the run got to its end first."""
    return (f"the run raced the test to its end: {how_far} by the time the test {action}, which must come "
            "mid-run; the run is too short for this machine")


def assert_training_goes_on(status: dict | None, action: str, batches_left: int = 1) -> dict:
    """``status``: the server's answer to a status request sent after the test's ``action``, which must
    come mid-run, with at least ``batches_left`` batches still to apply.  Returns it.

    Training not over by that answer was not over when the test acted.  A run that is over had
    outrun the test (a quick run on an idle machine, the test's polls slow on a loaded one), and
    what the test checks next would not be about ``action``: it fails here, naming the race."""
    if status is None:
        raise AssertionError(f"the server did not answer a status request after the test {action}: "
                             "it had exited (the run over?) or hung")
    if status["done"] or status["batches_total"] - status["batches_done"] < batches_left:
        raise AssertionError(raced(action, f"{status['batches_done']} of {status['batches_total']} batches "
                                           f"were applied (at least {batches_left} must be left)"))
    return status


def assert_training_had_not_finished(server_log: str, action: str) -> None:
    """``server_log``, read after the test's ``action`` (which may have killed the server): the server
    had not finished training when the test acted (it logs "training finished: N updates, ..." at
    the moment it has)."""
    if "training finished: " in server_log:
        raise AssertionError(raced(action, "the server had finished training"))


def new_bests(history: list[dict]) -> list[dict]:
    """The evaluation records of ``history`` that set a new best test accuracy, in order of seconds."""
    best, bests = -1.0, []
    for e in sorted(history, key=lambda e: e["seconds"]):
        if e["test_accuracy"] > best:
            best = e["test_accuracy"]
            bests.append(e)
    return bests


class StillRunning:
    """A started process's stand-in, running: what a stand-in of LocalCluster.start_server returns (pscnn
    run starts the clients once it returns a server still running)."""
    returncode = None

    def poll(self):
        return None


class NoProcesses:
    """LocalCluster's surface for ``pscnn run`` (launcher.run_from_args), starting nothing."""

    def __init__(self, out, port=None, threads=1, keys=None, peer_timeout=None):
        self.out, self.logs, self.endpoint, self.procs = Path(out), Path(out) / "logs", "tcp://127.0.0.1:1", {}
        self.keys, self.peer_timeout = keys, peer_timeout

    start_worker = start_evaluator = lambda self, *a, **k: None

    def start_server(self, *args, **kwargs):
        return StillRunning()

    def stop_all(self, *a, **k):
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def counted_model_builds(monkeypatch) -> list:
    """The models ``server.server.checked_store`` builds from now on (the launcher's import of it too),
    by name: each build is a model's and its optimizer's random initialization (4-5 s for 26 million
    parameters), so a check should build once."""
    import server.server as server_module  # noqa: PLC0415  (heavy: only the tests that count)
    from pscnn import launcher  # noqa: PLC0415
    built = []
    real_checked_store = server_module.checked_store

    def counted(cfg):
        built.append(cfg.model)
        return real_checked_store(cfg)
    monkeypatch.setattr(server_module, "checked_store", counted)
    monkeypatch.setattr(launcher, "checked_store", counted)
    return built


# What with_one_flaw does to one array: a NaN or -Inf in it, cast to float64, one element too many,
# dropped, or (to the dict) an array of a name the model does not have.
ARRAY_FLAWS = ("nan", "inf", "float64", "shape", "missing", "unknown")


def with_one_flaw(draw, arrays: dict, flaws) -> tuple[dict, str | None]:
    """(a copy of ``arrays`` with the flaw drawn from ``flaws`` in an array drawn from it, the flaw),
    for a hypothesis strategy (``draw``): what a fuzz test sends as weights or gradients.  A flaw
    of ARRAY_FLAWS is made here; any other (None: none) is the caller's to make.  The arrays are
    never written: a flawed one is a new array."""
    arrays = dict(arrays)
    name = draw(st.sampled_from(sorted(arrays)))
    flaw = draw(st.sampled_from(flaws))
    if flaw in ("nan", "inf"):
        arrays[name] = arrays[name].copy()
        arrays[name].reshape(-1)[draw(st.integers(0, arrays[name].size - 1))] = np.nan if flaw == "nan" else -np.inf
    elif flaw == "float64":
        arrays[name] = arrays[name].astype(np.float64)
    elif flaw == "shape":
        arrays[name] = np.zeros(arrays[name].size + 1, np.float32)
    elif flaw == "missing":
        del arrays[name]
    elif flaw == "unknown":
        arrays[draw(st.text(min_size=1, max_size=8).filter(lambda n: n not in arrays))] = np.zeros(1, np.float32)
    return arrays, flaw


def lose_a_stop_signal(command: str, sig: int = signal.SIGTERM) -> list:
    """A SIGTERM (or ``sig``: Ctrl-C's SIGINT) to ``command`` whose stop is lost, as one was while a
    module loaded: the handler's exception raised inside importlib's module-lock weakref callback,
    where Python prints "Exception ignored" and goes on.  Returns what went to sys.unraisablehook."""
    from pscnn import cli
    cli.stop_on_signals()               # as pscnn.cli.main does: first with no command, then with it
    cli.stop_on_signals(command)
    lost, before = [], sys.unraisablehook
    sys.unraisablehook = lost.append

    class ModuleLock:
        pass
    lock = ModuleLock()
    ref = weakref.ref(lock, lambda _ref: signal.getsignal(sig)(sig, None))
    try:
        del lock
    finally:
        sys.unraisablehook = before
    stop = SystemExit if command in cli.STOPPED_WITH_SUCCESS and sig != signal.SIGINT else KeyboardInterrupt
    assert ref() is None and [type(u.exc_value) for u in lost] == [stop], lost
    return lost
