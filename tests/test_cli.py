"""pscnn.cli: how flags and PSCNN_* variables become an optimizer config (no processes)."""
import argparse
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnn_core import metrics, training
from worker import evaluator, trainer
from pscnn.cli import DEFAULT_LR, apply_env_defaults, build_parser, main, optimizer_config, parse_args
from helpers import error_line


def config(argv, environ=None):
    parser = build_parser()
    if environ is not None:
        apply_env_defaults(parser, environ)
    return optimizer_config(parser.parse_args(argv))


@pytest.mark.parametrize("argv,name,lr", [
    (["train"], "sgd", 0.02),
    (["server", "--mode", "sync"], "sgd", 0.04),          # an update averages every worker's batch
    (["run"], "sgd", 0.04),                               # sync is the default mode
    (["run", "--mode", "sync", "--optimizer", "sgd"], "sgd", 0.04),
    (["run", "--mode", "sync", "--lr", "0.01"], "sgd", 0.01),
    (["server", "--mode", "sync", "--optimizer", "adagrad"], "adagrad", 0.01),
    (["run", "--mode", "async"], "adam", 0.001),          # stale gradients: Adam by default
    (["server", "--mode", "ssp"], "adam", 0.001),
    (["run", "--mode", "async", "--momentum", "0.5"], "sgd", 0.02),   # momentum asked for: SGD
    (["run", "--mode", "async", "--nesterov"], "sgd", 0.02),
    (["run", "--mode", "sync", "--optimizer", "adam"], "adam", 0.001),
    (["train", "--optimizer", "adagrad"], "adagrad", 0.01),
    (["run", "--mode", "async", "--lr", "0.005"], "adam", 0.005),
    (["server", "--mode", "ssp", "--optimizer", "sgd"], "sgd", 0.02),     # only sync averages a round's batches
    (["run", "--mode", "async", "--optimizer", "sgd"], "sgd", 0.02),
])
def test_auto_optimizer_and_per_optimizer_learning_rate(argv, name, lr):
    cfg = config(argv)
    assert cfg["name"] == name and cfg["lr"] == lr
    if name == "sgd":
        assert cfg["momentum"] == (0.5 if "0.5" in argv else 0.9)
        assert cfg["nesterov"] == ("--nesterov" in argv)
    else:
        assert "momentum" not in cfg


def test_no_memory_check_is_a_switch_of_every_command_that_checks_memory(monkeypatch):
    """A batch the memory estimate refused could not be trained on at all; each command that checks
    (pscnn train, worker, run) takes --no-memory-check, or PSCNN_NO_MEMORY_CHECK=1, and a worker
    hands it to its Trainer."""
    from cnn_core.memory import SKIP_FLAG, SKIP_VARIABLE
    assert (SKIP_FLAG, SKIP_VARIABLE) == ("--no-memory-check", "PSCNN_NO_MEMORY_CHECK")   # what the refusal names
    for command in ("train", "worker", "run"):
        assert parse_args([command], environ={}).no_memory_check is False
        assert parse_args([command, SKIP_FLAG], environ={}).no_memory_check is True
        assert parse_args([command], environ={SKIP_VARIABLE: "1"}).no_memory_check is True
    given = {}
    monkeypatch.setattr(trainer, "run_trainer", lambda *args, **kwargs: given.update(kwargs) or 0)
    trainer.run_trainer_from_args(parse_args(["worker", SKIP_FLAG], environ={}))
    assert given["check_memory"] is False


def test_environment_sets_the_optimizer_like_flags():
    assert config(["run", "--mode", "async"], {"PSCNN_OPTIMIZER": "sgd"})["name"] == "sgd"
    assert config(["server", "--mode", "async"], {"PSCNN_MOMENTUM": "0.7"})["momentum"] == 0.7


def test_adamw_gets_the_weight_decay_given_and_its_own_default_otherwise():
    assert config(["train", "--optimizer", "adamw", "--weight-decay", "0.1"])["weight_decay"] == 0.1
    assert config(["server", "--optimizer", "adamw"], {"PSCNN_WEIGHT_DECAY": "0.2"})["weight_decay"] == 0.2
    assert "weight_decay" not in config(["train", "--optimizer", "adamw"])     # AdamW's default (0.01)


def test_every_optimizer_has_a_default_rate():
    parser = build_parser()
    choices = next(a.choices for a in parser._subparsers._group_actions[0].choices["train"]._actions
                   if a.dest == "optimizer")
    assert set(choices) == {"auto", *DEFAULT_LR}


def test_an_empty_variable_means_the_flags_default():
    # docker compose passes ${PSCNN_LR:-} as an empty string when the user sets nothing
    assert config(["run", "--mode", "async"], {"PSCNN_LR": "", "PSCNN_OPTIMIZER": " "})["lr"] == 0.001


def test_variables_reach_only_the_command_being_run(capsys, monkeypatch):
    # PSCNN_OPTIMIZER=auto is valid for `pscnn server`, not for `pscnn bench server`.
    parser = build_parser()
    apply_env_defaults(parser, {"PSCNN_OPTIMIZER": "auto"}, argv=["server", "--mode", "async"])
    assert optimizer_config(parser.parse_args(["server", "--mode", "async"]))["name"] == "adam"
    monkeypatch.setenv("PSCNN_OPTIMIZER", "auto")
    assert main(["bench", "server", "--clients", "1"]) == 2
    assert "PSCNN_OPTIMIZER='auto': expected one of sgd" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train"], ["run"], ["server"], ["worker"], ["evaluator"], ["bench", "scaling"]])
def test_parsing_the_arguments_loads_no_numpy(argv):
    """--threads sets the BLAS thread count through the environment, which numpy's BLAS reads once,
    when numpy loads: the bench parsers' import of cnn_core.text loaded numpy (cnn_core's __init__)
    while the parser was built, and every pscnn train, server and worker ran with a BLAS thread per
    core (pscnn train --model light: 1,737 img/s on a loaded 2-core machine, 6,004 with one thread)."""
    code = ("import sys; from pscnn.cli import parse_args; parse_args(sys.argv[1:]); "
            "print(sorted(m for m in ('numpy', 'zmq') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", (argv, out.stdout, out.stderr)


@pytest.mark.parametrize("argv,needle", [
    (["server", "--bind", "garbage"], ("argument --bind: expected tcp://HOST:PORT (e.g. tcp://*:5555) or ipc://PATH, "
                                       "got 'garbage'")),
    (["server", "--bind", "tcp://:5555"], "argument --bind: expected tcp://HOST:PORT"),
    (["server", "--bind", "udp://*:5555"], "argument --bind: expected tcp://HOST:PORT"),
    (["server", "--bind", "tcp://*:99999"], "'tcp://*:99999': the port must be a number, 0-65535 (0: a free one)"),
    (["server", "--bind", "tcp://*:http"], "the port must be a number, 0-65535"),
    (["worker", "--server", "tcp://localhost:0"], "the port must be a number, 1-65535"),     # 0 is a bind's only
    # digits of other scripts: int() reads them, ZeroMQ said no more than "Invalid argument", exit 1
    (["server", "--bind", "tcp://*:\uff15\uff15\uff15\uff15"], "the port must be a number, 0-65535"),
    (["status", "--server", "tcp://localhost:\u0665\u0665\u0665\u0665"], "the port must be a number, 1-65535"),
    (["server", "--bind", "ipc://"], "argument --bind: expected tcp://HOST:PORT (e.g. tcp://*:5555) or ipc://PATH"),
    (["worker", "--server", "localhost:5555"], "argument --server: expected tcp://HOST:PORT (e.g. tcp://HOST:5555)"),
    (["evaluator", "--server", "tcp://a b:5555"], "argument --server: expected tcp://HOST:PORT"),
    (["status", "--server", "tcp://x"], "argument --server: expected tcp://HOST:PORT"),
    (["worker", "--server", "tcp://[::1:5555"], "'tcp://[::1:5555': an IPv6 address goes in brackets, as in"),
    (["worker", "--server", "tcp://::1:5555"], "'tcp://::1:5555': an IPv6 address goes in brackets"),
    # a bind address as the server's: exit 1 on zmq's "cannot connect to tcp://*:5555: Invalid argument"
    (["worker", "--server", "tcp://*:5555"], "argument --server: 'tcp://*:5555': * (every interface) is for --bind"),
    (["status", "--server", "tcp://*:5555"], "argument --server: 'tcp://*:5555': * (every interface) is for --bind"),
    (["server", "--bind", "tcp://[nope]:5555"], "'tcp://[nope]:5555': an IPv6 address goes in brackets"),
    (["run", "--port", "70000"], "argument --port: must be a TCP port, 0-65535, got 70000"),
    (["run", "--workers", "two"], "argument --workers: must be an integer, got 'two'"),
    (["train", "--lr", "fast"], "argument --lr: must be a number, got 'fast'"),
    (["worker", "--name", "w1\nfake"], "argument --name: must be printable"),
    (["server", "--wait-for-workers", "-1"], "argument --wait-for-workers: must be >= 0, got -1"),
    (["run", "--start-timeout", "0"], "argument --start-timeout: must be > 0, got 0"),
    # integers end up in 64-bit msgpack fields: 31 digits used to leave a server failing every request
    (["server", "--epochs", "1" + "0" * 30], "argument --epochs: must be at most 1000000000, got 1" + "0" * 30),
    (["train", "--batch-size", "1000000001"], "argument --batch-size: must be at most 1000000000, got 1000000001"),
    (["run", "--workers", "99999999999"], "argument --workers: must be at most 1000000000"),
    (["server", "--seed", str(2**63)], f"argument --seed: must be at most {2**63 - 1}, got {2**63}"),
    (["train", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["bench", "time-to-accuracy", "--target", "0"], "argument --target: must be a fraction in (0, 1], got 0"),
])
def test_bad_flags_get_one_line_naming_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    error_line(capsys.readouterr().err, needle,
               starts=f"pscnn {' '.join(argv[:2] if argv[0] == 'bench' else argv[:1])}: error: ")


@pytest.mark.parametrize("argv, needle", [
    (["server", "--bind", "tcp://127.0.0.1:65536"], "'tcp://127.0.0.1:65536': the port must be a number, 0-65535"),
    (["worker", "--server", "tcp://localhost:65536"], "'tcp://localhost:65536': the port must be a number, 1-65535")])
def test_the_port_after_the_last_one_is_refused(argv, needle, capsys):
    """65535 is the last port: ZeroMQ would take 65536 as 0 (modulo 65536), a free port to bind, or
    connect to none."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    error_line(capsys.readouterr().err, needle, starts=f"pscnn {argv[0]}: error: ")


@pytest.mark.parametrize("command, role", [("worker", "trainer"), ("evaluator", "evaluator")])
def test_a_clients_name_help_gives_its_own_default(command, role, capsys):
    # pscnn evaluator --help gave "e.g. trainer-myhost-4242", a name an evaluator never takes
    from worker.client import Client
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {role}-HOST-PID, e.g. {role}-myhost-4242)" in help_text
    assert Client("tcp://127.0.0.1:1", role).name.startswith(f"{role}-")     # what the help says


def test_integer_flags_take_their_largest_values():
    """The caps are inclusive, and a seed may be any 64-bit signed integer (time-based ones exceed 1e9)."""
    from pscnn.cli import MAX_INT, build_parser
    args = build_parser().parse_args(["server", "--epochs", str(MAX_INT), "--seed", str(2**63 - 1)])
    assert (args.epochs, args.seed) == (10**9, 2**63 - 1)
    assert build_parser().parse_args(["train", "--seed", "1732700000"]).seed == 1732700000


def test_waiting_for_more_workers_than_may_join_is_one_line(tmp_path, capsys, server_must_not_serve):
    assert main(["server", "--wait-for-workers", "3", "--max-workers", "2", "--bind", "tcp://127.0.0.1:1",
                 "--out", str(tmp_path / "run")]) == 1
    error_line(capsys.readouterr().err, "--wait-for-workers 3 exceeds --max-workers 2", alone=True)   # one too many


@pytest.mark.parametrize("flags, needle", [
    (["--momentum", "1.5"], "sgd: momentum must lie in [0.0, 1.0), got 1.5"),
    (["--model", '{"input_shape": [1, 28, 28], "layers": [{"type": "flatten"}, {"type": "dense", "units": 5}]}'],
     "outputs 5 values, but MNIST has 10 classes"),
    (["--keys", "no-such-keys"], "--keys no-such-keys: no such folder"),
    (["--resume"], "--resume: no checkpoint at"),
])
def test_a_bad_server_flag_is_refused_before_the_test_set_is_read(tmp_path, capsys, monkeypatch, flags, needle,
                                                                  server_must_not_serve):
    """The server reads the test set at its start where MNIST_DIR is set, and did so before building
    itself, which checks the flags: MNIST_DIR names an empty folder here, whose error came first."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MNIST_DIR", str(empty))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["server", *flags, "--bind", "tcp://127.0.0.1:1", "--out", str(out)]) == 1
    error_line(capsys.readouterr().err, needle, alone=True)
    assert not out.exists()


def test_an_allocation_numpy_refuses_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    # A spec within its limits still asks for its per-image values times the batch, a BatchNorm
    # model's whole batch at once: NumPy's MemoryError came out as a traceback.
    def allocate_too_much(args):
        return np.empty(2**53, dtype=np.float32)       # 32 PiB: refused on any machine

    monkeypatch.setattr(training, "train_from_args", allocate_too_much)
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    error_line(capsys.readouterr().err, "pscnn: error: out of memory: Unable to allocate 32.0 PiB",
               "a smaller --batch-size or model needs less", alone=True)
    # A trainer computes the server's batches and an evaluator batches of 1,000: neither has a
    # --batch-size, which the line named to them too.
    monkeypatch.setattr(trainer, "run_trainer_from_args", allocate_too_much)
    monkeypatch.setattr(evaluator, "run_evaluator_from_args", allocate_too_much)
    assert main(["worker", "--log-level", "error"]) == 1
    error_line(capsys.readouterr().err, "out of memory: Unable to allocate 32.0 PiB",
                      "; a smaller model, or a smaller --batch-size given to the server, needs less", alone=True)
    assert main(["evaluator", "--log-level", "error"]) == 1
    error_line(capsys.readouterr().err, "; a smaller model needs less (the evaluator runs 1,000 test images "
               "at a time)", alone=True)
    assert inspect.signature(metrics.evaluate).parameters["batch_size"].default == 1000     # what it says


def test_run_resume_without_a_checkpoint_fails_before_starting_anything(tmp_path, capsys, mnist_file_names):
    out = tmp_path / "never-ran"
    assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"pscnn: error: --resume: no checkpoint at {out / 'checkpoint.npz'}"
    assert not out.exists()          # no server, workers or logs were started


@pytest.mark.parametrize("argv", [["server", "--bind", "tcp://*:5555"], ["server", "--bind", "tcp://127.0.0.1:1"],
                                  ["server", "--bind", "ipc:///tmp/pscnn.ipc"],
                                  ["worker", "--server", "tcp://[::1]:5555"], ["server", "--bind", "tcp://[::]:5555"],
                                  ["worker", "--server", "tcp://[fe80::1%eth0]:5555"],
                                  ["status", "--server", "tcp://server:65535"]])
def test_good_endpoints_pass_unchanged(argv):
    args = build_parser().parse_args(argv)
    assert getattr(args, argv[1].lstrip("-")) == argv[2]


@pytest.mark.parametrize("key,value,needle", [
    ("PSCNN_BIND", "tcp://*", "PSCNN_BIND='tcp://*': expected tcp://HOST:PORT"),
    ("PSCNN_WORKERS", "abc", "PSCNN_WORKERS='abc': must be an integer, got 'abc'"),
])
def test_bad_variables_get_one_line_naming_the_variable(key, value, needle, capsys, monkeypatch):
    monkeypatch.setenv(key, value)
    assert main(["server" if key == "PSCNN_BIND" else "run"]) == 2
    error_line(capsys.readouterr().err, needle, alone=True)


@pytest.mark.parametrize("argv,prog,needles", [
    (["train", "--epocs", "1"], "pscnn train", ["unrecognized arguments: --epocs 1", "did you mean --epochs?"]),
    (["bench", "scaling", "--sekonds=3"], "pscnn bench scaling", ["--sekonds=3", "did you mean --seconds?"]),
    (["run", "extra"], "pscnn run", ["unrecognized arguments: extra"]),
    # abbreviations: argparse took them for the one flag they start (bad values here, so that a parser
    # taking one stops at that flag's error instead of training)
    (["train", "--epoch", "x"], "pscnn train", ["unrecognized arguments: --epoch x", "did you mean --epochs?"]),
    (["server", "--wait", "x"], "pscnn server", ["unrecognized arguments: --wait x",
                                                 "did you mean --wait-for-workers?"]),
    (["bench", "scaling", "--sec=x"], "pscnn bench scaling", ["--sec=x", "did you mean --seconds?"]),
    (["bench", "time-to-accuracy", "--tar", "x"], "pscnn bench time-to-accuracy",
     ["unrecognized arguments: --tar x", "did you mean --target?"]),
])
def test_an_unknown_argument_is_refused_with_its_commands_usage(argv, prog, needles, capsys):
    """argparse left a misspelt flag to the top-level parser: `pscnn train --epocs 1` printed
    `usage: pscnn [-h] COMMAND ...` and `pscnn: error: ...`, none of train's flags nor the one meant."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: {prog} " in err
    error_line(err, *needles, starts=f"{prog}: error: ")


def test_no_parser_takes_an_abbreviated_flag():
    """`pscnn train --epoch 3` trained 3 epochs: argparse expands a flag's unique start, so a
    script's abbreviation would change meaning the day another flag sharing it is added.  Every
    subcommand is checked, those added later too (allow_abbrev is not inherited by subparsers)."""
    def parsers(parser, prog):
        yield prog, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from parsers(sub, f"{prog} {name}")

    found = list(parsers(build_parser(), "pscnn"))
    assert len(found) > 10                              # every subcommand and bench's, not just the top
    assert [prog for prog, parser in found if parser.allow_abbrev] == []


# ------------------------------------------------------------------ the documentation's command lines

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / name for name in
        ("README.md", "docs/engine.md", "docs/scaling.md", "docs/deployment.md", "docs/experiments.md",
         "docs/run-folder.md")]

# Where a command line's pscnn arguments end: a redirection (`> runs/x.log`, `2>&1`), a job in the
# background (`&`), or the next command (`;`, `&&`); docs/experiments.md starts servers and workers so.
SHELL_OPERATOR = re.compile(r"^(\d?>>?.*|&>.*|&|&&|;|\|\|?)$")


def pscnn_argv(line: str) -> list[str]:
    """The arguments pscnn gets from a documented command line (without the leading ``pscnn``)."""
    words = shlex.split(line)[1:]
    cut = next((i for i, word in enumerate(words) if SHELL_OPERATOR.match(word)), len(words))
    return words[:cut]


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every ``pscnn ...`` line in the docs' code blocks: what users paste."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), re.S):
            for line in block.splitlines():
                line = line.split(" #")[0].strip()      # a comment after the command
                if line.startswith("pscnn ") and "|" not in line:      # not the diagram
                    found.append((path.name, line))
    return found


def test_the_docs_quote_command_lines_pscnn_accepts():
    """A renamed flag or subcommand leaves the docs telling users to run what now fails."""
    commands = documented_commands()
    assert len(commands) > 10, commands     # the extraction still finds them
    for name, line in commands:
        try:
            parse_args(pscnn_argv(line), environ={})
        except SystemExit as exc:
            pytest.fail(f"{name}: `{line}` does not parse (exit {exc.code})")


def test_every_doc_is_checked():
    """The doc checks here read DOCS, a list by name: a page added to docs/ would be left out of
    every one of them (its commands, flags and links) unless added there too."""
    pages = {ROOT / "README.md", *(ROOT / "docs").glob("*.md")}
    assert set(DOCS) == pages, f"not in DOCS: {sorted(p.name for p in pages - set(DOCS))}; " \
                               f"no more: {sorted(p.name for p in set(DOCS) - pages)}"


def test_the_experiments_guide_is_checked_with_the_other_docs():
    """docs/experiments.md is run line by line by students: its pscnn lines, redirected or sent to
    the background as they are there, must reach the check above, each role and bench among them."""
    lines = [line for name, line in documented_commands() if name == "experiments.md"]
    assert len(lines) >= 25, lines
    assert {pscnn_argv(line)[0] for line in lines} >= {"train", "run", "server", "worker", "evaluator", "status",
                                                       "bench"}
    assert pscnn_argv("pscnn worker --server tcp://127.0.0.1:5555 > runs/w.log 2>&1 &") == \
        ["worker", "--server", "tcp://127.0.0.1:5555"]
    assert pscnn_argv("pscnn run --out 'runs/a b' &") == ["run", "--out", "runs/a b"]



COUNTS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}


def test_the_experiments_count_the_lines_a_port_change_touches():
    """Experiment 5 said to change port 5555 "in all five lines" of a block naming it in six: the
    line left over (the second `pscnn status`) asked the wrong server, or none."""
    text = (ROOT / "docs" / "experiments.md").read_text()
    claims = list(re.finditer(r"If port (\d+) is taken on your machine, use another in all (\w+) lines", text))
    assert claims, "the experiments guide no longer says which lines name the port"
    for claim in claims:
        block = re.findall(r"```sh\n(.*?)```", text[:claim.start()], re.S)[-1]
        naming = [line for line in block.splitlines() if f":{claim.group(1)}" in line]
        assert COUNTS[claim.group(2)] == len(naming), f"{claim.group(0)}, but {len(naming)} name it: {naming}"


def option_strings(parser) -> set[str]:
    """Every flag of every subcommand, a switch's opposite (--progress) too."""
    names = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= option_strings(sub)
        names.update(action.option_strings)
    return names


def test_every_flag_the_docs_name_is_a_pscnn_flag():
    known = option_strings(build_parser())
    for path in (p for p in DOCS if p.name != "deployment.md"):   # deployment.md names docker's flags too
        lines = [line for line in path.read_text().splitlines() if "docker" not in line]
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", "\n".join(lines)))
        unknown = sorted(named - known)
        assert not unknown, f"{path.name} names flags pscnn does not have: {unknown}"


# A quoted pscnn command, in a code block's line or in prose: `pscnn run --curve`, and "`pscnn
# status`'s `--keys`" (the flag quoted apart, given to that command).
QUOTED_COMMAND = re.compile(r"`(pscnn [^`]+)`(?:'s `(--[a-z0-9-]+)`)?")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def quoted_commands(text: str) -> list[str]:
    """Every ``pscnn ...`` command a doc quotes, in code blocks and inline, flags quoted apart joined on."""
    quoted = [" ".join(filter(None, m.groups())) for m in QUOTED_COMMAND.finditer(text)]
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        quoted += [line.split(" #")[0].strip() for line in block.splitlines() if line.startswith("pscnn ")]
    return quoted


def commands_given(words: list[str], parser) -> list:
    """The (sub)command parsers ``pscnn WORDS`` runs: ``bench scaling`` descends twice; a
    ``server|worker|evaluator`` stands for each of them."""
    parsers = [parser]
    for word in words:
        below = [sub for p in parsers for action in p._actions if isinstance(action, argparse._SubParsersAction)
                 for name, sub in action.choices.items() if name in word.split("|")]
        if word.startswith("-") or not below:
            break
        parsers = below
    return parsers


def flags_not_of_their_command(text: str) -> list[str]:
    """``command: --flag`` for each flag a quoted pscnn command is given that it does not have."""
    wrong = []
    for quote in quoted_commands(text):
        for command in commands_given(quote.split()[1:], build_parser()):
            own = {flag for action in command._actions for flag in action.option_strings}
            wrong += [f"{quote}: {command.prog} has no {flag}" for flag in FLAG.findall(quote) if flag not in own]
    return wrong


def test_every_flag_a_quoted_command_is_given_is_that_commands():
    """The checks above parse the command lines of code blocks, and find each flag the docs name on
    some command; a flag quoted in prose with a command that lacks it (`pscnn train --workers`,
    "`pscnn status`'s `--overlap`") passed both."""
    for path in DOCS:
        wrong = flags_not_of_their_command(path.read_text())
        assert not wrong, f"{path.name}: {wrong}"


def test_the_quoted_commands_flags_are_read_as_a_user_reads_them():
    """What the check above relies on: inline quotes, flags quoted apart, subcommands of bench, and
    a choice of commands are each held to their command's flags."""
    assert flags_not_of_their_command("`pscnn run --curve`, `pscnn bench scaling --compute-ms 5`, "
                                      "`pscnn server|worker|evaluator --help`, `pscnn status`'s `--keys`") == []
    assert flags_not_of_their_command("`pscnn train --workers 2`") == ["pscnn train --workers 2: pscnn train has no "
                                                                       "--workers"]
    assert flags_not_of_their_command("`pscnn bench server --compute-ms`, `pscnn status`'s `--overlap`") == [
        "pscnn bench server --compute-ms: pscnn bench server has no --compute-ms",
        "pscnn status --overlap: pscnn status has no --overlap"]
    assert flags_not_of_their_command("`pscnn server|worker --every`") == [
        "pscnn server|worker --every: pscnn server has no --every",
        "pscnn server|worker --every: pscnn worker has no --every"]
    assert len(quoted_commands(DOCS[0].read_text())) > 20


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces as dashes."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text, re.M)}


def test_the_docs_links_and_images_lead_somewhere():
    """A renamed file, section or plot leaves a link that goes nowhere, and a plot in docs/img
    that no page shows (scaling.md named time_to_accuracy_async_m05.png in code quotes only)."""
    shown = set()
    for path in DOCS:
        text = path.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):          # https:, mailto:: not ours to check
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.is_file(), f"{path.name} links to {target}, which does not exist"
            if anchor:
                assert anchor in heading_anchors(linked.read_text()), \
                    f"{path.name} links to {target}: {linked.name} has no heading with that anchor"
            if linked.suffix == ".png":
                shown.add(linked)
    plots = set((DOCS[0].parent / "docs" / "img").resolve().glob("*.png"))
    assert plots                            # the glob still finds them
    assert not plots - shown, f"plots no doc shows: {sorted(p.name for p in plots - shown)}"


def test_every_run_the_readme_quotes_is_in_the_docs_run_by_run_record():
    """README's measured results send the reader to docs/engine.md and docs/scaling.md for the runs
    behind them; its latest figures (make bench at 2026-11-28 01:20, the server at 01:21, make run at
    23:11) were in the README alone, and its ranges could not be traced."""
    readme = DOCS[0].read_text()
    results = readme[readme.index("## Measured results"):]
    results = results[:results.index("\n## ", 1)]
    record = DOCS[1].read_text() + DOCS[2].read_text()
    quoted = set(re.findall(r"\b\d\d:\d\d(?= UTC)", results))
    assert len(quoted) > 3, quoted                # the extraction still finds them
    missing = sorted(time for time in quoted if time not in record)
    assert not missing, f"README quotes runs at {missing} UTC that docs/engine.md and docs/scaling.md do not record"


def test_the_readme_names_every_field_of_pscnn_status(tmp_path):
    """`pscnn status` prints the server's progress as JSON; README.md named two of its 28 fields
    (declared_dead, lease_requeues), leaving users to guess what `ready` 0 or `epoch` meant."""
    from server.config import ServerConfig
    from server.server import ParameterServer
    progress = ParameterServer(ServerConfig(model="light", train_limit=640, out=str(tmp_path / "run"))).progress()
    readme = DOCS[0].read_text()
    assert "`pscnn status` prints" in readme, "README.md has no paragraph on `pscnn status`'s answer"
    status_doc = readme[readme.index("`pscnn status` prints"):]
    status_doc = status_doc[:status_doc.index("\n\n")]        # its paragraph
    undocumented = sorted(key for key in progress if f"`{key}`" not in status_doc)
    assert not undocumented, f"README.md's `pscnn status` paragraph does not name {undocumented}"


def deployment_settings(text: str) -> dict[str, str]:
    """docs/deployment.md's Settings table: variable -> its documented default ("" for "empty").
    A row may name several variables, its defaults then in the same order (`auto`, empty); words
    in parentheses are comments: "`0` (all 60,000)"."""
    settings = text[text.index("### Settings"):]
    settings = settings[:settings.index("\n## ")]
    table = {}
    for names, defaults in re.findall(r"^\| (`PSCNN_.*?) \| (.*?) \|", settings, re.M):
        names = re.findall(r"`(PSCNN_\w+)`", names)
        defaults = ["" if part.strip() == "empty" else part.strip().strip("`")
                    for part in re.sub(r"\([^)]*\)", "", defaults).split(",")]
        assert len(names) == len(defaults), (names, defaults)
        table.update(zip(names, defaults))
    return table


def test_the_deployment_settings_are_those_the_compose_file_takes_with_its_defaults():
    """docs/deployment.md says docker-compose.yml uses only the variables of its Settings table, and
    gives each one's default; nothing held the two together: a variable added to the Compose file,
    or a default changed there, left the table telling users what the containers do not get."""
    compose = {}
    for name, default in re.findall(r"\$\{(PSCNN_\w+):-([^}]*)\}", (ROOT / "docker-compose.yml").read_text()):
        compose.setdefault(name, set()).add(default)
    table = deployment_settings((ROOT / "docs" / "deployment.md").read_text())
    assert len(table) > 15 and table["PSCNN_LR"] == "" and table["PSCNN_TRAIN_LIMIT"] == "0", table
    differ = {name: (table.get(name), sorted(compose.get(name, ()))) for name in set(table) | set(compose)
              if compose.get(name) != {table.get(name)}}
    assert not differ, f"variable: (deployment.md's default, docker-compose.yml's): {differ}"


# Another command's flag a help names on purpose: (command, flag).
OTHER_COMMANDS_FLAGS = {("server", "--workers"),     # "pscnn run: its --workers"
                        ("keys", "--keys"),           # "FOLDER/server for pscnn server --keys"
                        # --give-up-after: "not while its start barrier (--wait-for-workers) holds,
                        # which its --start-timeout bounds" (the server's)
                        ("worker", "--wait-for-workers"), ("worker", "--start-timeout")}


def test_each_commands_help_names_only_flags_it_has():
    """`pscnn train --help` said the optimizer and learning rate defaults depend on --mode, a flag
    train does not have (the text is shared with the distributed commands).  Each command's help,
    the epilog of PSCNN_ variables aside, names only its own flags, or another command's on purpose."""
    named_elsewhere = set()
    for action in build_parser()._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for command, sub in action.choices.items():
            sub.epilog = None
            own = {flag for a in sub._actions for flag in a.option_strings}
            named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", sub.format_help()))
            for flag in named - own:
                named_elsewhere.add((command, flag))
    assert named_elsewhere == OTHER_COMMANDS_FLAGS


def test_the_bench_commands_help_names_every_benchmark_it_holds():
    """`pscnn --help` described bench as "throughput-scaling experiments", though it holds the server's
    capacity and time to accuracy too."""
    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    [bench_help] = [choice.help for choice in top._choices_actions if choice.dest == "bench"]
    benchmarks = next(a for a in top.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    assert {"scaling", "server", "time-to-accuracy"} <= set(benchmarks.choices)
    assert [name for name in benchmarks.choices if name not in bench_help] == [], bench_help
