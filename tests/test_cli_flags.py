"""pscnn.cli and pscnn run: bad values are one line before anything starts; flags, PSCNN_*
variables and JSON configs combine as documented; `pscnn run` stops its children on SIGHUP.

Most tests parse only; the ones that start processes run `python -m pscnn.cli`, as
`pscnn run` starts its children, and kill whatever they started.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cnn_core.errors import ConfigError
from cnn_core.model import build_model, resolve_spec
from cnn_core.optim import build_optimizer
from pscnn import launcher
from server.config import config_from_args
from pscnn.cli import (
    DEFAULT_FINAL_EVAL_TIMEOUT,
    DEFAULT_STALENESS,
    MAX_FLOAT,
    MAX_POLL_SECONDS,
    OTHER_VARIABLES,
    CliError,
    build_parser,
    flag_variables,
    inline_model,
    inline_schedule,
    main,
    non_negative_float,
    optimizer_config,
    parse_args,
    poll_seconds,
    positive_float,
    resolve_auto_schedule,
)
from helpers import NoProcesses, StillRunning, exit_error_line

ROOT = Path(__file__).resolve().parents[1]


def cli(*argv, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m pscnn.cli ARGV`` in a clean environment (no PSCNN_* of the caller's)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PSCNN_")}
    base["PYTHONPATH"] = str(ROOT) + (os.pathsep + base["PYTHONPATH"] if base.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "pscnn.cli", *map(str, argv)], cwd=ROOT, capture_output=True,
                          check=False, text=True, timeout=timeout, env={**base, **(env or {})})


# ----------------------------------------------------------------- A: one CliError, run checks first

def _spec(*layers) -> str:
    return json.dumps({"input_shape": [1, 28, 28], "layers": [*layers, {"type": "flatten"},
                                                               {"type": "dense", "units": 10}]})


# Models the protocol cannot carry: they passed every check, then the server failed each hello or
# request with an internal error (ProtocolError), and the run died on its clients' failures.
UNSENDABLE = [
    (_spec(*[{"type": "flatten"}, {"type": "dense", "units": 10}] * 129),
     "'arrays' must be a list of at most 256 specs"),
    (_spec(*[{"type": "relu", "name": f"r{i:05d}_" + "x" * 40} for i in range(1200)]),
     "welcome header is"),
    (_spec({"type": "relu"}, {"type": "flatten"}, {"type": "dense", "units": 10, "name": "n" * 130}),
     "array name must be a non-empty string of at most 128 chars"),
]


@pytest.mark.parametrize("spec,needle", UNSENDABLE, ids=["arrays", "header", "name"])
def test_a_model_the_protocol_cannot_carry_is_refused_before_anything_starts(spec, needle, tmp_path, monkeypatch,
                                                                            mnist_file_names, capsys,
                                                                            server_must_not_serve):
    out = tmp_path / "run"
    proc = cli("run", "--model", spec, "--out", out, "--no-progress", "--workers", "1", timeout=120,
               env={"MNIST_DIR": mnist_file_names})
    exit_error_line(proc, 1, "pscnn: error: model spec: the server could not send this model to its workers: ",
                    alone=True)
    assert needle in proc.stderr and not out.exists()
    assert main(["server", "--model", spec, "--out", str(out), "--bind", "tcp://127.0.0.1:1"]) == 1
    assert needle in capsys.readouterr().err and not out.exists()


def test_a_model_of_the_wrong_output_width_is_refused_by_pscnn_run_before_anything_starts(tmp_path):
    """pscnn run checked the model with a copy of the server's checks that lacked this one: it made the
    run folder and started every child, and the server's exit 1 was the report.  MNIST_DIR names an
    empty folder: reading it, or starting the workers, would fail on that first."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    spec = json.dumps({"input_shape": [1, 28, 28], "layers": [{"type": "flatten"}, {"type": "dense", "units": 5}]})
    proc = cli("run", "--model", spec, "--out", out, "--no-progress", "--workers", "1", env={"MNIST_DIR": empty})
    exit_error_line(proc, 1, "pscnn: error: model spec: the last layer 'dense1' outputs 5 values, but MNIST has "
                    "10 classes", alone=True)
    assert not out.exists()


def test_pscnn_run_refuses_a_resume_or_a_port_it_cannot_use_before_it_looks_for_mnist(tmp_path):
    """--resume without a checkpoint and a --port taken were refused after the MNIST check, which
    downloads the files where MNIST_DIR is not set.  MNIST_DIR names an empty folder here, whose
    error came first."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    proc = cli("run", "--resume", "--out", out, "--no-progress", env={"MNIST_DIR": empty})
    exit_error_line(proc, 1, f"pscnn: error: --resume: no checkpoint at {out}/checkpoint.npz", alone=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("run", "--port", port, "--out", out, "--no-progress", env={"MNIST_DIR": empty})
    exit_error_line(proc, 1, f"pscnn: error: cannot bind tcp://127.0.0.1:{port}: ", "leave --port out",
                    alone=True)
    assert not out.exists()


def test_a_child_started_as_python_m_reports_a_bad_flag_in_one_line(tmp_path):
    # `python -m pscnn.cli` is __main__; the server imports pscnn.cli: two CliError classes before the fix
    proc = cli("server", "--schedule", "{bad", "--bind", f"tcp://127.0.0.1:{launcher.free_port()}",
               "--out", tmp_path / "run")
    exit_error_line(proc, 2, "pscnn: error: --schedule is not valid JSON", alone=True)


@pytest.mark.parametrize("flags,code,needle", [
    (["--schedule", "{bad"], 2, "--schedule is not valid JSON"),
    (["--model", '{"layers": 3}'], 1, "model spec"),
    (["--schedule", '{"name": "cosine", "warmup_steps": 5}'], 0, None),   # valid: gets past the checks
    (["--optimizer", "sgd", "--momentum", "0", "--nesterov"], 1, "nesterov=True needs momentum > 0"),
    (["--schedule", '{"name": "step", "step_size": 5, "gamma": 7}'], 1, "gamma must be in (0, 1]"),
    (["--schedule", "{}"], 1, "schedule config needs a 'name': one of ['constant', 'cosine', 'step']"),
    (["--schedule", '{"name": 3}'], 1, "schedule name must be a string"),
    (["--schedule", "[1]"], 2, "--schedule must be a name or a dict, got list"),
])
def test_pscnn_run_checks_model_schedule_and_optimizer_before_starting_anything(tmp_path, flags, code, needle,
                                                                                   monkeypatch, mnist_file_names):
    out = tmp_path / "run"
    if code == 0:       # stop right where the processes would start
        def no_cluster(*args, **kwargs):
            raise RuntimeError("checks passed")
        monkeypatch.setattr(launcher, "LocalCluster", no_cluster)
        with pytest.raises(RuntimeError, match="checks passed"):
            main(["run", *flags, "--out", str(out), "--no-progress"])
        return
    proc = cli("run", *flags, "--out", out, "--no-progress", timeout=120)
    exit_error_line(proc, code, needle, alone=True)
    assert not out.exists()              # no server, workers or logs were started


@pytest.mark.parametrize("flag,code", [("--schedule", 2), ("--model", 1)])
def test_json_nested_too_deeply_is_one_line(flag, code, tmp_path, capsys, mnist_file_names):
    # json's decoder raised RecursionError: a traceback
    deep = '{"name": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert main(["train", flag, deep, "--out", str(tmp_path / "run"), "--no-progress"]) == code
    what = "--schedule" if flag == "--schedule" else "model spec"
    assert capsys.readouterr().err.strip() == f"pscnn: error: {what} nests maps and lists more than 24 deep"


# A spec file: what a user keeps specs in.  `--model myspec.json` said "unknown model preset".
TINY_SPEC = {"input_shape": [1, 28, 28], "layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]}


def test_a_model_spec_file_is_read_and_passed_on_as_its_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("myspec.json").write_text(json.dumps(TINY_SPEC, indent=2))
    Path("tiny").write_text(json.dumps(TINY_SPEC))
    Path("light").write_text("not a spec")                 # a preset wins over a file of its name
    sub = tmp_path / "specs"
    sub.mkdir()
    (sub / "spec.txt").write_text(json.dumps(TINY_SPEC))
    for value in ("myspec.json", "tiny", f"{sub}/spec.txt", " myspec.json "):
        assert json.loads(inline_model(value)) == TINY_SPEC, value
    assert inline_model("light") == "light" and inline_model("nosuch") == "nosuch"  # an unknown preset, later
    assert inline_model(json.dumps(TINY_SPEC)) == json.dumps(TINY_SPEC)
    assert resolve_spec("myspec.json")["layers"][1]["units"] == 10                  # the library takes one too


def test_pscnn_run_hands_the_file_spec_to_its_server_as_json(tmp_path, monkeypatch, mnist_file_names):
    spec_file = tmp_path / "myspec.json"
    spec_file.write_text(json.dumps(TINY_SPEC, indent=2))
    flags = server_flags_of(monkeypatch, ["run", "--model", str(spec_file), "--out", str(tmp_path / "run"),
                                          "--no-progress"])
    assert json.loads(parse_args(["server", *flags], {}).model) == TINY_SPEC      # the spec, not a path


@pytest.mark.parametrize("name,content,needle", [
    ("nosuch.json", None, "nosuch.json: no such file"),
    ("sub/nosuch", None, "sub/nosuch: no such file"),
    ("folder.json", "folder", "folder.json is a folder, not a file"),
    ("bad.json", '{"input_shape": [1, 28, 28], "layers": [', "bad.json is not valid JSON: Expecting value"),
    ("list.json", "[1, 2]", "list.json must hold a JSON object"),
    ("big.json", "{" + " " * 70_000 + "}", "big.json is larger than 65,536 bytes"),
    ("binary.json", b"\xff\xfe{}", "binary.json is not UTF-8 text"),
    ("deep.json", '{"layers": ' + "[" * 20_000 + "]" * 20_000 + "}", "nests maps and lists more than 24 deep"),
])
def test_a_bad_model_spec_file_is_one_line_naming_it(name, content, needle, tmp_path, capsys):
    path = tmp_path / name
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert main(["train", "--model", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pscnn: error: model spec file {tmp_path}/") and needle in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_limit_above_the_sets_size_is_said_once_and_handed_on_capped(tmp_path, capsys, monkeypatch,
                                                                        mnist_file_names):
    # it was capped without a word: the summary showed 60,000 images for --train-limit 100000
    monkeypatch.setenv("PSCNN_TEST_LIMIT", "20000")
    flags = server_flags_of(monkeypatch, ["run", "--train-limit", "100000", "--out", str(tmp_path / "run"),
                                          "--no-progress"])
    server = parse_args(["server", *flags], {})
    assert (server.train_limit, server.test_limit) == (60000, 10000)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "pscnn: warning: --train-limit 100000 asks for more than the 60,000 training images: using all 60,000",
        "pscnn: warning: --test-limit (or PSCNN_TEST_LIMIT) 20000 asks for more than the 10,000 test images: "
        "using all 10,000"]


@pytest.mark.parametrize("command,layers,needle", [
    ("train", [{"type": "bogus"}], "unknown layer type 'bogus'"),
    ("run", [{"type": "dense"}], "dense 'dense1': missing option 'units'"),
    ("server", [{"type": "flatten"}, {"type": "dense", "units": 7}], "outputs 7 values, but MNIST has 10 classes"),
    ("bench", [{"type": "flatten"}, {"type": "dense", "units": 10}] * 129, "'arrays' must be a list of at most 256"),
])
def test_an_error_in_a_spec_files_model_names_the_file(command, layers, needle, tmp_path, capsys):
    # it said "model spec: ...", found after the file was read, as if the spec had been typed in
    path = tmp_path / "myspec.json"
    path.write_text(json.dumps({"input_shape": [1, 28, 28], "layers": layers}))
    argv = ["bench", "scaling"] if command == "bench" else [command]
    progress = [] if command == "server" else ["--no-progress"]
    # a bench's options are all checked before it starts, a usage error (exit 2), as its inline JSON is
    code, prefix = (2, "pscnn bench scaling") if command == "bench" else (1, "pscnn")
    assert main([*argv, "--model", str(path), "--out", str(tmp_path / "run"), *progress]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prefix}: error: model spec file {path}: ") and needle in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_preset_with_spaces_around_it_is_the_preset(monkeypatch):
    # PSCNN_MODEL="light " (an environment file's trailing space) was "unknown model preset 'light '"
    monkeypatch.setenv("PSCNN_MODEL", "light ")
    assert resolve_spec(parse_args(["server"]).model) == resolve_spec("light")
    assert resolve_spec(" seed") == resolve_spec("seed")


def test_a_schedule_file_is_read_and_passed_on_as_its_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    schedule = {"name": "cosine", "min_lr": 0.001, "warmup_steps": 3}
    Path("sched.json").write_text(json.dumps(schedule, indent=2))
    Path("step").write_text("not a schedule")               # a schedule's name wins over a file of its name
    args = parse_args(["run", "--schedule", "sched.json", "--out", str(tmp_path / "run")], environ={})
    assert json.loads(inline_schedule(args)) == schedule
    args.schedule = "step"
    assert inline_schedule(args) == "step"
    args = parse_args(["server", "--schedule", "sched.json"], environ={})
    args.schedule = inline_schedule(args)
    assert optimizer_config(args)["schedule"] == {**schedule, "total_steps": "auto"}


@pytest.mark.parametrize("content,flags,code,needle", [
    (None, [], 1, "no such file"),
    ("[1]", [], 1, "must hold a JSON object"),
    ('{"name": "step", "step_size": 5, "gamma": 7}', [], 1, "step schedule: gamma must be in (0, 1], got 7"),
    ('{"name": "cosine", "min_lr": 0.5}', ["--lr", "0.1"], 1, "min_lr must lie in [0, lr=0.1], got 0.5"),
    ('{"name": "cosine", "warmup_steps": 3}', ["--warmup-steps", "4"], 2, "--warmup-steps 4 contradicts"),
])
def test_an_error_in_a_schedule_file_names_the_file(content, flags, code, needle, tmp_path, capsys):
    path = tmp_path / "sched.json"
    if content is not None:
        path.write_text(content)
    assert main(["train", "--schedule", str(path), *flags, "--out", str(tmp_path / "run"), "--no-progress"]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pscnn: error: --schedule file {path}") and needle in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_spec_file_is_bounded_by_what_the_welcome_header_carries():
    from cnn_core.model import MAX_SPEC_FILE_BYTES
    from pscnn.protocol import MAX_HEADER_BYTES
    assert MAX_SPEC_FILE_BYTES == MAX_HEADER_BYTES


# ----------------------------------------------------------------- B: finite floats, capped

CAPS = {positive_float: MAX_FLOAT, non_negative_float: MAX_FLOAT, poll_seconds: MAX_POLL_SECONDS}


def _float_flags(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _float_flags(sub, (*path, name))
        elif action.type in CAPS:
            yield path, action.option_strings[0], CAPS[action.type]


FLOAT_FLAGS = list(_float_flags(build_parser()))


def test_every_float_flag_of_pscnn_is_range_checked():
    found = {(cmd[0], flag) for cmd, flag, _ in FLOAT_FLAGS}
    for expected in [("status", "--timeout"), ("run", "--eval-every"), ("run", "--peer-timeout"),
                     ("worker", "--compute-ms"), ("evaluator", "--every"), ("train", "--lr"), ("bench", "--seconds")]:
        assert expected in found
    # pscnn's own float flags all use the checked types (pscnn bench's own parsers are not pscnn.cli's)
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        if name != "bench":
            assert not [a.dest for a in sub._actions if a.type is float], name


@pytest.mark.parametrize("command,flag,cap", FLOAT_FLAGS, ids=[" ".join((*c, f)) for c, f, _ in FLOAT_FLAGS])
def test_float_flags_refuse_infinite_and_huge_values(command, flag, cap, capsys):
    parser = build_parser()
    cap_text = f"{cap:.0e}".replace("e+0", "e")         # 1e9, 1e6
    for bad in ("inf", "-inf", "nan", "1e300", repr(cap * 1.5)):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*command, f"{flag}={bad}"])     # = form: -inf is no option
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: must be" in err and "Traceback" not in err
        if not bad.startswith(("-", "nan")):
            assert f"must be a finite number at most {cap_text}, got {bad}" in err
    assert getattr(parser.parse_args([*command, flag, cap_text]), flag.lstrip("-").replace("-", "_")) == cap


@pytest.mark.parametrize("argv,needle", [
    (["status", "--timeout", "inf"], "argument --timeout: must be a finite number at most 1e6, got inf"),
    (["status", "--timeout", "1e300"], "argument --timeout: must be a finite number at most 1e6, got 1e300"),
    (["status", "--timeout", "1e9"], "argument --timeout: must be a finite number at most 1e6, got 1e9"),
    (["run", "--eval-every", "inf"], "argument --eval-every: must be a finite number at most 1e9"),
    (["run", "--peer-timeout", "inf"], "argument --peer-timeout: must be a finite number at most 1e9"),
])
def test_the_reported_infinite_values_are_usage_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, {})            # parsing only: without the check, main() would start the run
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_an_infinite_variable_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("PSCNN_TIMEOUT", "inf")
    assert main(["status"]) == 2
    assert capsys.readouterr().err.strip() == ("pscnn: error: PSCNN_TIMEOUT='inf': must be a finite number "
                                               "at most 1e6, got inf")


# ----------------------------------------------------------------- C: children get flags, not PSCNN_*

def test_children_do_not_inherit_pscnn_flag_variables(monkeypatch):
    for key, value in {"PSCNN_COMPUTE_MS": "1", "PSCNN_BATCH_SIZE": "7", "PSCNN_GIVE_UP_AFTER": "1",
                       "PSCNN_MODE": "async", "PSCNN_CACHE_DIR": "/cache", "PSCNN_MNIST_MIRRORS": "http://m/",
                       "MNIST_DIR": "/data", "PSCNN_EPOCH": "3"}.items():
        monkeypatch.setenv(key, value)
    env = launcher.child_env(threads=3)
    # a typo the launcher warned about is not warned about again in every child's log
    for key in ("PSCNN_COMPUTE_MS", "PSCNN_BATCH_SIZE", "PSCNN_GIVE_UP_AFTER", "PSCNN_MODE", "PSCNN_EPOCH"):
        assert key not in env
    assert env["PSCNN_CACHE_DIR"] == "/cache" and env["PSCNN_MNIST_MIRRORS"] == "http://m/"
    assert env["MNIST_DIR"] == "/data" and env["OPENBLAS_NUM_THREADS"] == "3"


def test_the_settings_that_are_no_flags_are_not_taken_for_flags():
    # every PSCNN_ name the code reads from the environment itself: each must survive child_env
    read = set()
    for folder in ("cnn_core", "server", "worker", "pscnn"):
        for path in (ROOT / folder).rglob("*.py"):
            read |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"'](PSCNN_\w+)", path.read_text()))
    assert {"PSCNN_CACHE_DIR", "PSCNN_MNIST_MIRRORS"} <= read
    assert not read & flag_variables()


def test_a_pscnn_name_that_is_no_setting_is_warned_about(capsys):
    # PSCNN_EPOCH=3 used to be ignored without a word: the run trained 1 epoch.  A flag of
    # another command (PSCNN_WORKERS) is no typo: a server container's healthcheck sees them.
    args = parse_args(["server"], {"PSCNN_EPOCH": "3", "PSCNN_FOO": "x", "pscnn_mode": "async",
                                   "PSCNN_WORKERS": "2", "PSCNN_CACHE_DIR": "/cache", "PSCNN_LR": ""})
    assert (args.epochs, args.mode) == (1, "sync")
    assert capsys.readouterr().err.splitlines() == [
        "pscnn: warning: PSCNN_EPOCH is not a pscnn setting (did you mean PSCNN_EPOCHS?); ignored",
        "pscnn: warning: PSCNN_FOO is not a pscnn setting; ignored",
        "pscnn: warning: pscnn_mode is not a pscnn setting (did you mean PSCNN_MODE?); ignored"]


@pytest.mark.parametrize("name, value, hint", [
    ("PSCNN_PROGRESS", "0", "did you mean PSCNN_NO_PROGRESS=1?"),     # it said PSCNN_NO_PROGRESS: the opposite
    ("PSCNN_PROGRESS", "off", "did you mean PSCNN_NO_PROGRESS=1?"),
    ("PSCNN_PROGRESS", "1", "did you mean PSCNN_NO_PROGRESS=0?"),
    ("PSCNN_PROGRES", "0", "did you mean PSCNN_NO_PROGRESS=1?"),      # misspelt too
    ("PSCNN_NO_OVERLAP", "yes", "did you mean PSCNN_OVERLAP=0?"),
    ("PSCNN_EVALUATOR", "false", "did you mean PSCNN_NO_EVALUATOR=1?"),
    ("PSCNN_PROGRESS", "maybe", "PSCNN_NO_PROGRESS=1 is --no-progress, PSCNN_NO_PROGRESS=0 is --progress"),
])
def test_a_switchs_opposite_as_a_variable_is_hinted_with_the_value_that_does_it(name, value, hint, capsys):
    """PSCNN_PROGRESS=0 (no progress bar, meant) was answered "did you mean PSCNN_NO_PROGRESS?", whose
    0 keeps the bar: the hint names the switch's variable with the value that does what was meant."""
    args = parse_args(["run"], {name: value})
    assert args.no_progress is False and args.overlap is False and args.no_evaluator is False    # ignored
    assert capsys.readouterr().err.splitlines() == [f"pscnn: warning: {name} is not a pscnn setting ({hint}); ignored"]


def test_every_pscnn_name_the_deployment_and_docs_mention_is_a_setting():
    # else a user who sets one as documented is told it is ignored; PSCNN_CI_*: the compose test's own knobs
    files = [ROOT / "Dockerfile", ROOT / "docker-compose.yml", ROOT / "docker-compose.ci.yml", ROOT / "README.md",
             *(ROOT / "docs").glob("*.md"), *(p for d in ("cnn_core", "server", "worker", "pscnn")
                                             for p in (ROOT / d).rglob("*.py"))]
    mentioned = {name for path in files for name in re.findall(r"\bPSCNN_[A-Z0-9_]*[A-Z0-9]", path.read_text())}
    unknown = {n for n in mentioned - flag_variables() - OTHER_VARIABLES if not n.startswith("PSCNN_CI_")}
    assert "PSCNN_SERVER_HOST" in mentioned and not unknown


# ----------------------------------------------------------------- D: SIGHUP

def _children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return state != "Z" and b"-m\0pscnn" in cmdline       # python -m pscnn ..., a child of pscnn run


@pytest.mark.slow
def test_sighup_stops_every_child_with_a_checkpoint(tmp_path, mnist_dir):
    out, port = tmp_path / "run", launcher.free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PSCNN_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pscnn.cli", "run", "--workers", "2", "--mode", "async", "--model", "light",
         "--train-limit", "640", "--test-limit", "256", "--epochs", "1000", "--mnist-dir", mnist_dir,
         "--out", str(out), "--port", str(port), "--no-progress", "--checkpoint-every", "0"],
        cwd=ROOT, env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: set[int] = set()
    try:
        def training():
            status = launcher.query_status(f"tcp://127.0.0.1:{port}", timeout=0.5)
            return status is not None and status.get("batches_done", 0) > 0
        launcher.wait_for(training, 120, "training to start")
        children = _children(proc.pid)
        assert len(children) == 4               # server, 2 workers, evaluator
        proc.send_signal(signal.SIGHUP)         # the terminal closed
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        left = [pid for pid in children if _alive(pid)]
        for pid in left:                        # orphans (the defect): never leave them running
            os.kill(pid, signal.SIGKILL)
    assert not left, f"children left running after SIGHUP: {left}"
    assert proc.returncode == 130, err[-3000:]
    assert (out / "checkpoint.npz").exists()
    assert "interrupted: writing a checkpoint" in (out / "logs" / "server.log").read_text()
    assert "Continue with the same command plus --resume" in err


# ----------------------------------------------------------------- E: the JSON schedule's warmup_steps

def schedule(argv, environ=None) -> dict:
    return optimizer_config(parse_args(argv, environ or {}))["schedule"]


def test_a_json_schedules_warmup_steps_wins_over_the_flags_default():
    assert schedule(["train", "--schedule", '{"name": "constant", "warmup_steps": 100}']) == \
        {"name": "constant", "warmup_steps": 100}
    assert schedule(["train", "--schedule", '{"name": "constant", "warmup_steps": 0}']) == \
        {"name": "constant", "warmup_steps": 0}
    # the same value twice is no conflict; the default still applies where the JSON says nothing
    assert schedule(["train", "--schedule", '{"name": "constant", "warmup_steps": 7}', "--warmup-steps", "7"]) == \
        {"name": "constant", "warmup_steps": 7}
    assert schedule(["train", "--schedule", "constant"]) == {"name": "constant", "warmup_steps": 10}
    assert schedule(["train", "--warmup-steps", "0", "--schedule", "constant"]) == {"name": "constant"}
    assert schedule(["train"]) == {"name": "cosine", "total_steps": "auto", "warmup_steps": 10}


def test_named_schedules_take_their_lengths_from_the_run():
    """``--schedule step`` and ``cosine`` name no length: it is the run's, known only once its size is."""
    assert schedule(["train", "--schedule", "step"]) == {"name": "step", "step_size": "auto", "warmup_steps": 10}
    step = optimizer_config(parse_args(["train", "--schedule", "step"], {}))
    assert resolve_auto_schedule(step, 300)["schedule"]["step_size"] == 100        # decay at 1/3 and 2/3
    cosine = optimizer_config(parse_args(["train"], {}))
    assert resolve_auto_schedule(cosine, 300)["schedule"]["total_steps"] == 300
    assert resolve_auto_schedule(cosine, 0)["schedule"]["total_steps"] == 1
    # a JSON cosine or step without its length spans the run too: it was "missing required key(s)"
    cosine = optimizer_config(parse_args(["train", "--schedule", '{"name": "cosine", "min_lr": 0.001}'], {}))
    assert resolve_auto_schedule(cosine, 300)["schedule"] == {"name": "cosine", "min_lr": 0.001,
                                                              "total_steps": 300, "warmup_steps": 10}
    step = optimizer_config(parse_args(["train", "--schedule", '{"name": "step", "gamma": 0.5}'], {}))
    assert resolve_auto_schedule(step, 300)["schedule"]["step_size"] == 100
    given = optimizer_config(parse_args(["train", "--schedule", '{"name": "step", "step_size": 7}'], {}))
    assert resolve_auto_schedule(given, 300)["schedule"]["step_size"] == 7
    build_optimizer(resolve_auto_schedule(cosine, 300))


@pytest.mark.parametrize("updates", [3, *range(5, 40), 938])
def test_the_named_step_schedule_decays_twice_whatever_the_runs_length(updates):
    """--schedule step: "10x down at 1/3 and 2/3 of the run".  A third rounded down (938 updates, one
    epoch of MNIST in batches of 64: step_size 312) decayed a third time for the last updates.
    Every length from 5 decays exactly twice; 4 cannot with equal steps (a step of 1 decays three
    times), and decays once."""
    step = resolve_auto_schedule(optimizer_config(parse_args(["train", "--schedule", "step", "--warmup-steps", "0",
                                                              "--lr", "1"], {})), updates)
    opt = build_optimizer(step)
    rates = [opt.schedule(k) for k in range(updates)]
    assert sorted(set(rates), reverse=True) == pytest.approx([1.0, 0.1, 0.01])
    assert rates[-1] == pytest.approx(0.01)


def test_a_warm_up_longer_than_the_run_is_warned_about(caplog):
    """The rate reaches --lr at warm-up step warmup_steps - 1: a longer warm-up never got there, silently."""
    for argv in (["--warmup-steps", "33"], ["--schedule", '{"name": "constant", "warmup_steps": 33}']):
        opt_cfg = optimizer_config(parse_args(["train", *argv], {}))
        with caplog.at_level(logging.WARNING, logger="pscnn"):
            resolve_auto_schedule(opt_cfg, 33)          # its last update runs at the full rate
            assert not caplog.records
            resolve_auto_schedule(opt_cfg, 32)
        assert [r.getMessage() for r in caplog.records] == [
            "a warm-up of 33 updates is longer than the run's 32: the learning rate never reaches its base rate "
            "(lower --warmup-steps, or the --schedule's warmup_steps)"]
        caplog.clear()


def test_the_default_warm_up_is_not_warned_about_on_a_short_run(caplog):
    """A smoke run of 4 updates is shorter than the default 10-update warm-up: no mistake to report."""
    opt_cfg = optimizer_config(parse_args(["train"], {}))
    assert opt_cfg["schedule"]["warmup_steps"] == 10
    with caplog.at_level(logging.WARNING, logger="pscnn"):
        resolve_auto_schedule(opt_cfg, 4)
    assert not caplog.records


def test_a_cosine_that_ends_before_the_run_is_warned_about(caplog):
    """Past total_steps a cosine stays at min_lr: at the default 0, the rest of the run learned nothing."""
    def warnings(schedule_json: str, total_updates: int) -> list[str]:
        caplog.clear()
        opt_cfg = optimizer_config(parse_args(["train", "--schedule", schedule_json, "--warmup-steps", "0"], {}))
        with caplog.at_level(logging.WARNING, logger="pscnn"):
            resolve_auto_schedule(opt_cfg, total_updates)
        return [r.getMessage() for r in caplog.records]
    assert warnings('{"name": "cosine", "total_steps": 100}', 300) == [
        "the cosine schedule's total_steps 100 is shorter than the run's 300 updates: the learning rate is 0 "
        "for the last 200 (leave total_steps out to span the run, or set a min_lr)"]
    assert warnings('{"name": "cosine", "total_steps": 300}', 300) == []
    assert warnings('{"name": "cosine", "total_steps": 100, "min_lr": 0.001}', 300) == []    # a floor: intended
    assert warnings("cosine", 300) == [] and warnings("step", 300) == []
    # a total_steps of 0 is refused: it was warned about first ("the run's 1 updates"), then the error
    assert warnings('{"name": "cosine", "total_steps": 0}', 1) == []
    with pytest.raises(ConfigError, match="total_steps must be >= 1, got 0"):
        build_optimizer(resolve_auto_schedule(optimizer_config(parse_args(
            ["train", "--schedule", '{"name": "cosine", "total_steps": 0}'], {})), 1))


def test_pscnn_run_warns_of_a_long_warm_up_once(tmp_path, monkeypatch, caplog, mnist_file_names):
    # --resume checked the server's config a second time, and warned twice
    def no_cluster(*args, **kwargs):
        raise RuntimeError("checks passed")
    monkeypatch.setattr(launcher, "LocalCluster", no_cluster)
    # no checkpoint to resume from here: a server resumed to the middle of a run
    model = build_model("light")        # (for the check of the workers' memory)
    monkeypatch.setattr(launcher, "ParameterServer", lambda cfg: SimpleNamespace(
        work=SimpleNamespace(done=False), final_eval=None, store=SimpleNamespace(model=model)))
    with caplog.at_level(logging.WARNING, logger="pscnn"), pytest.raises(RuntimeError, match="checks passed"):
        main(["run", "--model", "light", "--train-limit", "640", "--batch-size", "64", "--warmup-steps", "1000",
              "--resume", "--out", str(tmp_path / "run"), "--no-progress"])
    warnings = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert len(warnings) == 1 and "longer than the run's 10:" in warnings[0], warnings


def test_a_benchmarks_server_flags_warn_of_a_long_warm_up_once(tmp_path, caplog, mnist_file_names):
    from pscnn.bench.common import check_server_flags
    with caplog.at_level(logging.WARNING, logger="pscnn"):
        check_server_flags(["--model", "light", "--train-limit", "640", "--warmup-steps", "1000",
                            "--out", str(tmp_path / "unused")], workers=2)
    assert [r.getMessage() for r in caplog.records].count(
        "a warm-up of 1000 updates is longer than the run's 10: the learning rate never reaches its base rate "
        "(lower --warmup-steps, or the --schedule's warmup_steps)") == 1


def test_pscnn_run_hands_the_json_warmup_to_its_server_untouched():
    args = parse_args(["run", "--schedule", '{"name": "constant", "warmup_steps": 100}'], {})
    server_argv = ["server", *launcher.flags_from(args, launcher.SERVER_FLAGS)]
    assert schedule(server_argv) == {"name": "constant", "warmup_steps": 100}


def test_pscnn_run_hands_its_children_values_that_begin_with_a_dash(tmp_path, monkeypatch, mnist_file_names):
    """``--out=-run``: each child got ``--out -run``, which its parser took for a flag of its own, and
    refused (exit 2) after pscnn run had started them all."""
    monkeypatch.chdir(tmp_path)
    Path("-mnist").symlink_to(mnist_file_names)
    started = {}

    class Recording(launcher.LocalCluster):
        def start(self, name, argv, prefix=()):
            started[name] = argv
            if name == "evaluator":             # the last one: nothing was started
                raise RuntimeError("every child's command line made")
            if name == "server":                # listening, as it would say: the clients start next
                Path(parse_args(argv, {}).endpoint_file).write_text("tcp://127.0.0.1:1\n")
            return StillRunning()
    monkeypatch.setattr(launcher, "LocalCluster", Recording)
    with pytest.raises(RuntimeError, match="every child's command line made"):
        main(["run", "--out=-run", "--mnist-dir=-mnist", "--curve", "--workers", "1", "--model", "light",
              "--no-progress"])
    assert sorted(started) == ["evaluator", "server", "worker-0"]
    children = {name: parse_args(argv, {}) for name, argv in started.items()}
    assert (children["server"].out, children["server"].mnist_dir) == ("-run", "-mnist")
    for name in ("worker-0", "evaluator"):
        assert (children[name].mnist_dir, children[name].keys) == ("-mnist", f"-run/keys/{name}")


@pytest.mark.parametrize("argv,environ", [
    (["--warmup-steps", "5"], {}),
    ([], {"PSCNN_WARMUP_STEPS": "5"}),
])
def test_an_explicit_warmup_that_contradicts_the_json_is_an_error(argv, environ, capsys, monkeypatch, tmp_path):
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--schedule", '{"name": "constant", "warmup_steps": 100}', *argv,
                 "--mnist-dir", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == ("pscnn: error: --warmup-steps 5 contradicts --schedule's "
                                               "warmup_steps 100: give one of them")


# ----------------------------------------------------------------- F: the command line wins

def test_the_command_line_wins_over_a_bad_variable():
    environ = {"PSCNN_BATCH_SIZE": "abc", "PSCNN_NESTEROV": "maybe"}
    args = parse_args(["train", "--batch-size", "32", "--nesterov"], environ)
    assert args.batch_size == 32 and args.nesterov is True
    assert parse_args(["train", "--batch-size=16", "--nesterov"], environ).batch_size == 16
    with pytest.raises(CliError, match=r"PSCNN_BATCH_SIZE='abc': must be an integer, got 'abc'"):
        parse_args(["train", "--nesterov"], environ)
    with pytest.raises(CliError, match=r"PSCNN_NESTEROV='maybe': expected one of 1/0"):
        parse_args(["train", "--batch-size", "32"], environ)


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("Yes", True), (" on ", True),
                                            ("0", False), ("false", False), ("NO", False), ("off", False)])
def test_a_boolean_variable_sets_or_clears_its_flag(value, expected):
    """Containers set switches as PSCNN_RESUME=1 (or true, yes, on); =0 (or false, no, off) leaves them off."""
    assert parse_args(["server"], {"PSCNN_RESUME": value}).resume is expected
    assert parse_args(["run"], {"PSCNN_NO_EVALUATOR": value}).no_evaluator is expected
    assert parse_args(["run", "--no-evaluator"], {"PSCNN_NO_EVALUATOR": value}).no_evaluator is True


def _switches(parser: argparse.ArgumentParser, command: tuple = ()):
    """(the subcommand's words, a boolean flag's action) for every switch of every subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _switches(sub, (*command, name))
        elif action.nargs == 0 and action.dest != "help":
            yield command, action


def test_every_switch_has_an_opposite_that_wins_over_its_variable(capsys):
    """PSCNN_NO_PROGRESS=1 (or any true switch variable) could not be undone on the command line,
    which wins over every other variable."""
    switches = list(_switches(build_parser()))
    assert {("run", "no_evaluator"), ("train", "no_progress"), ("bench", "scaling", "overlap")} <= {
        (*command, action.dest) for command, action in switches}
    for command, action in switches:
        variable = "PSCNN_" + action.dest.upper()
        on, off = action.option_strings
        assert vars(parse_args([*command, off], {variable: "1"}))[action.dest] is False, (command, off)
        assert vars(parse_args([*command, on], {variable: "0"}))[action.dest] is True, (command, on)
        assert vars(parse_args([*command, on, off]))[action.dest] is False, (command, on, off)   # the last one wins
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "a flag on the command line wins" in " ".join(capsys.readouterr().out.split())


def test_a_bad_variable_does_not_break_help(capsys, monkeypatch):
    monkeypatch.setenv("PSCNN_BATCH_SIZE", "abc")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    assert "usage: pscnn train" in capsys.readouterr().out


def test_a_bad_variable_under_a_given_flag_lets_the_command_run(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PSCNN_BATCH_SIZE", "abc")
    empty = tmp_path / "no-mnist"
    empty.mkdir()
    # gets past the flags to the data check (exit 1), not stopped by the variable (exit 2)
    assert main(["train", "--batch-size", "32", "--mnist-dir", str(empty), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "PSCNN_BATCH_SIZE" not in err and str(empty) in err


# ----------------------------------------------------------------- G: flags the optimizer would drop

@pytest.mark.parametrize("argv,environ,needle", [
    (["train", "--optimizer", "adam", "--nesterov", "--momentum", "0.5"], {},
     "is used only by --optimizer sgd, not by --optimizer adam"),
    (["train", "--optimizer", "adam", "--nesterov"], {}, "--nesterov is used only by --optimizer sgd"),
    (["train", "--optimizer", "sgd", "--weight-decay", "0.1"], {},
     "--weight-decay is used only by --optimizer adamw, not by --optimizer sgd"),
    (["run", "--mode", "async", "--weight-decay", "0.1"], {},
     "--weight-decay is used only by --optimizer adamw, not by --optimizer auto, which is adam for --mode async"),
    (["train", "--weight-decay", "0.1"], {},
     "--weight-decay is used only by --optimizer adamw, not by --optimizer auto, which is sgd for pscnn train"),
    (["server", "--optimizer", "rmsprop"], {"PSCNN_MOMENTUM": "0.5"}, "--momentum"),
])
def test_flags_the_optimizer_does_not_use_are_errors(argv, environ, needle, monkeypatch):
    refused_in_settings(optimizer_config, argv, environ, needle, monkeypatch)


def refused_in_settings(settings, argv, environ, needle, monkeypatch) -> None:
    """``settings`` (what a command builds from its flags) of ``argv`` under ``environ``: a CliError saying ``needle``."""
    for key, value in environ.items():
        monkeypatch.setenv(key, value)       # the message names the variable only when it is set
    with pytest.raises(CliError, match=re.escape(needle)):
        settings(parse_args(argv, environ))


@pytest.mark.parametrize("argv", [
    ["run", "--mode", "async"], ["train", "--optimizer", "adam"], ["train", "--optimizer", "adamw",
                                                                   "--weight-decay", "0.1"],
    ["run", "--mode", "async", "--momentum", "0.5"], ["train", "--optimizer", "sgd", "--nesterov"],
    ["server", "--mode", "ssp", "--nesterov"],
])
def test_defaults_and_flags_the_optimizer_uses_are_fine(argv):
    optimizer_config(parse_args(argv, {}))


def test_a_dropped_optimizer_flag_is_a_usage_error(tmp_path, capsys):
    assert main(["train", "--optimizer", "adam", "--momentum", "0.5", "--mnist-dir", str(tmp_path),
                 "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == ("pscnn: error: --momentum is used only by --optimizer sgd, "
                                               "not by --optimizer adam")


@pytest.mark.parametrize("argv,environ,needle", [
    (["server", "--staleness", "3"], {}, "--staleness bounds --mode ssp only, not --mode sync"),
    (["run", "--mode", "async", "--staleness", "0"], {}, "--staleness bounds --mode ssp only, not --mode async"),
    (["server", "--mode", "sync"], {"PSCNN_STALENESS": "4"},
     "--staleness (or PSCNN_STALENESS) bounds --mode ssp only, not --mode sync"),
])
def test_staleness_outside_ssp_is_an_error(argv, environ, needle, monkeypatch):
    # it used to be ignored without a word: a sync run with --staleness 3 ran as BSP
    refused_in_settings(config_from_args, argv, environ, needle, monkeypatch)


@pytest.mark.parametrize("argv,environ,needle", [
    (["run", "--no-evaluator"], {"PSCNN_EVAL_EVERY": "5"},
     "--eval-every (or PSCNN_EVAL_EVERY) sets the evaluator's period, and --no-evaluator starts none"),
    (["run", "--final-eval-timeout", "3"], {"PSCNN_NO_EVALUATOR": "1"},
     "--final-eval-timeout waits for the evaluator's final report, and --no-evaluator (or PSCNN_NO_EVALUATOR)"),
    (["run"], {"PSCNN_OVERLAP": "yes"}, "--overlap (or PSCNN_OVERLAP) applies to --mode async only, not to --mode sync"),
    (["run", "--workers", "3"], {"PSCNN_MAX_WORKERS": "2"}, "--workers 3 exceeds --max-workers (or PSCNN_MAX_WORKERS) 2"),
    (["run"], {"PSCNN_WAIT_FOR_WORKERS": "2000"}, "--wait-for-workers (or PSCNN_WAIT_FOR_WORKERS) 2000 exceeds"),
])
def test_run_flags_refused_together_name_the_variable_a_value_came_from(argv, environ, needle, monkeypatch):
    # `pscnn run` alone was refused for an --overlap the user never typed
    refused_in_settings(launcher.check_run_args, [*argv, "--model", "light"], environ, needle, monkeypatch)


@pytest.mark.parametrize("bench,variable,value,needle", [
    ("scaling", "PSCNN_WORKERS", "0", "--workers (or PSCNN_WORKERS): every value must be >= 1, got 0"),
    ("server", "PSCNN_CLIENTS", "x", "--clients (or PSCNN_CLIENTS): 'x' is not a valid int"),
    ("time-to-accuracy", "PSCNN_MODE", "bogus", "--mode (or PSCNN_MODE): 'bogus' is not one of sync, async, ssp"),
])
def test_a_bad_bench_list_from_a_variable_names_the_variable(bench, variable, value, needle, tmp_path, capsys,
                                                             monkeypatch):
    # `pscnn bench scaling` alone was refused for a --workers never typed
    monkeypatch.setenv(variable, value)
    assert main(["bench", bench, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"pscnn bench {bench}: error: {needle}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,environ,seconds", [
    (["server"], {}, 60.0),
    (["server", "--wait-for-workers", "2", "--start-timeout", "5"], {}, 5.0),
    (["run", "--start-timeout", "5"], {}, 5.0),                       # pscnn run waits for its --workers
    (["server"], {"PSCNN_WAIT_FOR_WORKERS": "3", "PSCNN_START_TIMEOUT": "7"}, 7.0),
])
def test_start_timeout_bounds_the_wait_for_workers(argv, environ, seconds):
    assert config_from_args(parse_args(argv, environ)).start_timeout == seconds


@pytest.mark.parametrize("argv,environ,needle", [
    (["server", "--start-timeout", "5"], {}, "--start-timeout bounds the wait for --wait-for-workers trainers"),
    (["run", "--wait-for-workers", "0", "--start-timeout", "5"], {}, "this server waits for none"),
    (["server", "--wait-for-workers", "0"], {"PSCNN_START_TIMEOUT": "5"}, "--start-timeout (or PSCNN_START_TIMEOUT)"),
])
def test_start_timeout_without_workers_to_wait_for_is_an_error(argv, environ, needle, monkeypatch):
    # it was ignored without a word: the server started at once
    refused_in_settings(config_from_args, argv, environ, needle, monkeypatch)


@pytest.mark.parametrize("argv,environ,bound", [
    (["server", "--mode", "ssp"], {}, DEFAULT_STALENESS),
    (["server", "--mode", "ssp", "--staleness", "0"], {}, 0),
    (["run", "--mode", "ssp"], {"PSCNN_STALENESS": "5"}, 5),
    (["server", "--mode", "async"], {"PSCNN_STALENESS": ""}, DEFAULT_STALENESS),    # compose's ${VAR:-}: unset
])
def test_staleness_is_ssp_bound(argv, environ, bound):
    assert config_from_args(parse_args(argv, environ)).staleness == bound


@pytest.mark.parametrize("argv,seconds", [(["server"], DEFAULT_FINAL_EVAL_TIMEOUT),
                                          (["server", "--final-eval-timeout", "0"], 0.0),
                                          (["run", "--final-eval-timeout", "7.5"], 7.5)])
def test_final_eval_timeout_defaults_to_the_servers(argv, seconds):
    assert config_from_args(parse_args(argv, {})).final_eval_timeout == seconds


def test_pscnn_run_refuses_staleness_outside_ssp_before_starting_anything(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--staleness", "3", "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == "pscnn: error: --staleness bounds --mode ssp only, not --mode sync"
    assert not out.exists()


@pytest.mark.parametrize("argv,environ", [(["server", "--log-level", "debug"], {}),
                                          (["worker"], {"PSCNN_LOG_LEVEL": "Debug"})])
def test_the_log_level_may_be_given_in_any_case(argv, environ):
    # 'debug' was refused: "invalid choice: 'debug' (choose from 'DEBUG', ...)"
    assert parse_args(argv, environ).log_level == "DEBUG"


# ----------------------------------------------------------------- H: messages

def test_run_more_workers_than_max_workers_names_workers(tmp_path):
    out = tmp_path / "run"
    proc = cli("run", "--workers", "3", "--max-workers", "1", "--out", out, "--no-progress", timeout=120)
    exit_error_line(proc, 2, "--workers 3 exceeds --max-workers 1", alone=True)
    assert "--wait-for-workers" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("command", ["train", "run", "server"])
def test_out_naming_a_file_says_so(command, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main([command, "--out", str(a_file), "--mnist-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"pscnn: error: --out {a_file} is a file, not a folder"


@pytest.mark.parametrize("command", ["train", "run", "server"])
def test_out_under_a_file_says_so_before_mnist_is_read(command, tmp_path, capsys, monkeypatch, server_must_not_serve):
    """A file among --out's parents was "cannot write: Not a directory" only where the folder was
    made: after the training set was read (train), the test set read and the port bound (server),
    the MNIST folder checked (run).  MNIST_DIR names an empty folder here, whose error came first."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MNIST_DIR", str(empty))
    out = a_file / "sub" / "run"
    assert main([command, "--out", str(out), *(["--no-progress"] if command != "server" else [])]) == 1
    assert capsys.readouterr().err.strip() == f"pscnn: error: --out {out}: {a_file} is a file, not a folder"


def test_train_refuses_the_folder_of_an_unfinished_distributed_run(tmp_path, capsys, mnist_file_names):
    # it replaced that run's config.json and metrics.jsonl, and its summary.json made the checkpoint look
    # finished: the next `pscnn run` there started over, replacing the checkpoint without a warning
    from cnn_core.checkpoint import save_checkpoint
    out = tmp_path / "run"
    save_checkpoint(out / "checkpoint.npz", {}, {"step": 7, "extra": {"work": {"epoch": 0, "epochs": 3}}})
    (out / "metrics.jsonl").write_text('{"kind": "step"}\n')
    assert main(["train", "--model", "light", "--out", str(out), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"pscnn: error: --out {out} holds the checkpoint of an unfinished distributed run, whose config.json "
        "and metrics.jsonl pscnn train would replace: choose another --out, or continue that run with "
        "pscnn run (or server) --resume")
    assert (out / "metrics.jsonl").read_text() == '{"kind": "step"}\n' and not (out / "config.json").exists()


def test_run_refuses_a_folder_another_process_writes_before_starting_anything(tmp_path, capsys, monkeypatch,
                                                                              mnist_file_names):
    # its server refused the folder, but only after the clients had started and the logs had gone into
    # the other run's logs/: several lines of that run's server log, then the error
    from cnn_core.runlog import RunWriter

    def no_cluster(*args, **kwargs):
        raise RuntimeError("processes started")
    monkeypatch.setattr(launcher, "LocalCluster", no_cluster)
    out = tmp_path / "run"
    with RunWriter(out, {}):                # another run's server, writing the folder
        assert main(["run", "--model", "light", "--out", str(out), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"pscnn: error: {out}: another pscnn process (pid {os.getpid()}) is writing this run folder; "
        "choose another --out, or stop that process first")
    assert not (out / "logs").exists()


@pytest.mark.parametrize("argv", [["train", "--mnist-dir", ""], ["run", "--mnist-dir", ""],
                                  ["server", "--mnist-dir", " "], ["worker", "--mnist-dir", ""],
                                  ["evaluator", "--mnist-dir", ""], ["download", "--dir", ""],
                                  ["train", "--out", ""]])
def test_empty_paths_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, {})            # parsing only: without the check, main() would start the command
    assert exc.value.code == 2
    assert f"argument {argv[1]}: must name a folder, got an empty string" in capsys.readouterr().err


def test_port_zero_means_a_free_port_as_a_flag_and_as_a_variable():
    assert parse_args(["run", "--port", "0"], {}).port == 0
    assert parse_args(["run"], {"PSCNN_PORT": "0"}).port == 0
    assert parse_args(["run"], {"PSCNN_PORT": "65535"}).port == 65535


def test_a_tilde_in_a_path_variable_means_home(monkeypatch, tmp_path):
    """A shell expands ~ on a command line, not in an environment file: PSCNN_OUT=~/runs/a."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_args(["train"], {"PSCNN_OUT": "~/runs/a"}).out == str(tmp_path / "runs" / "a")
    assert parse_args(["server"], {"PSCNN_MNIST_DIR": "~/mnist"}).mnist_dir == str(tmp_path / "mnist")


def test_an_empty_variable_still_means_the_default():
    assert parse_args(["train"], {"PSCNN_MNIST_DIR": ""}).mnist_dir is None


def test_a_choice_from_the_environment_is_taken_without_its_spaces():
    # an environment file's trailing space: PSCNN_MODE="async " was refused ("expected one of sync, ...")
    args = parse_args(["server"], {"PSCNN_MODE": "async ", "PSCNN_OPTIMIZER": " sgd", "PSCNN_LOG_LEVEL": "debug\t"})
    assert (args.mode, args.optimizer, args.log_level) == ("async", "sgd", "DEBUG")
    with pytest.raises(CliError, match=r"PSCNN_MODE='asink ': expected one of sync, async, ssp"):
        parse_args(["server"], {"PSCNN_MODE": "asink "})


def server_flags_of(monkeypatch, argv: list) -> list:
    """The flags ``pscnn run`` (``argv``) hands its server, which is not started (nor is anything else)."""
    started = []

    class ServerOnly(NoProcesses):
        def start_server(self, flags):
            started.append(flags)
            raise RuntimeError("server started")
    monkeypatch.setattr(launcher, "LocalCluster", ServerOnly)
    with pytest.raises(RuntimeError, match="server started"):
        main(argv)
    return started[0]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_interrupted_run_offers_resume_only_with_a_checkpoint(checkpointed, tmp_path, monkeypatch, capsys,
                                                              mnist_file_names):
    out = tmp_path / "run"

    def interrupted(cluster, bar):
        if checkpointed:                # the server wrote one before it stopped
            out.mkdir(exist_ok=True)
            (out / "checkpoint.npz").write_bytes(b"")
        raise KeyboardInterrupt
    monkeypatch.setattr(launcher, "LocalCluster", NoProcesses)
    monkeypatch.setattr(launcher, "_follow", interrupted)
    assert main(["run", "--model", "light", "--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert ("--resume" in err) == checkpointed, err
    if not checkpointed:
        assert "stopped before the first checkpoint; the same command starts the run again" in err


def test_an_old_runs_checkpoint_is_no_reason_to_resume(tmp_path, monkeypatch, capsys, mnist_file_names):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes(b"")               # left by an earlier run, not --resume'd

    def interrupted(cluster, bar):
        raise KeyboardInterrupt
    monkeypatch.setattr(launcher, "LocalCluster", NoProcesses)
    monkeypatch.setattr(launcher, "_follow", interrupted)
    assert main(["run", "--model", "light", "--out", str(out), "--no-progress"]) == 130
    stopped = capsys.readouterr().err.split("interrupted")[-1]     # (the start-over warning may name --resume)
    assert "stopped before the first checkpoint" in stopped and "--resume" not in stopped, stopped


def test_ctrl_c_before_the_first_update_reports_no_problem_to_fix(tmp_path, monkeypatch, capsys, mnist_file_names):
    # the server's checkpoint of version 0 got the hint meant for failed workers ("once what is reported
    # above is fixed"), while nothing was reported: the user had pressed Ctrl-C
    from cnn_core.checkpoint import save_checkpoint
    out = tmp_path / "run"

    def interrupted(cluster, bar):
        save_checkpoint(out / "checkpoint.npz", {}, {"step": 0})       # written at the start barrier
        raise KeyboardInterrupt
    monkeypatch.setattr(launcher, "LocalCluster", NoProcesses)
    monkeypatch.setattr(launcher, "_follow", interrupted)
    assert main(["run", "--model", "light", "--out", str(out), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "pscnn run: stopped before the first update, with nothing to continue; the same command starts the "
        f"run again from the beginning (run folder {out})")
