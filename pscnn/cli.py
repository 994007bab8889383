"""The ``pscnn`` command: one entry point, one subcommand per role.

    pscnn train       single-process training (the baseline)
    pscnn server      the parameter server
    pscnn worker      a trainer worker
    pscnn evaluator   the evaluator
    pscnn run         server + N workers + evaluator on this machine
    pscnn status      ask a server for its progress (a container healthcheck)
    pscnn keys        make CURVE key pairs: a server's and its clients' (opt-in authentication)
    pscnn download    fetch and verify MNIST into the cache
    pscnn bench ...   benchmarks: scaling with workers, server capacity, time to accuracy

Every flag can also come from the environment as ``PSCNN_<FLAG>`` (upper case,
dashes as underscores: ``--batch-size`` <- ``PSCNN_BATCH_SIZE``); a flag on the
command line wins.  That is how containers are configured.

Heavy modules (numpy, zmq) are imported only after the arguments are parsed,
so that ``--threads`` can set the BLAS thread count before numpy loads.
"""
from __future__ import annotations

import argparse
import atexit
import difflib
import importlib
import ipaddress
import json
import logging
import os
import signal
import sys
import threading

from pscnn.names import name_problem

ENV_PREFIX = "PSCNN_"
# Set in each child's environment: the launcher's pid (see stop_with_launcher).
LAUNCHER_PID_VARIABLE = "PSCNN_LAUNCHER_PID"
# The PSCNN_* settings that are no flag: read by the code itself (the MNIST cache and mirrors,
# a launcher's pid), or by docker-compose.yml and the Dockerfile only (docs/deployment.md).
OTHER_VARIABLES = frozenset({"PSCNN_CACHE_DIR", "PSCNN_MNIST_MIRRORS", LAUNCHER_PID_VARIABLE,
                             "PSCNN_SERVER_HOST", "PSCNN_IMAGE", "PSCNN_UID"})
MODES = ("sync", "async", "ssp")        # the server's consistency modes
DEFAULT_STALENESS = 2                   # ssp: pushes a worker may run ahead of the slowest
DEFAULT_FINAL_EVAL_TIMEOUT = 120.0       # seconds the server waits for the final evaluation
DEFAULT_START_TIMEOUT = 60.0            # seconds the server waits for --wait-for-workers trainers
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class CliError(Exception):
    """A bad flag or environment value; printed as one line, exit status 2."""


class _BadEnv:
    """A PSCNN_<FLAG> value its flag rejects, kept as the flag's default.

    It is an error only if the flag is not on the command line (the command
    line wins), and it must not break ``--help``: :func:`parse_args` reports it
    after parsing, when the namespace still holds it.
    """

    def __init__(self, message: str):
        self.message = message

    def __repr__(self) -> str:
        return "<invalid environment value>"


class Switch(argparse.Action):
    """A boolean flag and its opposite: ``--overlap`` / ``--no-overlap``, ``--no-progress`` / ``--progress``.

    The first name sets the flag's value (its dest) to True, the second to False.  A
    PSCNN_<FLAG>=1 sets it as a default, which the opposite undoes: without it, the
    command line could not win over a true variable as it does for every other flag.
    """

    def __init__(self, option_strings, dest, default=False, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string == self.option_strings[0])

    def format_usage(self) -> str:      # the usage line: [--overlap | --no-overlap]
        return " | ".join(self.option_strings)


def add_switch(p, flag: str, help: str | None = None) -> None:
    """``flag`` (``--overlap``, ``--no-progress``) and its opposite (``--no-overlap``, ``--progress``)
    on parser or group ``p``, off by default; the value's name is ``flag``'s (``no_progress``)."""
    opposite = "--" + (flag[len("--no-"):] if flag.startswith("--no-") else "no-" + flag[2:])
    p.add_argument(flag, opposite, action=Switch, help=help)


# --------------------------------------------------------------------------- flag groups
# Flag types (argparse ``type=``), also used by ``pscnn bench``'s flags: one clear
# message for each kind of bad value.

def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


# The largest value an integer flag takes (counts: epochs, batch size, workers,
# limits, ...), and a seed's.  Python's ints are unbounded, but every flag ends
# up in a msgpack message (64-bit integers at most) or a NumPy computation: an
# --epochs of 31 digits used to leave a server that failed every request.
MAX_INT = 10**9
MAX_SEED = 2**63 - 1


def _int_in(text: str, low: int, high: int) -> int:
    value = _number(text, int)
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    if value > high:
        raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_in(text, 1, MAX_INT)


def non_negative_int(text: str) -> int:
    return _int_in(text, 0, MAX_INT)


# The most client key pairs one ``pscnn keys`` makes: each is a folder of two files, plus a
# public one in the server's authorized folder, so --clients 10**9 would fill a disk with inodes
# before it ended (clients may share a key pair; one per trainer is plenty).
MAX_KEY_CLIENTS = 10_000


def key_clients(text: str) -> int:
    return _int_in(text, 1, MAX_KEY_CLIENTS)


def seed(text: str) -> int:
    """A seed: any non-negative 64-bit signed integer (time-based seeds exceed MAX_INT)."""
    return _int_in(text, 0, MAX_SEED)


# The largest value a float flag takes.  Every one is seconds, milliseconds or
# an optimizer coefficient, for which more than this is a typo; inf or 1e300
# would overflow the timers, timestamps and messages they end up in (Event.wait,
# the server's welcome) far from the flag.
MAX_FLOAT = 1e9
# Seconds that go to zmq's poll as milliseconds in a C int (at most 2^31 - 1,
# 24.8 days): 1e9 s would overflow there too.
MAX_POLL_SECONDS = 1e6


def cap_text(cap) -> str:
    """A flag's cap as its messages print it: 1000000000 for an int, 1e9 for a float."""
    return str(cap) if isinstance(cap, int) else f"{cap:.0e}".replace("e+0", "e")


def _at_most(text: str, value: float, cap: float) -> float:
    if not value <= cap:                            # inf too; NaN was refused before
        raise argparse.ArgumentTypeError(f"must be a finite number at most {cap_text(cap)}, got {text}")
    return value


def _positive(text: str, cap: float) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return _at_most(text, value, cap)


def positive_float(text: str) -> float:
    return _positive(text, MAX_FLOAT)


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return _at_most(text, value, MAX_FLOAT)


def poll_seconds(text: str) -> float:
    """Seconds > 0 that one zmq poll waits (``pscnn status --timeout``): its milliseconds are a C int."""
    return _positive(text, MAX_POLL_SECONDS)


def fraction(text: str) -> float:
    """A share in (0, 1], e.g. a test accuracy to reach (NaN fails both bounds)."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def _path(text: str) -> str:
    """A file or folder flag's value: not empty, ``~`` expanded.

    An empty path would silently mean the current folder (Path("") is "."),
    while an empty MNIST_DIR or PSCNN_<FLAG> means unset.  A shell expands
    ``~`` on a command line, but not in an environment file (Compose's).
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string (use . for the current folder)")
    return os.path.expanduser(text)


def _port(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 0-65535, got {value}")
    return value


def _endpoint(text: str, bind: bool) -> str:
    """A ZeroMQ endpoint pscnn can use: tcp://HOST:PORT (PORT 1-65535; to bind, 0 too: a free one, which
    the server picks as it binds), or ipc://PATH.

    ZeroMQ itself would take a port of 99999 as 34463 (modulo 65536), and say
    no more than "Invalid argument" for the rest.
    """
    example = "tcp://*:5555" if bind else "tcp://HOST:5555"
    scheme, sep, rest = text.partition("://")
    if sep and scheme == "ipc" and rest:
        return text
    host, colon, port = rest.rpartition(":")
    if not sep or scheme != "tcp" or not colon or not host or any(ch.isspace() or ch == "/" for ch in host):
        raise argparse.ArgumentTypeError(f"expected tcp://HOST:PORT (e.g. {example}) or ipc://PATH, got {text!r}")
    # ASCII digits: int() reads other scripts' too (\uff15), ZeroMQ does not
    if not (port.isascii() and port.isdigit()) or not (0 if bind else 1) <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be a number, "
                                         + ("0-65535 (0: a free one)" if bind else "1-65535"))
    if not bind and host == "*":        # ZeroMQ's connect says no more than "Invalid argument", exit 1
        raise argparse.ArgumentTypeError(f"{text!r}: * (every interface) is for --bind; name the server's "
                                         "host, as in tcp://HOST:5555")
    if host.startswith("[") or host.endswith("]") or host.count(":"):
        try:        # an IPv6 address goes in brackets, as in tcp://[::1]:5555
            ipaddress.IPv6Address(host[1:-1] if host.startswith("[") and host.endswith("]") else "?")
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: an IPv6 address goes in brackets, as in "
                                             "tcp://[::1]:5555") from None
    return text


def _name(text: str) -> str:
    """A worker's readable name: it goes into the server's log lines as it is, and
    the client id built from it must fit the protocol and ZeroMQ (``pscnn.names``)."""
    problem = name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}: {text[:40]!r}{'...' if len(text) > 40 else ''}")
    return text


def _bind_endpoint(text: str) -> str:
    return _endpoint(text, bind=True)


def _server_endpoint(text: str) -> str:
    return _endpoint(text, bind=False)


# Each optimizer's default learning rate: one rate for all would be 20x too
# large for Adam or 20x too small for SGD.
DEFAULT_LR = {"sgd": 0.02, "adagrad": 0.01, "rmsprop": 0.001, "adam": 0.001, "adamw": 0.001}
# Sync mode averages every worker's batch into one update (128 images with two
# workers), so SGD's default there is twice pscnn train's, as the linear scaling
# rule suggests. Full MNIST, 2 workers, 3 epochs: 98.98-99.25% over ten runs at 0.04
# (nine at 99.0% or above) against 98.92-99.07% over seven at 0.02 (two under);
# 4 workers at 0.04: 99.03% (README, "Distributed training").
SYNC_DEFAULT_LR = {"sgd": 0.04}


DEFAULT_WARMUP_STEPS = 10


def default_lr(name: str, mode: str | None) -> float:
    """The learning rate an optimizer gets without ``--lr``, in ``mode`` (None: ``pscnn train``)."""
    return SYNC_DEFAULT_LR.get(name, DEFAULT_LR[name]) if mode == "sync" else DEFAULT_LR[name]


def resolve_optimizer(args) -> str:
    """``--optimizer auto``: momentum SGD, or Adam where the server applies stale gradients.

    With several asynchronous workers each gradient is a few versions old, and
    asynchrony alone already acts like momentum; on top of momentum 0.9 that
    made full-MNIST runs with 4 async workers unstable (98.6% after 3 epochs,
    batch 128 collapsed to 82%), while Adam's per-coordinate, bounded steps
    reached 99.2% (docs/scaling.md).  Synchronous and single-process training
    keep momentum SGD, which did better there (99.0% vs 98.96% for sync).
    """
    if args.optimizer != "auto":
        return args.optimizer
    if args.momentum is not None or getattr(args, "nesterov", False):   # momentum asked for: SGD
        return "sgd"
    return "adam" if getattr(args, "mode", "sync") in ("async", "ssp") else "sgd"


def add_model_flags(p: argparse.ArgumentParser, distributed: bool = True) -> None:
    """The model and optimizer flags; ``distributed``: the command has ``--mode``, on which the
    optimizer's and the learning rate's defaults depend (not ``pscnn train``)."""
    g = p.add_argument_group("model and optimizer")
    g.add_argument("--model", default="seed",
                   help="preset (seed, light), a JSON spec, or a JSON spec file: a value that names a file, ends "
                        "in .json or holds a /; a preset wins over a file of its name (default: seed)")
    g.add_argument("--optimizer", default="auto", choices=["auto", *DEFAULT_LR],
                   help="auto (default): sgd with momentum"
                        + (", but adam for --mode async and ssp, where stale gradients make momentum SGD "
                           "unstable (measured in docs/scaling.md)" if distributed else ""))
    g.add_argument("--lr", type=positive_float, default=None,
                   help="base learning rate (default: " + ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LR.items())
                        + ("; " + ", ".join(f"{v:g} for {k}" for k, v in SYNC_DEFAULT_LR.items())
                           + " in --mode sync, whose updates average every worker's batch" if distributed else "")
                        + ")")
    g.add_argument("--momentum", type=non_negative_float, default=None,
                   help="SGD momentum (default: 0.9); implies --optimizer sgd under auto")
    add_switch(g, "--nesterov", help="Nesterov momentum (SGD; implies sgd under auto)")
    g.add_argument("--weight-decay", type=non_negative_float, default=None,
                   help="AdamW's decoupled weight decay (default: 0.01)")
    g.add_argument("--l2", type=non_negative_float, default=0.0,
                   help="L2 penalty: adds l2 * w to every gradient, the gradient of 0.5 * l2 * ||w||^2 "
                        "(torch.optim's weight_decay, for adam too; adamw's weight decay is decoupled) (default: 0)")
    g.add_argument("--l1", type=non_negative_float, default=0.0,
                   help="L1 penalty: adds l1 * sign(w) to every gradient, that of l1 * ||w||_1 (default: 0)")
    g.add_argument("--schedule", default="cosine",
                   help="cosine (to 0 over the run), constant, step (10x down at 1/3 and 2/3 of the run), a "
                        "JSON schedule config, or a JSON file holding one, told from a name as --model's; a cosine "
                        "or step without total_steps or step_size spans the run too (default: cosine)")
    # None, not 10: a warmup_steps in a JSON --schedule wins over the default, not over a value given
    g.add_argument("--warmup-steps", type=non_negative_int, default=None,
                   help=f"linear warm-up over this many batches (default: {DEFAULT_WARMUP_STEPS}, "
                        "or the JSON --schedule's warmup_steps)")
    g.add_argument("--seed", type=seed, default=0, help="seed of init, shuffling and dropout (default: 0)")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--batch-size", type=positive_int, default=64, help="images per update (default: 64)")
    g.add_argument("--epochs", type=positive_int, default=1, help="passes over the training set (default: 1)")
    g.add_argument("--train-limit", type=non_negative_int, default=0,
                   help="use the first N training images (0: all 60,000)")
    g.add_argument("--test-limit", type=non_negative_int, default=0,
                   help="score the first N test images (0: all 10,000)")
    g.add_argument("--mnist-dir", type=_path, default=None,
                   help="folder holding the MNIST .gz files (default: $MNIST_DIR, else download to the cache)")


def add_compute_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compute")
    g.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="NumPy (cpu) or CuPy (gpu) (default: cpu)")
    g.add_argument("--threads", type=positive_int, default=1, help="BLAS threads (default: 1)")


def add_log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   type=str.upper,      # as logging spells them, whatever case was typed
                   help="log verbosity, in any case (default: INFO)")


# --keys of a client (worker, evaluator, status): docs/deployment.md, "Authentication and encryption".
CLIENT_KEYS_HELP = ("CURVE: authenticate and encrypt with the keys in this folder (DIR/client-N of pscnn keys DIR: "
                    "this client's key pair and the server's public key); for a server started with --keys "
                    "(default: plain, unauthenticated)")


def add_server_flags(p: argparse.ArgumentParser, bind: bool = True) -> None:
    g = p.add_argument_group("parameter server")
    if bind:
        g.add_argument("--bind", type=_bind_endpoint, default="tcp://*:5555",
                       help="ZeroMQ endpoint to bind; port 0: a free one (default: tcp://*:5555)")
        g.add_argument("--endpoint-file", type=_path, default=None, metavar="PATH",
                       help="once the server listens, write the endpoint it listens on to PATH (with --bind's "
                            "port 0, the port it got): whoever started it knows where to send its clients")
        g.add_argument("--keys", type=_path, default=None, metavar="FOLDER",
                       help="CURVE: encrypt every connection and admit only the clients whose public keys are "
                            "in FOLDER/authorized (DIR/server of pscnn keys DIR, holding server.key_secret) "
                            "(default: plain, anyone who reaches the port may join)")
    g.add_argument("--mode", default="sync", choices=MODES,
                   help="consistency: sync (BSP), async, or ssp (bounded staleness) (default: sync)")
    g.add_argument("--staleness", type=non_negative_int, default=None,
                   help="ssp only: how many pushes a worker may run ahead of the slowest worker at work "
                        f"(default: {DEFAULT_STALENESS})")
    g.add_argument("--checkpoint-every", type=non_negative_float, default=30.0,
                   help="seconds between checkpoints, 0 = only at the end (default: 30)")
    add_switch(g, "--resume", help="continue from OUT/checkpoint.npz")
    g.add_argument("--lease-timeout", type=positive_float, default=30.0,
                   help="seconds before an unfinished batch is handed out again (default: 30)")
    g.add_argument("--peer-timeout", type=positive_float, default=10.0,
                   help="seconds of silence before a worker or evaluator is declared dead (default: 10)")
    g.add_argument("--final-eval-timeout", type=non_negative_float, default=None,
                   help="seconds to wait for the evaluator's final report, after which the server scores the "
                        "final weights itself; at once when the evaluator left or was declared dead and none "
                        f"is connected (default: {DEFAULT_FINAL_EVAL_TIMEOUT:g})")
    g.add_argument("--max-workers", type=positive_int, default=1024, help="refuse trainers beyond this many, and evaluators beyond as many (default: 1024)")
    g.add_argument("--log-rejected", type=non_negative_int, default=20, metavar="N",
                   help="log at most N rejected messages a second, counting the rest (0: all; default: 20)")
    g.add_argument("--wait-for-workers", type=non_negative_int, default=None, metavar="N",
                   help="hand out no work until N trainers ask for it (or --start-timeout passed), so all "
                        "start together; in sync mode with a fixed set of workers, runs are then "
                        "bit-for-bit repeatable (default: 0, start at once; pscnn run: its --workers)")
    # None, not 60: given without --wait-for-workers it would do nothing (start_timeout refuses it)
    g.add_argument("--start-timeout", type=positive_float, default=None,
                   help="seconds after the first trainer asked for work to wait for --wait-for-workers, "
                        f"then start with those there (default: {DEFAULT_START_TIMEOUT:g})")


# Seconds between evaluations, unless given (pscnn evaluator --every, pscnn run --eval-every).
EVAL_EVERY_S = 10.0
# --no-memory-check of the commands that check (cnn_core.memory.check_memory_fits, whose message names it).
MEMORY_CHECK_HELP = ("skip the up-front check that a training step fits this machine's memory: its estimate "
                     "is no measurement (a step took 0.66-1.24x of it), and may refuse a batch that fits")
OVERLAP_HELP = ("async mode: compute the next batch while the previous push travels (each trainer holds two "
                "leases; hides the round trip, gradients about N versions staler with N workers)")


def given_flag(dest: str) -> str:
    """A flag that was given, for a message refusing it: ``--momentum``, plus ``(or PSCNN_MOMENTUM)``
    when that variable is set, since the value may have come from there."""
    variable = ENV_PREFIX + dest.upper()
    flag = "--" + dest.replace("_", "-")
    return flag + (f" (or {variable})" if os.environ.get(variable, "").strip() else "")


def ssp_staleness(args) -> int:
    """The server's staleness bound from ``--staleness``: ssp's (default DEFAULT_STALENESS).

    CliError when it is given (on the command line or as PSCNN_STALENESS) with another mode,
    where it used to be ignored without a word; its default is None, so a value was given.
    """
    if args.staleness is None:
        return DEFAULT_STALENESS
    if args.mode != "ssp":
        raise CliError(f"{given_flag('staleness')} bounds --mode ssp only, not --mode {args.mode}")
    return args.staleness


def start_timeout(args) -> float:
    """The server's wait for ``--wait-for-workers`` trainers, from ``--start-timeout`` (default
    DEFAULT_START_TIMEOUT).

    CliError when it is given (on the command line or as PSCNN_START_TIMEOUT) to a server that waits
    for no trainers, where it was ignored without a word; ``pscnn run`` (``args.workers``) waits for
    its --workers unless told otherwise.
    """
    if args.start_timeout is None:
        return DEFAULT_START_TIMEOUT
    waits = args.wait_for_workers if args.wait_for_workers is not None else getattr(args, "workers", 0)
    if not waits:
        raise CliError(f"{given_flag('start_timeout')} bounds the wait for --wait-for-workers trainers, "
                       "and this server waits for none: give --wait-for-workers N too")
    return args.start_timeout


def overlap_refused(mode: str) -> str:
    """Why ``--overlap`` is refused with ``--mode`` ``mode`` (pscnn run, pscnn bench scaling): only async
    overlaps, and elsewhere the flag did nothing but a worker's log warning."""
    return f"{given_flag('overlap')} applies to --mode async only, not to --mode {mode}"


def add_client_flags(p: argparse.ArgumentParser, role: str) -> None:
    """The connection flags of a client whose role (worker.client.Client's) is ``role``."""
    g = p.add_argument_group("connection")
    g.add_argument("--server", type=_server_endpoint, default="tcp://localhost:5555",
                   help="server endpoint (default: tcp://localhost:5555)")
    g.add_argument("--name", type=_name, default=None,
                   help=f"a readable id for logs (default: {role}-HOST-PID, e.g. {role}-myhost-4242)")
    g.add_argument("--give-up-after", type=positive_float, default=600.0,
                   help="exit with status 1 after this many seconds without reaching the server"
                        + ("; a request it holds back while it answers (a sync round), after ten times that, but "
                           "not while its start barrier (--wait-for-workers) holds, which its --start-timeout "
                           "bounds" if role == "trainer" else "") + " (default: 600)")
    g.add_argument("--keys", type=_path, default=None, metavar="FOLDER", help=CLIENT_KEYS_HELP)


# --------------------------------------------------------------------------- parser

class Parser(argparse.ArgumentParser):
    """argparse's parser without abbreviated flags: ``--epoch 3`` worked as ``--epochs 3``, and a
    script's abbreviation would change meaning (or stop working) the day a flag sharing its start is
    added.  Every subcommand's parser is one too: add_subparsers makes its parsers of the parent's
    class (allow_abbrev itself is not inherited)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, allow_abbrev=False)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pscnn", description="Data-parallel CNN training through a ZeroMQ parameter server.", epilog=ENV_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="single-process training (the baseline)")
    add_model_flags(p, distributed=False)
    add_data_flags(p)
    add_compute_flags(p)
    p.add_argument("--out", type=_path, default="runs/train", help="run folder (default: runs/train)")
    p.add_argument("--log-every", type=positive_int, default=50, help="updates between metrics lines (default: 50)")
    add_switch(p, "--no-progress", help="no progress bar")
    add_switch(p, "--no-memory-check", help=MEMORY_CHECK_HELP)
    add_log_flags(p)

    p = sub.add_parser("server", help="the parameter server")
    add_server_flags(p)
    add_switch(p, "--auto-resume",
               help="continue the run in OUT if it is unfinished (a server restarted after a crash: "
                    "what Compose sets), else start a new one")
    add_model_flags(p)
    add_data_flags(p)
    p.add_argument("--out", type=_path, default="runs/server", help="run folder (default: runs/server)")
    add_log_flags(p)

    p = sub.add_parser("worker", help="a trainer worker")
    add_client_flags(p, "trainer")
    add_compute_flags(p)
    p.add_argument("--mnist-dir", type=_path, default=None,
                   help="folder holding the MNIST files (default: $MNIST_DIR or the cache)")
    p.add_argument("--compute-ms", type=non_negative_float, default=None,
                   help="benchmarks: sleep this long instead of computing, push zero gradients")
    add_switch(p, "--overlap", help=OVERLAP_HELP)
    add_switch(p, "--no-memory-check", help=MEMORY_CHECK_HELP)
    add_log_flags(p)

    p = sub.add_parser("evaluator", help="scores the newest weights on the test set")
    add_client_flags(p, "evaluator")
    add_compute_flags(p)
    p.add_argument("--every", type=positive_float, default=EVAL_EVERY_S,
                   help=f"seconds between evaluations (default: {EVAL_EVERY_S:g})")
    p.add_argument("--test-limit", type=non_negative_int, default=0,
                   help="score the first N test images (0: as many as the server's --test-limit, whose 0 is all)")
    p.add_argument("--mnist-dir", type=_path, default=None,
                   help="folder holding the MNIST files (default: $MNIST_DIR or the cache)")
    add_log_flags(p)

    p = sub.add_parser("run", help="server + N workers + evaluator on this machine")
    p.add_argument("--workers", type=positive_int, default=2, help="trainer processes (default: 2)")
    p.add_argument("--port", type=_port, default=0, help="server port on 127.0.0.1 (default: 0, a free one)")
    p.add_argument("--eval-every", type=positive_float, default=None,     # None: not given (see check_run_args)
                   help=f"seconds between evaluations (default: {EVAL_EVERY_S:g})")
    add_switch(p, "--no-evaluator",
               help="run without an evaluator (the server scores the final weights itself)")
    add_switch(p, "--overlap", help=OVERLAP_HELP)
    add_switch(p, "--curve", help="CURVE: make new keys in OUT/keys (a server's, one per child) and run every "
                                  "connection authenticated and encrypted")
    add_server_flags(p, bind=False)
    add_model_flags(p)
    add_data_flags(p)
    add_compute_flags(p)
    p.add_argument("--out", type=_path, default="runs/run", help="run folder (default: runs/run)")
    add_switch(p, "--no-progress", help="no progress bar")
    add_switch(p, "--no-memory-check", help=MEMORY_CHECK_HELP + " (its workers' checks too)")
    add_log_flags(p)

    p = sub.add_parser("status", help="ask a server for its progress; exit 0 if it answers")
    p.add_argument("--server", type=_server_endpoint, default="tcp://localhost:5555",
                   help="server endpoint (default: tcp://localhost:5555)")
    p.add_argument("--timeout", type=poll_seconds, default=2.0, help="seconds to wait for its answer (default: 2)")
    p.add_argument("--keys", type=_path, default=None, metavar="FOLDER", help=CLIENT_KEYS_HELP)

    p = sub.add_parser("keys", help="make CURVE keys: a server's, and its clients'",
                       description="Write a server key pair and --clients client key pairs (ZeroMQ certificates) "
                                   "into FOLDER, one folder per role: FOLDER/server for pscnn server --keys, "
                                   "FOLDER/client-N for a worker's, evaluator's or pscnn status's --keys. "
                                   "Secret certificates are readable by their owner only. An existing server "
                                   "or client folder there is refused, never replaced.")
    p.add_argument("folder", type=_path, metavar="FOLDER", help="where to write the keys (made if missing)")
    p.add_argument("--clients", type=key_clients, default=1,
                   help="client key pairs to make, client-0 ... (default: 1; workers may share one)")

    p = sub.add_parser("download", help="fetch and verify MNIST; print the folder (for MNIST_DIR)",
                       description="Download whichever of the four MNIST files are missing from, or corrupt "
                                   "in, the folder, verify each one's checksum, and print the folder. "
                                   "MNIST_DIR is not consulted: it names a folder that already holds the files.")
    p.add_argument("--dir", type=_path, default=None,
                   help="the folder to fill (default: $PSCNN_CACHE_DIR, else $XDG_CACHE_HOME/pscnn/mnist, "
                        "else ~/.cache/pscnn/mnist)")
    add_switch(p, "--no-progress", help="no progress bar")

    p = sub.add_parser("bench", help="benchmarks: scaling (throughput vs workers), server (capacity), "
                                     "time-to-accuracy")
    from pscnn.bench import add_bench_parsers  # noqa: PLC0415  (argparse only, no numpy)
    add_bench_parsers(p)
    _add_env_help(parser)
    return parser


ENV_HELP = ("Every flag can also be set as PSCNN_<FLAG> in the environment (e.g. PSCNN_BATCH_SIZE=128, "
            "PSCNN_NO_PROGRESS=1); a flag on the command line wins, and a switch's opposite (--progress, "
            "--no-overlap, ...) undoes a variable that set it.")


def _add_env_help(parser: argparse.ArgumentParser) -> None:
    """:data:`ENV_HELP` at the end of every subcommand's --help, where the flags are listed."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.epilog = sub.epilog or ENV_HELP
                _add_env_help(sub)


def apply_env_defaults(parser: argparse.ArgumentParser, environ=os.environ, argv=None) -> None:
    """Make ``PSCNN_<DEST>`` the default of every flag; empty means unset.

    Recurses into the subcommands that ``argv`` names (all of them when
    ``argv`` is None): a variable meant for ``pscnn server`` must not break on
    ``pscnn bench server``, whose flag of the same name takes other values.
    A value the flag rejects becomes a :class:`_BadEnv` default, which
    :func:`parse_args` reports only if the command line did not set the flag.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if argv is None:
                for sub in action.choices.values():
                    apply_env_defaults(sub, environ)
                continue
            at = next((i for i, token in enumerate(argv) if token in action.choices), None)
            if at is not None:
                apply_env_defaults(action.choices[argv[at]], environ, argv[at + 1:])
            continue
        if not action.option_strings or action.dest in ("help",):
            continue
        key = ENV_PREFIX + action.dest.upper()
        if key not in environ:
            continue
        raw = environ[key]
        if not raw.strip():             # set but empty (compose's ${VAR:-}): the flag's own default
            continue
        if isinstance(action, Switch):
            low = raw.strip().lower()
            if low not in _TRUE | _FALSE:
                action.default = _BadEnv(f"{key}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")
                continue
            action.default = low in _TRUE
            continue
        # a choice's spaces are an environment file's ("async "), as a preset name's are
        text = raw.strip() if action.choices is not None else raw
        try:
            value = action.type(text) if action.type else text
        except (ValueError, argparse.ArgumentTypeError) as exc:
            action.default = _BadEnv(f"{key}={raw!r}: {exc}")
            continue
        if action.choices is not None and value not in action.choices:
            action.default = _BadEnv(f"{key}={raw!r}: expected one of {', '.join(map(str, action.choices))}")
            continue
        action.default = value


def parse_args(argv=None, environ=os.environ) -> argparse.Namespace:
    """The command line over the ``PSCNN_<FLAG>`` variables; CliError for a bad variable.

    A variable is checked only where it counts, for a flag the command line
    did not give; ``--help`` and argparse's own errors exit (SystemExit) first.
    """
    parser = build_parser()
    warn_unknown_variables(parser, environ)
    argv = sys.argv[1:] if argv is None else list(argv)
    apply_env_defaults(parser, environ, argv=argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        refuse_unknown_arguments(parser, args, unknown)
    for value in vars(args).values():
        if isinstance(value, _BadEnv):
            raise CliError(value.message)
    return args


def refuse_unknown_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]):
    """Exit 2 with the usage of the subcommand given, naming each unknown argument and the closest
    flag: argparse left them to the top-level parser, whose usage (``pscnn [-h] COMMAND ...``)
    showed none of the flags a misspelt ``pscnn train --epocs 1`` meant."""
    command = parser
    while True:
        choices = next((action for action in command._actions
                        if isinstance(action, argparse._SubParsersAction)), None)
        if choices is None or getattr(args, choices.dest, None) not in choices.choices:
            break
        command = choices.choices[getattr(args, choices.dest)]
    flags = [flag for action in command._actions for flag in action.option_strings]
    hints = []
    for word in unknown:
        flag = word.split("=", 1)[0]
        close = []
        if flag.startswith("--"):
            # an abbreviation (refused: see Parser) names the one flag it starts, however short it is
            close = [known for known in flags if known.startswith(flag)]
            if len(close) != 1:
                close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.75)
        hints += [f"{flag}: did you mean {close[0]}?"] if close else []
    command.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else ""))


def _flag_actions(parser: argparse.ArgumentParser):
    """Every flag's action, of every subcommand (``--help`` aside)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _flag_actions(sub)
        elif action.option_strings and action.dest != "help":
            yield action


def flag_variables(parser: argparse.ArgumentParser | None = None) -> set[str]:
    """Every ``PSCNN_<FLAG>`` name that some subcommand's flag reads (what ``pscnn run``'s children
    must not inherit: the launcher gives them their settings as flags)."""
    return {ENV_PREFIX + action.dest.upper() for action in _flag_actions(parser or build_parser())}


def _opposite_hint(switch: Switch, value: str) -> str:
    """What to set instead of a variable named after ``switch``'s opposite (``--progress``'s for
    ``--no-progress``), set to ``value``: the switch's variable, with the value reversed."""
    variable = ENV_PREFIX + switch.dest.upper()
    low = value.strip().lower()
    if low and low in _TRUE | _FALSE:
        return f"did you mean {variable}={'0' if low in _TRUE else '1'}?"
    on, off = switch.option_strings
    return f"{variable}=1 is {on}, {variable}=0 is {off}"


def warn_unknown_variables(parser: argparse.ArgumentParser, environ=os.environ) -> None:
    """One warning line for each PSCNN_* name that is no pscnn setting: a misspelt
    PSCNN_EPOCHS was ignored without a word, and the run trained 1 epoch.

    A flag of another subcommand is no typo: a server container's healthcheck
    (``pscnn status``) sees the server's PSCNN_MODE, PSCNN_EPOCHS, ...
    """
    known = flag_variables(parser) | OTHER_VARIABLES
    # a switch's opposite (--progress's name for --no-progress): the hint is the switch's variable with
    # the value reversed; the switch's name alone, as it was, did the opposite of what was meant
    opposites = {ENV_PREFIX + action.option_strings[1][2:].replace("-", "_").upper(): action
                 for action in _flag_actions(parser) if isinstance(action, Switch)}
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name in known:
            continue
        # compared without the prefix, which every name shares and would make all look close
        close = difflib.get_close_matches(name.upper()[len(ENV_PREFIX):],
                                          [k[len(ENV_PREFIX):] for k in known | opposites.keys()], n=1)
        if not close:
            hint = ""
        elif ENV_PREFIX + close[0] in opposites:
            hint = f" ({_opposite_hint(opposites[ENV_PREFIX + close[0]], environ[name])})"
        else:
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)"
        print(f"pscnn: warning: {name} is not a pscnn setting{hint}; ignored", file=sys.stderr)


# Flags only some optimizers use, and which: given to another, they used to be dropped silently.
OPTIMIZER_ONLY_FLAGS = {"momentum": ("sgd",), "nesterov": ("sgd",), "weight_decay": ("adamw",)}


def check_optimizer_flags(args, name: str) -> None:
    """CliError for a flag set (on the command line or as PSCNN_<FLAG>) that optimizer ``name`` does not use.

    Their defaults are None/False, so a value here was given by the user.
    """
    for dest, takers in OPTIMIZER_ONLY_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None or value is False or name in takers:
            continue
        flag = given_flag(dest)
        if args.optimizer == "auto":
            where = f"--mode {args.mode}" if hasattr(args, "mode") else "pscnn train"
            chosen = f"--optimizer auto, which is {name} for {where}"
        else:
            chosen = f"--optimizer {name}"
        raise CliError(f"{flag} is used only by --optimizer {' or '.join(takers)}, not by {chosen}")


def base_lr(args) -> float:
    """The learning rate from the flags: ``--lr``, else the default of the optimizer they choose."""
    return args.lr if args.lr is not None else default_lr(resolve_optimizer(args), getattr(args, "mode", None))


def optimizer_config(args) -> dict:
    """The optimizer config dict (cnn_core.optim.build_optimizer) from the flags."""
    name = resolve_optimizer(args)
    check_optimizer_flags(args, name)
    cfg = {"name": name, "lr": base_lr(args), "l2": args.l2, "l1": args.l1}
    if name == "sgd":
        cfg.update(momentum=0.9 if args.momentum is None else args.momentum, nesterov=args.nesterov)
    if name == "adamw" and args.weight_decay is not None:
        cfg["weight_decay"] = args.weight_decay
    cfg["schedule"] = schedule_config(args.schedule, args.warmup_steps)
    return cfg


# The length key of each schedule that has one, in batches: the run's (resolve_auto_schedule) unless given.
AUTO_LENGTHS = {"cosine": "total_steps", "step": "step_size"}


def schedule_config(text: str, warmup_steps: int | None = None) -> dict:
    """``--schedule`` (a name or JSON) and ``--warmup-steps`` -> a schedule config dict.

    ``cosine`` without ``total_steps`` gets it filled in later from the run's
    length (key ``"total_steps": "auto"``), ``step`` without ``step_size`` a
    third of it, whether named or given as JSON.  ``warmup_steps`` None means the
    flag was not given: the JSON's ``warmup_steps`` if it has one, else
    :data:`DEFAULT_WARMUP_STEPS`; a given value the JSON contradicts is a CliError.
    """
    from cnn_core.config import named_config  # noqa: PLC0415  (after --threads took effect)
    cfg = named_config(text, "--schedule", CliError)
    # Not only for the bare names: {"name": "cosine", "min_lr": 0.001} was refused for its missing total_steps.
    length = AUTO_LENGTHS.get(cfg["name"]) if isinstance(cfg.get("name"), str) else None
    if length and length not in cfg:
        cfg[length] = "auto"
    if "warmup_steps" in cfg:
        if warmup_steps is not None and cfg["warmup_steps"] != warmup_steps:
            raise CliError(f"--warmup-steps {warmup_steps} contradicts --schedule's warmup_steps "
                           f"{cfg['warmup_steps']!r}: give one of them")
    else:
        steps = DEFAULT_WARMUP_STEPS if warmup_steps is None else warmup_steps
        if steps:
            cfg["warmup_steps"] = steps
    return cfg


def resolve_auto_schedule(opt_cfg: dict, total_updates: int) -> dict:
    """Replace ``"auto"`` lengths in a schedule config by the run's length in batches.

    ``total_updates``: epochs x batches per epoch, the steps the schedule
    counts (a sync round advances it by the number of batches it averaged).
    """
    if not opt_cfg.get("schedule"):
        return opt_cfg
    from cnn_core.text import for_count  # noqa: PLC0415  (after --threads took effect)
    sched = dict(opt_cfg["schedule"])
    if sched.get("total_steps") == "auto":
        sched["total_steps"] = max(1, total_updates)
    if sched.get("step_size") == "auto":             # decay 10x at one and two thirds
        # rounded up: a third rounded down decayed a third time for the run's last 1 or 2 updates
        sched["step_size"] = max(1, -(-total_updates // 3))
    # Lengths that do not fit the run, silent before (a bad value is build_schedule's to refuse):
    warmup, cosine_steps = sched.get("warmup_steps"), sched.get("total_steps")
    if isinstance(warmup, int) and warmup > max(total_updates, DEFAULT_WARMUP_STEPS):
        # the rate reaches lr at warm-up step warmup - 1: a longer warm-up never got there (the
        # default's few updates are left unsaid: a smoke run shorter than them is not a mistake)
        logging.getLogger("pscnn").warning(
            "a warm-up of %d %s is longer than the run's %d: the learning rate never reaches its base "
            "rate (lower --warmup-steps, or the --schedule's warmup_steps)", warmup, for_count(warmup, "update"),
            total_updates)
    if (sched.get("name") == "cosine" and isinstance(cosine_steps, int) and 1 <= cosine_steps < total_updates
            and sched.get("min_lr", 0) == 0):
        # past total_steps the rate stays at min_lr: 0, the rest of the run trained nothing (a
        # total_steps below 1 is refused: no warning before that error)
        logging.getLogger("pscnn").warning(
            "the cosine schedule's total_steps %d is shorter than the run's %d %s: the learning rate is 0 "
            "for the last %d (leave total_steps out to span the run, or set a min_lr)",
            cosine_steps, total_updates, for_count(total_updates, "update"), total_updates - cosine_steps)
    return {**opt_cfg, "schedule": sched}


def inline_file(value: str, names, what: str, error: type[Exception], check) -> str:
    """A ``--model`` or ``--schedule`` value as pscnn passes it on: a JSON file's object as JSON
    text (:func:`cnn_core.config.config_file_path` tells a file from one of ``names`` or JSON text),
    anything else as given.

    The object then travels (to ``pscnn run``'s server, and in its welcome to the workers) and is
    recorded (config.json, summary.json) as an inline one is, not as a path that another host or a
    later edit would change.  ``check(obj)`` raises what is wrong with it, here where the file's name
    is known: the error names the file (it used to name only "model spec", found later).
    """
    from cnn_core.config import config_file_path, read_config_file  # noqa: PLC0415  (after --threads)
    from cnn_core.errors import PscnnError  # noqa: PLC0415
    from cnn_core.model import MAX_SPEC_FILE_BYTES  # noqa: PLC0415
    path = config_file_path(value, names)
    if path is None:
        return value
    where = f"{what} file {path}"
    obj = read_config_file(path, where, error, MAX_SPEC_FILE_BYTES)
    try:
        check(obj)
    except (PscnnError, CliError) as exc:
        raise type(exc)(f"{where}: {str(exc).removeprefix(what + ': ')}") from None
    return json.dumps(obj, separators=(",", ":"))


def inline_model(value: str, distributed: bool = False) -> str:
    """``--model`` as pscnn passes it on (:func:`inline_file`): a spec file's spec, checked as the
    command would check it (``distributed``: also that the server's messages can carry it)."""
    from cnn_core.errors import SpecError  # noqa: PLC0415
    from cnn_core.model import PRESETS, build_model  # noqa: PLC0415
    from cnn_core.training import check_model_fits_mnist  # noqa: PLC0415

    def check(spec: dict) -> None:
        model = build_model(spec, device="cpu")
        check_model_fits_mnist(model)
        if distributed:
            from server.server import check_model_travels  # noqa: PLC0415
            check_model_travels(model.spec, {**model.params, **model.state})
    return inline_file(value, PRESETS, "model spec", SpecError, check)


def inline_schedule(args) -> str:
    """``--schedule`` as pscnn passes it on (:func:`inline_file`): a schedule file's config, checked
    with the other flags (``--warmup-steps``, the learning rate its min_lr may not exceed)."""
    from cnn_core.errors import ConfigError  # noqa: PLC0415
    from cnn_core.schedules import SCHEDULES, build_schedule  # noqa: PLC0415

    def check(cfg: dict) -> None:
        sched = schedule_config(json.dumps(cfg), getattr(args, "warmup_steps", None))
        run_lengths = {key: 1 for key, value in sched.items() if value == "auto"}     # the run's, filled in later
        build_schedule({**sched, **run_lengths}, base_lr(args))
    return inline_file(args.schedule, SCHEDULES, "--schedule", ConfigError, check)


def inline_config_files(args) -> None:
    """``--model`` and ``--schedule`` where the command has them (pscnn bench's too) as pscnn passes
    them on: a JSON file's object inline (:func:`inline_model`, :func:`inline_schedule`)."""
    if isinstance(getattr(args, "model", None), str):
        args.model = inline_model(args.model, distributed=args.command != "train")
    if isinstance(getattr(args, "schedule", None), str):     # pscnn bench time-to-accuracy's may be None
        args.schedule = inline_schedule(args)


def cap_limits(args) -> None:
    """A ``--train-limit`` / ``--test-limit`` above its set's size becomes the size, said in one warning
    line: it was capped without a word, and the run's summary showed a count other than the one asked.

    The capped value is what the run records and what ``pscnn run`` hands its children (no second warning).
    """
    from cnn_core.data import MNIST_FILES  # noqa: PLC0415  (after --threads took effect)
    for dest, images, what in (("train_limit", "train-images", "training"), ("test_limit", "test-images", "test")):
        asked, size = getattr(args, dest, 0), MNIST_FILES[images]["count"]
        if asked > size:
            print(f"pscnn: warning: {given_flag(dest)} {asked} asks for more than the {size:,} {what} images: "
                  f"using all {size:,}", file=sys.stderr)
            setattr(args, dest, size)


def set_blas_threads(threads: int) -> None:
    """Pin BLAS/OpenMP threads; effective only before numpy is imported."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)-7s {role}: %(message)s", datefmt="%H:%M:%S")


def check_run_folder(flag: str, path: str) -> None:
    """RunLogError (exit 1) if ``path`` is a file: mkdir would say no more than "File exists"; or if
    a file stands among its parents, which made it "cannot write: Not a directory" only where the
    folder was made, after the run's data was read (train), the port bound (server), the MNIST
    folder checked (run)."""
    from cnn_core.runlog import RunLogError  # noqa: PLC0415
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunLogError(f"{flag} {path} is a file, not a folder")
    nearest = os.path.abspath(path)
    while not os.path.exists(nearest) and os.path.dirname(nearest) != nearest:
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        raise RunLogError(f"{flag} {path}: {nearest} is a file, not a folder")


def check_train_folder(path: str) -> None:
    """RunLogError (exit 1) if ``path`` holds the checkpoint of an unfinished distributed run.

    ``pscnn train`` there replaced that run's config.json and metrics.jsonl, and its summary.json,
    newer than the checkpoint, made the run look finished: the next ``pscnn run`` in that folder
    started over, replacing the checkpoint too, without the server's warning.
    """
    if not os.path.exists(os.path.join(path, "checkpoint.npz")):
        return                          # no server's import (zmq) for the usual train folder
    from cnn_core.runlog import RunLogError  # noqa: PLC0415
    from server.resume import unfinished_run_warning  # noqa: PLC0415
    if unfinished_run_warning(path):
        raise RunLogError(f"--out {path} holds the checkpoint of an unfinished distributed run, whose "
                          "config.json and metrics.jsonl pscnn train would replace: choose another --out, "
                          "or continue that run with pscnn run (or server) --resume")


# What needs less memory where the command has no --batch-size of its own: a trainer computes the
# batches of the server's, an evaluator its own batches of 1,000 images (cnn_core.metrics.evaluate).
OUT_OF_MEMORY_ADVICE = {"worker": "a smaller model, or a smaller --batch-size given to the server, needs less",
                        "evaluator": "a smaller model needs less (the evaluator runs 1,000 test images at a time)"}


def main(argv=None, signals_before=()) -> int:
    """``signals_before``: the signals that came before it, while this module loaded (see
    pscnn.__main__, the console script): they come again once its handlers are set."""
    stop_on_signals()       # first of all: a stop from now on is noted (see stop_on_signals)
    restore_unraisablehook = unprint_lost_stops()
    stop_with_launcher()
    command = None          # not known until the command line is parsed
    try:
        for signum in signals_before:
            signal.raise_signal(signum)     # its handler runs before this returns
        # parsed in here: a Ctrl-C while the parser is built (pscnn bench's modules load) is an interrupt too
        args = parse_args(argv)
        command = args.command
        stop_on_signals(command)            # a stop noted while parsing ends the command here
        if getattr(args, "threads", None):
            set_blas_threads(args.threads)
        if args.command != "bench":     # pscnn bench's among its option checks: a usage error (exit 2)
            inline_config_files(args)
        cap_limits(args)
        if args.command in ("train", "server", "run"):
            check_run_folder("--out", args.out)
        if args.command == "train":
            check_train_folder(args.out)
        return int(_dispatch(args) or 0)
    except KeyboardInterrupt:
        print("pscnn: interrupted", file=sys.stderr)
        return 130
    except ImportError:
        # A stop raised while a C extension was imported comes out as an ImportError: numpy's import
        # of datetime (PyCapsule_Import) replaces whatever that import raised, so a SIGTERM in a
        # command's first second ended it with numpy's advice on broken installs, a traceback and
        # exit status 1.  The stop's exception is lost; its note is not.  So is a Ctrl-C's.
        if not _stops_raised:
            raise
        if isinstance(_stop_exception(command, _stops_raised[0]), SystemExit):
            return 0
        print("pscnn: interrupted", file=sys.stderr)
        return 130
    except CliError as exc:
        print(f"pscnn: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # stdout closed early (`pscnn status | head -1`): no traceback, and what is left in its buffer
        # goes nowhere (the flush at exit would fail again)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        from cnn_core.errors import PscnnError  # noqa: PLC0415
        if isinstance(exc, PscnnError):
            print(f"pscnn: error: {exc}", file=sys.stderr)
            return getattr(exc, "exit_status", 1)      # a trainer the server dropped: 3
        if isinstance(exc, MemoryError):
            # A model within the spec's limits still asks for its per-image values times the batch
            # (a BatchNorm model's whole batch at once): NumPy's refusal was a traceback.
            advice = OUT_OF_MEMORY_ADVICE.get(command, "a smaller --batch-size or model needs less")
            print(f"pscnn: error: out of memory: {str(exc) or 'an allocation failed'}; {advice}", file=sys.stderr)
            return 1
        raise
    finally:
        restore_unraisablehook()        # main() in-process (tests): the hook it found


PR_SET_PDEATHSIG = 1                    # <linux/prctl.h>


def stop_with_launcher(environ=os.environ) -> None:
    """In a child of a :class:`LocalCluster`: have the kernel send it SIGTERM when the launcher dies.

    A launcher killed outright (kill -9, the OOM killer) cannot stop its children, and each runs in
    its own session: they ran on with nobody to stop them, the server holding its port.  With
    this, the server checkpoints and stops and the clients say goodbye, as on the launcher's own
    Ctrl-C (all at once, not the server first).  Linux only (prctl PR_SET_PDEATHSIG); elsewhere,
    or outside a launcher (no LAUNCHER_PID_VARIABLE), nothing.
    """
    launcher_pid = environ.pop(LAUNCHER_PID_VARIABLE, None)
    if not launcher_pid or not sys.platform.startswith("linux"):
        return
    import ctypes  # noqa: PLC0415
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        print(f"pscnn: warning: cannot follow the launcher (prctl: {os.strerror(ctypes.get_errno())}); "
              "if it dies, stop this process yourself", file=sys.stderr)
    elif str(os.getppid()) != launcher_pid:     # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


# SIGTERM (kill, docker stop, a launcher stopping its children) and SIGHUP (the terminal closed, an
# ssh session dropped): they stop every command as documented, never kill it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# The commands they end with exit status 0 (README, docs/deployment.md): an orchestrator must not
# restart these. The others (pscnn train, run, ...) stop as on Ctrl-C: "pscnn: interrupted", 130.
STOPPED_WITH_SUCCESS = ("server", "worker", "evaluator")
_stops_noted: list[int] = []             # the STOP_SIGNALS received before the command was known
_stops_raised: list[int] = []            # the signals whose stop (or Ctrl-C) was raised as an exception (see main)


def stop_on_signals(command: str | None = None) -> None:
    """The one place where each command's STOP_SIGNALS handling starts, in :func:`main`.

    Called first of all with no ``command`` (the command line is not parsed yet), a stop signal is
    noted; called again with the parsed ``command``, a noted one stops it at once, and every later
    one where it comes: SystemExit(0) for :data:`STOPPED_WITH_SUCCESS`, else KeyboardInterrupt (the
    "interrupted" record of ``pscnn train``, ``pscnn run``'s stop of its children).  The server
    then sets its own handler as it starts serving (it checkpoints, then exits 0); a worker and the
    evaluator catch the SystemExit to say goodbye.

    Without this, a command signalled before its own handler (its first half second: the imports,
    loading MNIST, a download) was killed (-15), and in a container, as PID 1, which the kernel
    spares a signal that has no handler, it ignored the stop until Docker's SIGKILL.  The stop
    happens once: later STOP_SIGNALS are ignored (:func:`ignore_stop_signals`).

    Ctrl-C (SIGINT) interrupts at once, command known or not, as Python's own handler does; but
    it is noted, as a stop is (:func:`interrupt_noted`).
    """
    if command is None:
        del _stops_noted[:]
        del _stops_raised[:]
        try:
            # Not where Ctrl-C is ignored (SIG_IGN: a command started in the background by a shell) or
            # kills (SIG_DFL); a Python handler, Python's own or the console script's, it replaces.
            if callable(signal.getsignal(signal.SIGINT)):
                signal.signal(signal.SIGINT, interrupt_noted)
        except ValueError:              # main() called off the main thread (tests): no handlers
            return

    def stop(signum, frame):
        if command is None:
            _stops_noted.append(signum)
            return
        ignore_stop_signals()
        _raise_noted(signum, _stop_exception(command, signum))
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, stop)
        except ValueError:              # main() called off the main thread (tests): no handlers
            return
    if command is not None and _stops_noted:
        stop(_stops_noted[0], None)


def stop_raised() -> bool:
    """Whether a stop signal's exception (:func:`stop_on_signals`), or Ctrl-C's, was raised in this process.

    Code that runs on after it, other than the stop's own handling (a worker's goodbye), runs because
    the exception was lost: raised inside a weakref callback or a ``__del__``, where Python prints
    "Exception ignored" and goes on (importlib's module-lock callback, while a module loads), or in C
    code that clears it.  The stop was lost for good then: later stop signals are ignored.  A server
    SIGTERMed as it loaded served on, till a SIGKILL (2 of 60 SIGTERMs 0.2-0.9 s in)."""
    return bool(_stops_raised)


def _stop_exception(command: str | None, signum: int) -> BaseException:
    """What signal ``signum`` raises in ``command``: KeyboardInterrupt for Ctrl-C; for a stop signal,
    SystemExit(0) in STOPPED_WITH_SUCCESS, else KeyboardInterrupt."""
    if signum != signal.SIGINT and command in STOPPED_WITH_SUCCESS:
        return SystemExit(0)
    return KeyboardInterrupt()


def raise_lost_stop(command: str) -> None:
    """Raise the stop's exception in ``command`` again, if one was lost as it loaded (see
    :func:`stop_raised`): called once a command has loaded, else it worked on deaf to the stop
    signals that followed (``pscnn train`` trained, ``pscnn run`` started a whole run, a worker joined)."""
    if stop_raised():
        raise _stop_exception(command, _stops_raised[0])


def interrupt_noted(signum, frame):
    """Ctrl-C's handler from the start of :func:`main` (and the end of pscnn run's, for every stop
    signal): Python's KeyboardInterrupt, noted.  Raised while numpy loads, it came out as numpy's
    ImportError (see main), a traceback and exit status 1, or was lost in importlib's weakref
    callback (see :func:`stop_raised`): the note tells."""
    _raise_noted(signum, KeyboardInterrupt())


def _raise_noted(signum: int, stop: BaseException):
    """Raise ``stop``, a stop signal's or Ctrl-C's exception, noted (:func:`stop_raised`): the one
    place pscnn's stop handlers raise, which tells :func:`unprint_lost_stops` their exceptions."""
    _stops_raised.append(signum)
    raise stop


def unprint_lost_stops():
    """Have ``sys.unraisablehook`` leave unprinted the stops that pscnn's handlers raised where Python
    could not raise them (see :func:`stop_raised`), and hand it everything else; returns what restores
    the hook it found.  Python printed "Exception ignored in: <function _ModuleLock...>" and a
    traceback ending in KeyboardInterrupt above "pscnn: interrupted", for what was a plain Ctrl-C
    that the command took up (:func:`raise_lost_stop`).  Off the main thread (:func:`main` in
    tests' threads), where no handler of pscnn's runs, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _raised_by_stop_handler(unraisable.exc_traceback):
            previous(unraisable)
    sys.unraisablehook = hook

    def restore():
        if sys.unraisablehook is hook:  # else set since by someone who restores theirs
            sys.unraisablehook = previous
    return restore


def _raised_by_stop_handler(traceback) -> bool:
    """Whether the exception of ``traceback`` was raised by :func:`_raise_noted`."""
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and traceback.tb_frame.f_code is _raise_noted.__code__


def ignore_stop_signals() -> None:
    """A stop is under way: from now on, STOP_SIGNALS are ignored (Ctrl-C still interrupts).

    A stop signal may come more than once: a launcher killed outright (kill -9) signals each
    child once for every thread it had, as the kernel hands the orphan from one dying thread to
    the next (PR_SET_PDEATHSIG, see :func:`stop_with_launcher`).  A repeat raised SystemExit again
    inside a worker's goodbye, which never reached the server or its log, and one after Python
    had restored the default handlers at its exit killed a process (-15) that had stopped cleanly.
    Ignored, they cannot: by :func:`ignored_signal` while Python runs (a signal may already be
    pending, as SIGTERM is when SIGHUP comes with it: systemd's stop), and by SIG_IGN (which Python
    keeps) from the start of its exit.  Off the main thread, nothing."""
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, ignored_signal)
        except ValueError:              # not the main thread (tests): no handlers to change
            return
    atexit.unregister(_ignore_stop_signals_at_exit)     # registered once
    atexit.register(_ignore_stop_signals_at_exit)


def ignored_signal(signum, frame):
    """A signal handler that does nothing: a stop signal once a stop is under way (here, and in
    pscnn run's launcher).  A handler, not SIG_IGN: for a signal already pending when the handler
    became SIG_IGN, Python printed a traceback ("OSError: Signal 15 ignored due to race condition")."""


def _ignore_stop_signals_at_exit() -> None:
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is ignored_signal:  # not a handler set since (main() in-process: tests)
            signal.signal(sig, signal.SIG_IGN)


# Each command's entry point, (module, function): imported only for the command run (numpy and
# ZeroMQ are a second of the start), and called with the parsed flags.
COMMANDS = {
    "train": ("cnn_core.training", "train_from_args"),
    "server": ("server.server", "serve_from_args"),
    "worker": ("worker.trainer", "run_trainer_from_args"),
    "evaluator": ("worker.evaluator", "run_evaluator_from_args"),
    "run": ("pscnn.launcher", "run_from_args"),
    "download": ("cnn_core.data", "download_from_args"),
    "status": ("worker.client", "status_from_args"),
    "keys": ("pscnn.curve", "keys_from_args"),
    "bench": ("pscnn.bench", "run_bench_from_args"),
}
LOGGING_COMMANDS = ("train", "server", "worker", "evaluator", "run")     # log lines, at --log-level


def _dispatch(args) -> int:
    from cnn_core.backend import tune_host_allocator  # noqa: PLC0415
    tune_host_allocator()
    cmd = args.command
    if cmd not in COMMANDS:
        raise CliError(f"unknown command {cmd!r}")
    if cmd in LOGGING_COMMANDS:
        setup_logging(args.log_level, cmd)
    module, function = COMMANDS[cmd]
    entry = getattr(importlib.import_module(module), function)
    # A stop lost while the entry point's modules loaded is taken up here, before the command works.
    # The server, workers and evaluator take theirs up where they start serving or connect.
    if cmd not in STOPPED_WITH_SUCCESS:
        raise_lost_stop(cmd)
    return entry(args)


if __name__ == "__main__":
    # `python -m pscnn.cli` (how pscnn run starts its children) runs this file as __main__, while
    # the modules it calls import pscnn.cli: a second copy, whose CliError __main__'s main() would
    # not catch.  Run the copy everyone imports, so there is one CliError.
    from pscnn.cli import main as _main
    sys.exit(_main())
