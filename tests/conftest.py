"""Shared fixtures: the MNIST folder and local multi-process clusters."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    """The real MNIST folder (``MNIST_DIR``, as CI sets it); skip if there is none."""
    path = os.environ.get("MNIST_DIR")
    if not path or not Path(path).is_dir():
        pytest.skip("MNIST_DIR is not set to a folder holding MNIST (CI sets it to ../shared/mnist)")
    return path


@pytest.fixture
def cluster(tmp_path, mnist_dir):
    """A LocalCluster in a temporary run folder; every process it started is killed afterwards."""
    from pscnn.launcher import LocalCluster
    c = LocalCluster(tmp_path / "run")
    yield c
    c.close()
