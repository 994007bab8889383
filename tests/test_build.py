"""How pscnn is set up on a fresh machine: the Makefile's .venv, the package's metadata.

The Makefile tests run `make` on a copy of the Makefile and pyproject.toml in a temporary
folder, with pip cut off from every index: nothing is downloaded.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def make(repo: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`make ARGS` in ``repo`` with this Python as PYTHON (a command: quoted, its path may hold a space)
    and pip offline (no index, no config)."""
    empty = repo.parent / "no-wheels"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "MAKE", "MFLAGS", "MNIST_DIR", "VENV", "PYTHON"))}  # nor an outer make's
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(["make", "--no-print-directory", *args, f"PYTHON={shlex.quote(sys.executable)}"], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def repo(tmp_path) -> Path:
    """The Makefile and pyproject.toml, and a .venv installed from them: a venv whose pip is a
    stand-in (an empty package; nothing here installs), stamped after pyproject.toml."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    venv = repo / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "pip").mkdir(parents=True)
    (site / "pip" / "__init__.py").write_text("")
    stamp = venv / ".installed"
    stamp.touch()
    t = (repo / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (t, t))
    return repo


@needs_make
def test_make_leaves_a_working_venv_alone(repo):
    proc = make(repo, "-n", "venv")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout, proc.stdout + proc.stderr


def test_make_checks_the_python_pyproject_requires():
    requires = re.search(r'^requires-python = ">=(\d+)\.(\d+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    checked = re.search(r"sys.version_info < \((\d+), (\d+)\)", (ROOT / "Makefile").read_text())
    assert requires and checked and requires.groups() == checked.groups()


@needs_make
def test_make_remakes_a_venv_whose_python_is_gone(repo):
    # The Python the .venv was made from was removed (or upgraded away): its bin/python
    # dangled, yet the stamp said "installed", and every target failed with "No such file".
    for python in (repo / ".venv" / "bin").glob("python*"):
        python.unlink()
        python.symlink_to("/nonexistent/python3")
    proc = make(repo, "-n", "venv")
    assert proc.returncode == 0 and "-m venv" in proc.stdout, proc.stdout + proc.stderr


@needs_make
def test_make_remakes_a_half_created_venv(repo):
    # `python -m venv` interrupted (or failing, as Debian's without python3-venv does) leaves a
    # .venv with a python and no pip: every later make stopped at "No module named pip".
    shutil.rmtree(repo / ".venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(repo / ".venv")], check=True, timeout=60)
    proc = make(repo, "venv", timeout=300)
    assert "making .venv" in proc.stdout, proc.stdout + proc.stderr
    # the install itself needs the package index, cut off here: only the new .venv is checked
    pip = subprocess.run([str(repo / ".venv" / "bin" / "python"), "-m", "pip", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert pip.returncode == 0, proc.stdout + proc.stderr + pip.stderr


@needs_make
def test_make_refuses_to_remove_a_folder_that_is_no_venv(repo):
    (repo / "not-a-venv").mkdir()
    (repo / "not-a-venv" / "keep").write_text("mine")
    proc = make(repo, "venv", "VENV=not-a-venv")
    assert proc.returncode != 0 and (repo / "not-a-venv" / "keep").exists()
    assert "not-a-venv is not a virtual environment" in proc.stderr, proc.stderr


@needs_make
def test_make_clean_removes_every_generated_thing_but_no_source_or_data(repo):
    """`make clean` left build/ (setuptools' build tree), dist/ and the __pycache__ folders."""
    generated = ["build/lib/pscnn/cli.py", "dist/pscnn-0.1.tar.gz", "pscnn.egg-info/PKG-INFO",
                 "pscnn/__pycache__/cli.cpython-311.pyc", ".pytest_cache/README.md", ".hypothesis/constants/0",
                 "runs/make-run/summary.json"]
    kept = ["pscnn/cli.py", "tests/test_x.py"]
    data = repo.parent / "shared" / "mnist" / "train-images-idx3-ubyte.gz"      # the build machines' MNIST
    for name in [*generated, *kept]:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    data.parent.mkdir(parents=True)
    data.write_text("x")
    proc = make(repo, "clean")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["Makefile", "pscnn", "pyproject.toml", "tests"]
    assert all((repo / name).exists() for name in kept) and data.exists()
    assert not (repo / "pscnn" / "__pycache__").exists()


def run_ci(tmp_path, shared_mnist: bool, download: str | None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """.ci/run in a copy of the project with stand-ins for make, python3, ip and iptables (nothing is
    installed or run), ../shared/mnist there or not, and ``pscnn download`` printing ``download``
    (None: failing).  Returns (the process, the make commands it ran, each with its MNIST_DIR)."""
    project, bin_dir, log = tmp_path / "project", tmp_path / "bin", tmp_path / "make.log"
    (project / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", project / ".ci" / "run")
    if shared_mnist:
        (tmp_path / "shared" / "mnist").mkdir(parents=True)
        (tmp_path / "shared" / "mnist" / "train-images-idx3-ubyte.gz").write_text("x")
    (project / ".venv" / "bin").mkdir(parents=True)
    scripts = {bin_dir / "make": f'echo "$* MNIST_DIR=${{MNIST_DIR-unset}}" >> {shlex.quote(str(log))}',
               bin_dir / "python3": "exit 0", bin_dir / "ip": "exit 0", bin_dir / "iptables": "exit 0",
               project / ".venv" / "bin" / "pscnn": f"echo {shlex.quote(download)}" if download else
               "echo 'pscnn: error: every mirror failed' >&2; exit 1"}
    for path, body in scripts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(project / ".ci" / "run")], env=env, capture_output=True, text=True,
                          timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_ci_without_the_shared_mnist_downloads_it_or_says_it_has_none(tmp_path):
    """.ci/run set MNIST_DIR to ../shared/mnist even where there was none: every test that reads
    MNIST then failed on a missing folder, instead of CI downloading it or saying so."""
    proc, made = run_ci(tmp_path / "none", shared_mnist=False, download=None)
    assert proc.returncode == 1 and made == ["venv MNIST_DIR=unset"], proc.stdout + proc.stderr + str(made)
    assert proc.stderr.strip().splitlines()[-1].startswith(".ci/run: no MNIST: ../shared/mnist is missing")
    proc, made = run_ci(tmp_path / "download", shared_mnist=False, download="/cache/pscnn/mnist")
    assert proc.returncode == 0 and made[-2:] == ["test MNIST_DIR=/cache/pscnn/mnist",
                                                  "compose-test MNIST_DIR=/cache/pscnn/mnist"], made
    proc, made = run_ci(tmp_path / "shared", shared_mnist=True, download=None)
    shared = tmp_path / "shared" / "shared" / "mnist"
    assert proc.returncode == 0 and made == [f"test MNIST_DIR={shared}", f"compose-test MNIST_DIR={shared}"], made


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:                                     # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression_setuptools_keeps_building():
    # `license = { text = "MIT" }` made setuptools warn on every install that from 2027-02-18
    # it builds such a project no more; the SPDX string needs setuptools >= 77 to build.
    config = pyproject()
    assert config["project"]["license"] == "MIT" and config["project"]["license-files"] == ["LICENSE"]
    assert "setuptools>=77" in config["build-system"]["requires"]


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, each on one line (continuations joined, comments dropped)."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [" ".join(i.split()) for i in "\n".join(lines).replace("\\\n", " ").splitlines() if i.strip()]


def test_the_image_installs_the_dependencies_and_the_fast_extra():
    """The image's requirements, as its build writes them from pyproject.toml: the run-time
    dependencies and the `fast` extra (threadpoolctl: without it a worker's products run whole)."""
    run = next(ins for ins in dockerfile_instructions() if "requirements.txt" in ins and "tomllib" in ins)
    code = re.search(r'python -c "(.*?)" >/tmp/requirements.txt', run).group(1)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    project = pyproject()["project"]
    assert out.split() == project["dependencies"] + project["optional-dependencies"]["fast"]
    assert any(req.startswith("threadpoolctl") for req in out.split())


def test_the_image_installs_its_dependencies_before_it_copies_the_source():
    # `COPY . .` came first: any edit (a README line) invalidated the layer that installs
    # numpy and pyzmq, and every rebuild downloaded and installed them again.
    build = dockerfile_instructions()
    build = build[:next(i for i, ins in enumerate(build) if ins.startswith("FROM ") and i > 1)]
    copy_all = build.index("COPY . .")
    before = build[:copy_all]
    assert [ins for ins in before if ins.startswith(("COPY", "ADD"))] == ["COPY pyproject.toml ./"], before
    assert any("pip install" in ins and "requirements" in ins for ins in before), before
    assert any("pip install" in ins and "--no-deps ." in ins for ins in build[copy_all:]), build
