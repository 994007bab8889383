"""Shared fixtures: the MNIST folder and local multi-process clusters."""
from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest

# hypothesis writes a cache (.hypothesis/constants/) in the working folder even with database=None:
# a test run left it in the clone.  It reads this variable when it first writes, after this conftest
# is loaded; the folder goes when the test run's interpreter exits.
_HYPOTHESIS_STORAGE = tempfile.TemporaryDirectory(prefix="pscnn-tests-hypothesis-")
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", _HYPOTHESIS_STORAGE.name)


@pytest.fixture(autouse=True)
def stop_handlers_restored():
    """A test that calls pscnn.cli.main in this process leaves no handler of its command's (see
    pscnn.cli.stop_on_signals) to turn the test run's own SIGTERM or SIGHUP into a SystemExit, nor
    its Ctrl-C handler (pscnn.cli.interrupt_noted), nor
    the note of a stop it raised (pscnn.cli.stop_raised)."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)
    from pscnn import cli
    del cli._stops_raised[:]            # nor a stop it raised, which the server and clients would take up


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    """The real MNIST folder (``MNIST_DIR``, as CI sets it); skip if there is none."""
    path = os.environ.get("MNIST_DIR")
    if not path or not Path(path).is_dir():
        pytest.skip("MNIST_DIR is not set to a folder holding MNIST (CI sets it to ../shared/mnist)")
    return path


@pytest.fixture
def mnist_file_names(tmp_path, monkeypatch) -> str:
    """MNIST_DIR set to a folder holding the four MNIST file names, empty: what `pscnn run`, the
    server and the evaluator check before they start (that the files are there), for tests
    that stop before any data is read.  They then pass with no MNIST and no network too."""
    from cnn_core.data import MNIST_FILES
    folder = tmp_path / "mnist-file-names"
    folder.mkdir()
    for spec in MNIST_FILES.values():
        (folder / spec["filename"]).write_bytes(b"")
    monkeypatch.setenv("MNIST_DIR", str(folder))
    return str(folder)


@pytest.fixture
def cluster(tmp_path, mnist_dir):
    """A LocalCluster in a temporary run folder; every process it started is killed afterwards."""
    from pscnn.launcher import LocalCluster
    c = LocalCluster(tmp_path / "run")
    yield c
    c.close()


@pytest.fixture
def server_must_not_serve(monkeypatch):
    """For tests of a check that must refuse before the server binds: should the check let the
    run through, ParameterServer.serve() fails the test at once.  Their ``--bind`` names a port
    no server holds (tcp://127.0.0.1:1), which root may bind: without this, a broken check left
    the in-process server serving there until pytest's timeout."""
    from server.server import ParameterServer

    def fail(self):
        pytest.fail("the server passed its checks and began serving: the check under test did not refuse")
    monkeypatch.setattr(ParameterServer, "serve", fail)
