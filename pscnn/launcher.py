"""``pscnn run``: a server, N trainer workers and an evaluator on this machine.

Each role is its own process (``python -m pscnn.cli ...``), exactly as in a
multi-host deployment, talking over TCP on 127.0.0.1.  The launcher shows one
progress bar fed by the server's ``status`` answers, writes each child's log
to ``OUT/logs/``, and on Ctrl-C stops the server first (it writes a checkpoint
of whole sync rounds only, so ``--resume`` continues the run), then the workers
and the evaluator.

:class:`LocalCluster` is the same machinery as a context manager, for tests
and benchmarks: start a server and clients, kill or add some, wait, clean up.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cnn_core.config import is_number
from cnn_core.data import training_set_size
from cnn_core.metrics import ACCURACY_MILESTONES
from cnn_core.runlog import (SUMMARY_FILE, TIMELINE_PARTS, RunLogError, check_folder_free, make_folder,
                             time_shares_text, worker_time_shares)
from cnn_core.text import for_count
from cnn_core.memory import check_memory_fits
from cnn_core.training import classes_scored, format_number, per_class_text
from pscnn import curve
from pscnn.cli import STOP_SIGNALS, ignored_signal, interrupt_noted, raise_lost_stop
from pscnn.protocol import one_line, tcp_address
from server.config import config_from_args
from server.resume import (CHECKPOINT_NAME, checkpoint_version, resume_advice, summary_after_checkpoint,
                           unfinished_run_warning)
from server.server import DROPPED_FOR_NAN, ParameterServer, checked_store
from worker.client import BadReply, DroppedByServer, query_status
from worker.trainer import check_local_setup

log = logging.getLogger("pscnn.run")

# Flags of `pscnn run` passed through to `pscnn server` unchanged.
SERVER_FLAGS = ("mode", "staleness", "checkpoint_every", "resume", "lease_timeout", "peer_timeout",
                "final_eval_timeout", "max_workers", "log_rejected", "wait_for_workers", "start_timeout", "model", "optimizer",
                "lr", "momentum", "nesterov", "weight_decay", "l2", "l1", "schedule", "warmup_steps", "seed",
                "batch_size", "epochs", "train_limit", "test_limit", "mnist_dir", "out", "log_level")


# tqdm's default bar without its own rate: batches over the wall time since the bar started (the
# workers' start-up and the final evaluation included), it disagreed with the server's images/s
# beside it (make run: 29.07 batch/s, i.e. 1,860 images/s, next to 1,418 img/s).  The count is
# named: a sync run's 200/200 read as its updates (100 rounds of two batches), beside "at update 100".
RUN_BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} batches [{elapsed}<{remaining}{postfix}]"


def local_endpoint(port: int) -> str:
    """Where a local cluster's server listens (loopback only)."""
    return f"tcp://127.0.0.1:{port}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str = "condition", interval: float = 0.2, on_fail=None):
    """Poll ``predicate()`` until it returns a truthy value (returned), for at most ``timeout``
    seconds (then RuntimeError naming ``what``, and ``on_fail()``'s text, e.g. a log tail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = on_fail() if on_fail else ""
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{detail}" if detail else ""))
        time.sleep(interval)


def flag_with(flag: str, value) -> str:
    """``--flag=VALUE``, one word: a child's parser took a VALUE that begins with ``-`` (``--out=-run``)
    for a flag of its own, and refused the run it was started for."""
    return f"{flag}={value}"


def flags_from(args, dests) -> list[str]:
    """argparse values -> command-line flags (None skipped, booleans as bare flags, :func:`flag_with`)."""
    out = []
    for dest in dests:
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        out.append(flag if value is True else flag_with(flag, value))
    return out


def child_env(threads: int = 1) -> dict:
    """This environment for a child process, less the PSCNN_<FLAG> variables.

    The children get every setting as a flag; a PSCNN_<FLAG> the parent was
    started with would also reach flags the launcher leaves at their default
    (PSCNN_COMPUTE_MS made every worker push zero gradients), and an unknown
    PSCNN_* name, which the parent already warned about, would be warned about
    again in every child's log.  Settings that are no flag (PSCNN_CACHE_DIR,
    PSCNN_MNIST_MIRRORS) stay.
    """
    from pscnn.cli import ENV_PREFIX, OTHER_VARIABLES  # noqa: PLC0415  (pscnn.cli imports nothing heavy)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX) or k in OTHER_VARIABLES}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# How long LocalCluster.start_server waits for its server to listen: it builds the model first (4 s for
# 26 million parameters) and, with --resume, reads the checkpoint; far less, unless something hangs.
SERVER_LISTEN_TIMEOUT_S = 600.0

# Bytes of a child's log read from its end for its last lines (doubled while too few line ends).
LOG_TAIL_BLOCK = 64 << 10


class LocalCluster:
    """Processes of one run on this machine, with their logs in ``out/logs``.

    Each child stops (SIGTERM) when the process that started it dies: see
    :func:`pscnn.cli.stop_with_launcher`."""

    def __init__(self, out: str | Path, port: int | None = None, threads: int = 1, keys: str | Path | None = None,
                 peer_timeout: float | None = None):
        """``port``: the server's; None: a free one, which the first server started binds itself
        (:meth:`start_server`), ``port`` and ``endpoint`` None until then.  ``keys``: a folder of CURVE
        keys (:func:`make_run_keys`): the server gets its ``server``
        folder, each child the folder of its name, :meth:`status` that of :data:`STATUS_KEYS`.
        ``peer_timeout``: the server's --peer-timeout (None: its default), which the progress bar's
        hints follow."""
        self.peer_timeout = peer_timeout
        self.out = Path(out)
        self.keys = Path(keys) if keys is not None else None
        self.status_keys = curve.client_keys(self.keys / STATUS_KEYS) if self.keys is not None else None
        self.logs = self.out / "logs"
        make_folder(self.logs)
        self.port = port or None
        self.endpoint = local_endpoint(port) if port else None
        from pscnn.cli import LAUNCHER_PID_VARIABLE  # noqa: PLC0415  (pscnn.cli imports nothing heavy)
        self.env = {**child_env(threads), LAUNCHER_PID_VARIABLE: str(os.getpid())}
        self.procs: dict[str, subprocess.Popen] = {}
        self._files = []
        self._log_starts: dict[str, int] = {}      # name -> where its latest start's output begins in its log

    def start(self, name: str, argv: list[str], prefix: Sequence[str] = ()) -> subprocess.Popen:
        """Start ``pscnn <argv>`` as ``name``; its output goes to logs/<name>.log.

        The log is added to, under a line saying when this child started: what an earlier
        one wrote (a server killed before a --resume, a run started over in the same
        folder) stays, and each start's lines (its pid among them) are told apart.
        ``prefix``: a command that runs the child in place (it must exec it, not fork),
        e.g. ``ip netns exec HOST`` for another network namespace, or ``taskset -c 0``."""
        try:
            fh = open(self.logs / f"{name}.log", "ab")
            started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            fh.write(f"==== {started}: {name} started (pscnn {argv[0]}) ====\n".encode())
            fh.flush()                  # before the child writes to the same file
            self._log_starts[name] = fh.tell()
        except OSError as exc:          # e.g. a folder there: one line, not a traceback
            raise RunLogError(f"{self.logs / f'{name}.log'}: cannot write: {exc.strerror or exc}") from None
        self._files.append(fh)
        # -m pscnn, the console script's module: it notes a stop that comes while pscnn.cli loads
        # (-m pscnn.cli had no handler then, and a server stopped as pscnn run started was killed, -15)
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "pscnn", *argv], stdout=fh,
                                stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)   # Ctrl-C reaches only the launcher
        self.procs[name] = proc
        return proc

    def start_server(self, flags: list[str], name: str = "server", prefix: Sequence[str] = ()) -> subprocess.Popen:
        """Start ``pscnn server`` as ``name`` and return once it listens, or has exited (it could not bind,
        or failed before): its clients started then join it, not whatever else holds the port.

        Without a port yet, the server binds port 0, a free one for sure, and tells which
        (--endpoint-file): a port that was free a moment ago (:func:`free_port`) could be taken by
        another process before the server, a second later, bound it, and `pscnn run` failed with
        "Address already in use" (its evaluator had joined that process's run, a pscnn server's)."""
        told = self.logs / f"{name}.endpoint"
        told.unlink(missing_ok=True)            # an earlier start's, killed before it was read
        proc = self.start(name, ["server", "--bind", self.endpoint or local_endpoint(0),
                                 flag_with("--endpoint-file", told), *self._keys_flag(curve.SERVER_NAME), *flags],
                          prefix)
        deadline = time.monotonic() + SERVER_LISTEN_TIMEOUT_S
        while not told.exists() and proc.poll() is None:
            if time.monotonic() > deadline:
                raise RunLogError(f"the server has not started listening within {SERVER_LISTEN_TIMEOUT_S:.0f} s "
                                  f"(see {self.logs / f'{name}.log'})")
            time.sleep(0.02)
        if told.exists():
            self.port = int(tcp_address(told.read_text().strip())[1])
            self.endpoint = local_endpoint(self.port)
            told.unlink()
        return proc

    def start_worker(self, name: str, flags: list[str] = ()) -> subprocess.Popen:
        return self.start(name, ["worker", "--server", self.endpoint, "--name", name, *self._keys_flag(name), *flags])

    def start_evaluator(self, flags: list[str] = (), name: str = "evaluator") -> subprocess.Popen:
        return self.start(name, ["evaluator", "--server", self.endpoint, "--name", name, *self._keys_flag(name),
                                 *flags])

    def _keys_flag(self, name: str) -> list[str]:
        return [flag_with("--keys", self.keys / name)] if self.keys is not None else []

    def status(self, timeout: float = 1.0) -> dict | None:
        """The server's status answer; None without one (no server has listened yet: None at once)."""
        if self.endpoint is None:
            return None
        return query_status(self.endpoint, timeout, self.status_keys)

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last ``lines`` lines of what child ``name`` wrote, since its latest start ("" if nothing).

        Read from the end, a block at a time, until it holds more than ``lines`` line ends: a long
        run's server log (a rejected push is a line) was read whole, 2.5 s and over 1 GB of memory
        for 209 MB, for its last 20 lines.  Past the first line end the text is the whole read's."""
        start = self._log_starts.get(name, 0)
        try:
            with open(self.logs / f"{name}.log", "rb") as fh:
                end = fh.seek(0, os.SEEK_END)
                block = LOG_TAIL_BLOCK
                while True:
                    begin = max(start, end - block)
                    fh.seek(begin)
                    data = fh.read(end - begin)
                    if begin == start or data.count(b"\n") > lines:
                        break
                    block *= 2
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def wait(self, name: str, timeout: float) -> int | None:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)

    def stop_all(self, grace: float = 10.0, order=("worker", "evaluator", "server"), on_kill=None) -> dict:
        """SIGTERM in ``order`` of name prefixes, SIGKILL what outlives ``grace`` (``on_kill(name)``
        first, e.g. to say so); exit codes."""
        for prefix in order:
            group = [n for n in self.procs if n.startswith(prefix)]
            for n in group:
                self.kill(n, signal.SIGTERM)
                # a stopped child (SIGSTOP, Ctrl-Z) holds SIGTERM pending until it is killed: continued,
                # it stops as it should (the server writes its checkpoint)
                self.kill(n, signal.SIGCONT)
            deadline = time.monotonic() + grace
            for n in group:
                if self.wait(n, max(0.1, deadline - time.monotonic())) is None:
                    if on_kill is not None:
                        on_kill(n)
                    self.kill(n, signal.SIGKILL)
                    self.wait(n, 5)
        return {n: p.returncode for n, p in self.procs.items()}

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for fh in self._files:
            fh.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# The client key of a LocalCluster's own status queries (the progress bar), beside its children's.
STATUS_KEYS = "run"


def worker_name(index: int) -> str:
    return f"worker-{index}"


def make_run_keys(out: str | Path, workers: int) -> Path:
    """``pscnn run --curve``: new CURVE keys in OUT/keys for the server, ``workers`` workers, the
    evaluator and the launcher's status queries -> that folder (for :class:`LocalCluster`).

    An earlier run's keys there are replaced: every process of this run gets the new ones."""
    folder = Path(out) / "keys"
    shutil.rmtree(folder, ignore_errors=True)
    curve.make_keys(folder, [*(worker_name(i) for i in range(workers)), "evaluator", STATUS_KEYS])
    return folder


def check_port_free(endpoint: str) -> None:
    """EndpointError (one line) unless the server could bind ``endpoint`` now, checked as it binds.

    A port taken by another pscnn server would otherwise fail only this run's server, after its
    workers and evaluator, started at the same time, had joined that other server's run.
    """
    import zmq  # noqa: PLC0415

    from pscnn import protocol as P  # noqa: PLC0415
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        P.bind(sock, endpoint)
    except P.EndpointError as exc:
        raise P.EndpointError(f"{exc} (another pscnn server or run on that port? leave --port out for a "
                              "free one)") from None
    finally:
        sock.close(linger=0)
        ctx.term()                      # the port is released before the server binds it


def check_workers_have_batches(workers: int, num_samples: int, batch_size: int, workers_flag: str = "--workers",
                               batch_flag: str = "--batch-size") -> None:
    """CliError unless an epoch has a batch for each of ``workers``: the server leases one epoch's
    batches at a time, so a worker beyond them never computed in a sync round (the report counted
    fewer workers than asked), and a benchmark point waited minutes for its push, then failed."""
    from cnn_core.data import batches_per_epoch  # noqa: PLC0415
    from pscnn.cli import CliError  # noqa: PLC0415
    batches = batches_per_epoch(num_samples, batch_size)
    if workers > batches:
        raise CliError(f"{workers_flag} {workers} exceeds the {batches:,} {for_count(batches, 'batch', 'batches')} "
                       f"of an epoch ({num_samples:,} training images, {batch_flag} {batch_size}): a worker "
                       f"computes one batch at a time, so {workers - batches:,} of them would have none")


def check_workers_fit_memory(args, cfg, model) -> None:
    """ConfigError unless this machine's memory holds --workers training steps of ``model`` at once
    (:func:`~cnn_core.memory.check_memory_fits`): each worker checked its own step alone against
    the same free memory, so 4 workers that each fit but not together all started, and the OOM
    killer ended some at their first batch.  GPU workers: not checked (their memory is the GPU's),
    nor with --no-memory-check."""
    from pscnn.cli import given_flag  # noqa: PLC0415
    if args.device != "cpu" or args.no_memory_check:
        return
    batch = min(cfg.batch_size, training_set_size(cfg.train_limit))
    check_memory_fits(model, batch, f"{given_flag('workers')} {args.workers} and {given_flag('batch_size')} "
                      f"{cfg.batch_size}", steps=args.workers)


def check_run_args(args, server_follows: bool = False):
    """What the server would refuse, checked before any process starts: one line from ``pscnn run``
    itself (CliError, exit 2, for flags; SpecError / ConfigError, exit 1, for the model and optimizer)
    instead of the server's log tail.  Returns the server's config (a ServerConfig) and the model and
    optimizer checked (a ParameterStore), None when ``server_follows``: the caller makes a ParameterServer
    of that config next, which checks the model and the optimizer (checked_store) itself; building them
    here too cost one more random initialization (4 s for 26 million parameters), each time."""
    from pscnn.cli import CliError, given_flag, overlap_refused  # noqa: PLC0415
    # given_flag: a flag the user did not type may come from its PSCNN_<FLAG> variable, which is then named
    if args.workers > args.max_workers:
        raise CliError(f"{given_flag('workers')} {args.workers} exceeds {given_flag('max_workers')} "
                       f"{args.max_workers}: the server would refuse {args.workers - args.max_workers} of them")
    if args.wait_for_workers is not None and args.wait_for_workers > args.max_workers:
        raise CliError(f"{given_flag('wait_for_workers')} {args.wait_for_workers} exceeds "
                       f"{given_flag('max_workers')} {args.max_workers}: the run could never start with all of them")
    if args.wait_for_workers is not None and args.wait_for_workers > args.workers:
        # pscnn run starts --workers trainers: the barrier held every one of them for --start-timeout
        raise CliError(f"{given_flag('wait_for_workers')} {args.wait_for_workers} exceeds {given_flag('workers')} "
                       f"{args.workers}: the run's workers would wait --start-timeout for trainers it never starts")
    if getattr(args, "no_evaluator", False) and args.eval_every is not None:
        # with no evaluator to give it to, it was dropped without a word (getattr: pscnn bench's server flags)
        raise CliError(f"{given_flag('eval_every')} sets the evaluator's period, and {given_flag('no_evaluator')} "
                       "starts none")
    if getattr(args, "no_evaluator", False) and args.final_eval_timeout is not None:
        # the server gets 0 (it scores the final weights at once), so a value given was dropped
        raise CliError(f"{given_flag('final_eval_timeout')} waits for the evaluator's final report, and "
                       f"{given_flag('no_evaluator')} starts none")
    if getattr(args, "overlap", False) and args.mode != "async":
        raise CliError(overlap_refused(args.mode))
    cfg = config_from_args(args)                    # the optimizer config as the server will build it
    store = None
    if not server_follows:
        store = checked_store(cfg)                  # the model and the optimizer, as the server checks them
        check_workers_fit_memory(args, cfg, store.model)
    check_workers_have_batches(args.workers, training_set_size(cfg.train_limit), cfg.batch_size,
                               given_flag("workers"), given_flag("batch_size"))
    return cfg, store


# Every worker gone and the server silent this long (scoring the final weights itself, it answers
# between two batches of the test set): it is stopped rather than waited on for ever.  Not while it
# is stopped (SIGSTOP, Ctrl-Z, a debugger): that is silence the user chose (see process_stopped).
SILENT_SERVER_S = 60.0

# A sync round with nothing applied for this long, or half the run's --peer-timeout if less, is said to
# wait on its missing workers: the server's images/s, over 5 s, fell to 0 only as --peer-timeout 5
# declared the dead worker, so the hint appeared with the drop it was to announce.
ROUND_WAIT_HINT_S = 5.0


def round_wait_hint_after(peer_timeout: float | None) -> float:
    """Seconds with nothing applied before the bar says what a sync round waits on."""
    return ROUND_WAIT_HINT_S if peer_timeout is None else min(ROUND_WAIT_HINT_S, peer_timeout / 2)


def process_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped by a signal (``T``) or by a debugger (``t``), from Linux's
    /proc/PID/stat; False where /proc is absent or the process is gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")


def _say(text: str) -> None:
    """A message on stderr that cannot fail: after SIGHUP the terminal may be gone (EIO)."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


class RunOutputs:
    """The run folder's checkpoint and summary.json, as `pscnn run` found them at its start: what an
    older run left there is no output of this one."""

    def __init__(self, out: str | Path, resume: bool, earlier_resume: str | None = None):
        """``earlier_resume``: the checkpoint there is an unfinished run's, which this one starts over, and
        this is how to continue that run (see :func:`earlier_run_resume`)."""
        self.out = Path(out)
        self.checkpoint = self.out / CHECKPOINT_NAME
        self.summary = self.out / SUMMARY_FILE
        self.resume = resume
        self.earlier_resume = earlier_resume
        self.checkpoint_before = _mtime(self.checkpoint)
        self.summary_before = _mtime(self.summary)

    def finished(self) -> bool:
        """Whether this run's server wrote summary.json, after its last checkpoint: the run is over
        (complete or diverged)."""
        written = _mtime(self.summary)
        return written is not None and written != self.summary_before and summary_after_checkpoint(self.out)

    def diverged(self) -> bool:
        """Whether the finished run's summary.json says it diverged (False if it cannot be read)."""
        try:
            return json.loads(self.summary.read_text()).get("status") == "diverged"
        except (OSError, ValueError, AttributeError):
            return False

    def resume_hint(self, interrupted: bool = False) -> str | None:
        """How to continue the run, stopped before its end: the same command plus --resume, once the
        server wrote a checkpoint of this run (or of the run it resumed); that nothing was trained
        when that checkpoint is of version 0; None before a checkpoint, or when the run had finished.
        ``interrupted``: stopped by the user (Ctrl-C), with no failure above to fix."""
        written = _mtime(self.checkpoint)
        if written is not None and written == self.checkpoint_before and not self.resume \
                and self.earlier_resume and not self.finished():
            # stopped before its first update, as the warning at its start advised: the server kept that run's
            # checkpoint ("stopped before the first update, with nothing to continue" said a version 0 of its own)
            return (f"pscnn run: stopped before this run's first update; the checkpoint of the unfinished run "
                    f"there before is kept: continue that run with {self.earlier_resume} (run folder {self.out})")
        if self.finished() or written is None or (written == self.checkpoint_before and not self.resume):
            return None
        if checkpoint_version(self.out) == 0:     # e.g. every worker failed on its training set
            if interrupted:
                return (f"pscnn run: stopped before the first update, with nothing to continue; the same "
                        f"command starts the run again from the beginning (run folder {self.out})")
            return (f"pscnn run: stopped before the first update, with nothing to continue; once what is "
                    f"reported above is fixed, the same command starts the run (run folder {self.out})")
        return f"pscnn run: stopped. Continue with the same command plus --resume (run folder {self.out})"


def earlier_run_resume(cfg, store) -> str:
    """How to continue the unfinished run in run folder ``cfg.out``, which a ``pscnn run`` of ``cfg``
    (``store``: its model and optimizer, check_run_args's) without --resume starts over."""
    return resume_advice(cfg, store.model, store.optimizer, "the same command plus --resume",
                         "pscnn run --resume with that run's settings; this command's differ")


def run_from_args(args) -> int:
    """``pscnn run``: the whole run in local processes, with a progress bar and a final report."""
    # once: resolving the schedule warns of a warm-up longer than the run; --resume's checks build the server
    cfg, store = check_run_args(args, server_follows=args.resume)
    # A folder another run (or server) writes: its server refused it, but only after this run's
    # clients had started and its logs had gone into that run's logs/, whose tail was then the report.
    check_folder_free(args.out)
    trained = scored = False
    if args.resume:     # every check the server's --resume makes (the model's too), here, before anything starts
        resumed = ParameterServer(cfg)
        check_workers_fit_memory(args, cfg, resumed.store.model)
        trained, scored = resumed.work.done, resumed.final_eval is not None
    if args.port:                       # else the cluster takes a port that was free a moment ago
        check_port_free(local_endpoint(args.port))
    # The training set (the workers') and the test set (the evaluator's, or the server's to score the
    # final weights with --no-evaluator), checked as they would at their start: a bad MNIST folder is
    # one line, before any process starts, not the log tails of children that all died.  After the
    # flags' checks (--resume, --port above): this may download MNIST.
    for split in ("train", "test"):
        check_local_setup(args.device, args.mnist_dir, split, progress=not args.no_progress)
    resume = functools.cache(lambda: earlier_run_resume(cfg, store))      # asked only if there is a warning
    warning = None if args.resume else unfinished_run_warning(
        args.out, lambda: f"stop this run (Ctrl-C) and run {resume()}")
    if warning:     # on the terminal, not only in logs/server.log (whose warning gives the server's advice)
        _say(f"pscnn run: {warning}")
    # (an unreadable checkpoint is warned of too, but no --resume continues it)
    outputs = RunOutputs(args.out, args.resume,
                         earlier_resume=resume() if warning and checkpoint_version(args.out) else None)
    cluster = LocalCluster(args.out, port=args.port or None, threads=args.threads,
                           keys=make_run_keys(args.out, args.workers) if args.curve else None,
                           peer_timeout=args.peer_timeout)
    old_handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        return _run(args, cluster, outputs, trained, scored)
    finally:                            # main() may be called in-process (tests)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _run(args, cluster: LocalCluster, outputs: RunOutputs, trained: bool = False, scored: bool = False) -> int:
    """``trained``: the run resumed has trained every epoch already; ``scored``: and its checkpoint holds
    the final evaluation.  Such a run starts no trainer (and then no evaluator): its server writes the
    results and exits at once, before they joined, and they retried until stopped 20 s later (exit 1)."""
    from tqdm import tqdm  # noqa: PLC0415
    client_flags = ["--device", args.device, "--threads", str(args.threads), "--log-level", args.log_level]
    if args.mnist_dir:
        client_flags.append(flag_with("--mnist-dir", args.mnist_dir))
    if args.no_evaluator:           # none will come: the server scores the final weights itself, at once
        args.final_eval_timeout = 0.0
    if args.wait_for_workers is None:   # every worker starts from the first version, in the same round
        args.wait_for_workers = args.workers
    workers = 0 if trained else args.workers
    with cluster:
        bar, codes = None, {}
        try:                            # from the first child on: a signal must stop every one started
            # the clients once it listens (start_server waits): none if it exited first (a --port taken),
            # which _follow reports
            if cluster.start_server(flags_from(args, SERVER_FLAGS)).poll() is None:
                print(f"pscnn run: server on {cluster.endpoint}{' (CURVE)' if cluster.keys else ''}, "
                      f"{workers} {for_count(workers, 'worker')}, mode {args.mode}, "
                      f"logs in {cluster.logs}", file=sys.stderr)
                if trained:
                    _say(f"pscnn run: the run in {outputs.out} has trained its {args.epochs} "
                         f"{for_count(args.epochs, 'epoch')} already; "
                         + ("its results are written again from its checkpoint" if scored else
                            "its final weights are scored and its results written"))
                worker_flags = [*client_flags, *(["--overlap"] if args.overlap else []),
                                *(["--no-memory-check"] if args.no_memory_check else [])]
                for i in range(workers):
                    cluster.start_worker(worker_name(i), worker_flags)
                if not args.no_evaluator and not scored:
                    cluster.start_evaluator([*client_flags, "--test-limit", str(args.test_limit),
                                             *(["--every", str(args.eval_every)] if args.eval_every else [])])
            # disable=None: drawn only on a terminal, as pscnn train's; in a pipe or a log file its
            # redraws were one endless line of carriage returns
            bar = tqdm(total=None, unit="batch", disable=True if args.no_progress else None, dynamic_ncols=True,
                       bar_format=RUN_BAR_FORMAT)
            status = _follow(cluster, bar)
            if status == 0 and outputs.finished():
                _finish_bar(bar, outputs.summary)
            bar.close()
            if status == 0 and not outputs.finished():
                # stopped by a signal from elsewhere (kill, a container's stop): it checkpointed and exited 0,
                # while its clients, waiting for it to come back, were waited on as if the run were over
                _say("pscnn run: the server exited with 0 before the end of the run (a stop signal from outside "
                     "pscnn run?); stopping the workers and the evaluator")
                status = 1
            if status != 0:             # the server failed, or was stopped (and _follow said why)
                return _ended_early(cluster, outputs, status)
            codes, late = _clients_exit(cluster, args.peer_timeout + 10)
        except KeyboardInterrupt:       # also while _ended_early or _clients_exit stop children
            return _interrupted(cluster, bar, outputs)
        for name, code in codes.items():    # e.g. a worker killed mid-run: the others finished the run
            if code not in (0, None):
                _say(child_exit_message(cluster, name, code))
        # A trainer the server dropped for NaN or Inf pushes (3) is named, and counted in the report's
        # faults, but the run completed without it: it fails the run no more than its NaN pushes did.
        failed = {n: c for n, c in codes.items() if c not in (0, DroppedByServer.exit_status) and n not in late}
    print_report(outputs.summary)
    return 1 if failed or late else 0


def _finish_bar(bar, summary_path: Path) -> None:
    """The bar's last state from the run's summary.json.  The server ends the run between two of
    _follow's status polls, and writes its summary after the final evaluation: the bar was left at
    the last status seen (6/32 batches and no accuracy with --no-evaluator; the evaluation before the
    final one otherwise), above a report with other figures."""
    try:
        fields = _SummaryFields(_read_summary(summary_path))
    except (OSError, ValueError):
        return                          # print_report says so
    if fields.value(str, "status") == "complete" and bar.total:
        bar.n = bar.total
    acc = fields.number("test_accuracy", high=1)
    if acc is not None:
        bar.set_description(f"test acc {acc:.4f} at update {format_number(fields.count('updates'), 'd')}",
                            refresh=False)
    bar.refresh()


def _clients_exit(cluster: LocalCluster, patience: float) -> tuple[dict, list]:
    """The server exited 0 and told its clients to stop: (every child's exit code, the names of
    those still running ``patience`` seconds later, which are then stopped, SIGTERM then
    SIGKILL, and said so of)."""
    deadline = time.monotonic() + patience
    codes = {name: cluster.wait(name, max(0.0, deadline - time.monotonic())) for name in cluster.procs}
    late = [name for name, code in codes.items() if code is None]
    for name in late:
        _say(f"pscnn run: {name} had not exited {patience:.0f} s after the run ended; stopping it")
    if late:
        _stop(cluster, order=tuple(late), grace=5.0)
    return codes, late


def _ended_early(cluster: LocalCluster, outputs: RunOutputs, status: int) -> int:
    """The server exited with ``status`` != 0, or ``_follow`` stopped the run (1) and said why:
    stop what is left; the run's report where the server had written its summary all the same
    (diverged; or it finished the run while the launcher was stopping it, on a failed evaluator
    that had said goodbye), else how to continue.  1, or the server's own exit code."""
    _stop(cluster, grace=5.0)
    if outputs.finished():
        _say(f"pscnn run: the server had ended the run ({SUMMARY_FILE} written); its report follows")
        print_report(outputs.summary)
    else:       # else stopped before this run's first checkpoint (a server killed early): not a word on what to do
        _say(outputs.resume_hint()
             or f"pscnn run: stopped before the server's first checkpoint, with nothing to continue; once what is "
                f"reported above is fixed, the same command starts the run again (run folder {outputs.out})")
    return status if status > 0 else 1      # killed by a signal: 1, not sys.exit(-9)'s 247


def _interrupt(signum, frame):
    """pscnn run's Ctrl-C and STOP_SIGNALS handler: the first one interrupts (KeyboardInterrupt, whence
    _interrupted stops every child).  It silences the others before it raises: a second signal pending
    with it (SIGTERM and SIGHUP together, as systemd sends them) raised again as _interrupted began,
    and the cluster's close() SIGKILLed every child, the server before its checkpoint.  Noted, as a
    KeyboardInterrupt lost in a ``__del__`` (see _follow) leaves the run deaf to every later signal."""
    _on_stop_signals(ignored_signal)   # one that came with it, or comes after
    interrupt_noted(signum, frame)


def _still_stopping(signum, frame):
    """A signal while the children are being stopped must not cut that short: said once."""
    _on_stop_signals(ignored_signal)   # later ones: said once
    _say("pscnn run: still stopping (the server first, then the workers and the evaluator); please wait")


def _on_stop_signals(handler) -> None:
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(sig, handler)


def _interrupted(cluster: LocalCluster, bar, outputs: RunOutputs) -> int:
    """Ctrl-C (or a STOP_SIGNAL): stop every child, the server first; 130 and how to continue the run,
    or, when the run had finished already (its clients were still exiting), its report and 0 (1 for
    a diverged run, as when no Ctrl-C comes)."""
    if bar is not None:
        try:
            bar.close()
        except OSError:
            pass
    _say("\npscnn run: interrupted; stopping the server (it checkpoints), then the workers and the evaluator")
    _on_stop_signals(_still_stopping)
    # The server first, so its checkpoint holds whole sync rounds only: a worker leaving first
    # would close the round in progress without it, and the resumed run would differ from one
    # never stopped.  The workers' unfinished batches are simply computed again.
    _stop(cluster, order=("server", "worker", "evaluator"))
    if outputs.finished():          # summary.json written: nothing was left to continue
        if outputs.diverged():      # "its results are complete", and exit 0, said a diverged run was fine
            _say("pscnn run: the run had diverged before the interrupt; its report follows")
            print_report(outputs.summary)
            return 1
        _say("pscnn run: the run had finished before the interrupt; its results are complete")
        print_report(outputs.summary)
        return 0
    server = cluster.procs.get("server")
    if server is not None and server.returncode is not None and server.returncode > 0:
        # e.g. its checkpoint could not be written (a full disk): what --resume would continue from
        said = last_word(cluster.log_tail("server"))
        _say(f"pscnn run: {exit_text('the server', server.returncode)}" + (f": {said}" if said else ""))
    _say(outputs.resume_hint(interrupted=True)  # else stopped before the server's first checkpoint: --resume would fail
         or f"pscnn run: stopped before the first checkpoint; the same command starts the run again from the "
            f"beginning (run folder {outputs.out})")
    return 130


def _stop(cluster: LocalCluster, order=("worker", "evaluator", "server"), grace: float = 10.0) -> None:
    """``cluster.stop_all``, saying which child did not stop within ``grace`` and was killed (the
    user would otherwise only see the stop take that much longer)."""
    cluster.stop_all(grace, order, on_kill=lambda name: _say(
        f"pscnn run: {name} did not stop within {grace:.0f} s of SIGTERM; killed it (SIGKILL)"))


def exit_text(name: str, code: int | None) -> str:
    """``NAME exited with CODE``, naming the signal that killed it (a negative code)."""
    text = f"{name} exited with {code}"
    if code is not None and code < 0:
        try:
            text += f" (killed by {signal.Signals(-code).name})"
        except ValueError:
            pass
    return text


def child_exit_message(cluster: LocalCluster, name: str, code: int | None) -> str:
    """What ``pscnn run`` says of a client (worker or evaluator) that exited with ``code``.

    A child killed by a signal gets one line naming it: its log cannot say why.  A child that
    stopped on a one-line error (its log's last line, see :func:`last_word`) gets one line,
    that reason included; anything else (a traceback) the last lines of its log below a first line.
    Either way the log itself stays in OUT/logs/<name>.log."""
    what = exit_text(name, code)
    if code is not None and code < 0:
        return f"pscnn run: {what}"
    tail = cluster.log_tail(name)
    said = last_word(tail)
    if said is not None:
        return f"pscnn run: {what}: {said}"
    return f"pscnn run: {what}; last lines of its log:\n{tail}"


# How a child's last line says why it exited, in one line: the CLI's error line, or the server's
# own (pscnn.server's serve: a diverged run, outputs it could not write).
LAST_WORD_PREFIXES = ("pscnn: error: ", "pscnn server: ")


def last_word(log_tail: str) -> str | None:
    """Why a child exited, when its log's last line says so in one line (LAST_WORD_PREFIXES), else None."""
    lines = [line for line in log_tail.splitlines() if line.strip()]
    for prefix in LAST_WORD_PREFIXES:
        if lines and lines[-1].startswith(prefix):
            return lines[-1][len(prefix):]
    return None


def status_problem(st) -> str | None:
    """Why a status answer (ParameterServer.progress) is of no use to :func:`_follow`, which reads
    these fields of it as numbers, or None when it is."""
    if not isinstance(st, dict):
        return f"its status answer is a {type(st).__name__}, not an object"
    counts = ["batches_total", "batches_done", *(["ready"] if st.get("started") is False else [])]
    numbers = [*(["test_accuracy"] if st.get("test_accuracy") is not None else []),
               *(["loss", "images_per_second", "epoch", "epochs"] if st.get("loss") is not None else [])]
    for key in counts:
        if not _is_count(st.get(key)):
            return f"its status answer has {key} {one_line(repr(st.get(key)), 80)}, not a count"
    for key in numbers:
        if not is_number(st.get(key)):
            return f"its status answer has {key} {one_line(repr(st.get(key)), 80)}, not a number"
    return None


def _follow(cluster: LocalCluster, bar) -> int:
    """Update the bar from the server's status until the server exits; its exit code.

    The run is stopped at once (the server first, so that it checkpoints whole sync rounds, then the
    clients; exit code 1) when nobody is left to train, or when the evaluator exits with an error
    while the server still trains: the server would otherwise wait --final-eval-timeout for its final
    report once training ends.  One that fails once training is over (killed mid final evaluation)
    does not stop the run: the server scores the final weights itself and writes the summary.
    An evaluator that exits 0 was told to by the server (the run is over), or was stopped by a signal
    (said once, when the server, asked after that, still trains: the run goes on without it).
    Nobody is left to train when every worker has exited while the server, asked after that, still
    has training to do: whatever their exit codes (a worker stopped by SIGTERM says bye and exits 0).
    Once training is over they all exit, told to by the server, and it finishes the run: its final
    evaluation and summary, even when a worker died on the way; unless it no longer answers
    (SILENT_SERVER_S, not counting the time it is stopped: SIGSTOP or a debugger), which ends the run
    as if it had training left (scoring the final weights itself, it answers between two batches of
    the test set)."""
    server = cluster.procs["server"]
    workers = [p for n, p in cluster.procs.items() if n.startswith("worker")]
    evaluator = cluster.procs.get("evaluator")          # None with --no-evaluator
    silent_since = None                 # when the server last stopped answering, every worker gone
    trained = False                     # the server's last answer said training is over
    said_stopped = False                # "the server is stopped" was said (once)
    said_evaluator_left = False         # "the evaluator left before the end of training" was said (once)
    hint_after = round_wait_hint_after(cluster.peer_timeout)
    done_before, progress_at = None, time.monotonic()   # batches done at the last answer, when that count last moved
    while server.poll() is None:
        # An interrupt raised in a zmq socket's __del__ (each status poll drops some, here in the main
        # thread) was printed as "Exception ignored" and lost: the run went on to its end, deaf to the
        # signals _interrupt silenced.  Taken up here, at the next poll.
        raise_lost_stop("run")
        workers_gone = bool(workers) and all(p.poll() is not None for p in workers)
        evaluator_left = evaluator is not None and evaluator.poll() == 0
        try:
            st = cluster.status(timeout=0.5)    # after the clients' checks: one told to stop left after `done`
            unusable = None if st is None else status_problem(st)
        except (BadReply, curve.HandshakeFailed) as exc:
            st, unusable = None, str(exc)
        if unusable is not None:
            # it raised out of the run (a KeyError traceback for a field missing), and leaving the cluster
            # SIGKILLed every child, the server before its checkpoint
            bar.close()
            _say(f"pscnn run: cannot follow the server: {unusable}; stopping it (it checkpoints), then the "
                 "workers and the evaluator")
            _stop(cluster, order=("server", "worker", "evaluator"))
            return 1
        now = time.monotonic()
        if st is not None:
            trained = bool(st.get("done"))
            # What a resumed run had done before, as of the first answer and while the start barrier
            # holds: not done at this run's rate (tqdm's batch/s and time left count from it; a
            # resumed run's showed twice its rate, and with one worker, no barrier, still does).
            # Before the stop below: a resumed finished run's first answer can be its last (its bar
            # ended at "0/?" under a report of the whole run).
            if bar.total != st["batches_total"]:        # the first answer
                bar.total = st["batches_total"]
                bar.initial = st["batches_done"]
            bar.n = st["batches_done"]
            if st["batches_done"] != done_before:
                done_before, progress_at = st["batches_done"], now
        stopped = st is None and process_stopped(server.pid)
        if stopped and not said_stopped:
            _say(f"pscnn run: the server (pid {server.pid}) is stopped (a signal or a debugger); waiting for it "
                 "to continue (SIGCONT)")
            said_stopped = True
        # a stopped server's silence is not counted: continued, it has SILENT_SERVER_S again to answer
        silent_since = (silent_since or now) if workers_gone and st is None and not stopped else None
        untrained = workers_gone and (st is not None and not st.get("done")
                                      or silent_since is not None and now - silent_since > SILENT_SERVER_S)
        if evaluator_left and st is not None and not st.get("done") and not said_evaluator_left:
            # stopped by a signal (it says goodbye and exits 0): the report's few evaluations were unexplained
            _say("pscnn run: the evaluator exited before the end of training (see logs/evaluator.log); training "
                 "goes on without its evaluations, and the server scores the final weights itself")
            said_evaluator_left = True
        evaluator_failed = evaluator is not None and evaluator.poll() not in (None, 0)
        if evaluator_failed and trained:
            # The weights are final: stopping the server now would lose the run's results (no summary,
            # only a checkpoint to --resume).  It scores them itself; the evaluator's exit is named at the end.
            _say("pscnn run: the evaluator failed after training finished; the server scores the final "
                 "weights itself (at once if the evaluator said goodbye, else after --final-eval-timeout)")
            evaluator, evaluator_failed = None, False
        if st is not None and st.get("finished") and all(p.poll() is not None for p in (*workers, evaluator) if p):
            # Its results are written and every client of ours has exited: a server resuming a finished
            # run lingers --peer-timeout for clients yet to connect (ParameterServer._finish), and this
            # run starts none.  Stopped now it exits 0, writing nothing more.
            _stop(cluster, order=("server",))
            continue
        if untrained or evaluator_failed:
            bar.close()                         # before the messages, so they don't end under a stale bar
            for name, proc in cluster.procs.items():
                if name != "server" and proc.poll():
                    _say(child_exit_message(cluster, name, proc.returncode))
            if untrained and st is None:
                _say(f"pscnn run: every worker has exited and the server has not answered for "
                     f"{SILENT_SERVER_S:.0f} s; stopping it (it checkpoints)")
            elif untrained:
                _say("pscnn run: every worker has exited before the end of training; stopping the server "
                     "(it checkpoints)")
            else:
                _say("pscnn run: the evaluator has failed; stopping the server (it checkpoints) and the workers")
            _stop(cluster, order=("server", "worker", "evaluator"))
            return 1
        if st:
            acc = st.get("test_accuracy")
            if st.get("started") is False:      # the start barrier: workers still loading their data
                # of those the server waits for: `pscnn run --workers 4 --wait-for-workers 2` showed "of 4"
                state = f"waiting for the workers: {st['ready']} of {st.get('wait_for_workers', len(workers))} ready"
                bar.initial = st["batches_done"]
            elif st.get("error"):               # the bar kept its last figures, as if all were well
                state = "training diverged"
            elif st.get("write_failing"):       # tried again for minutes: not an evaluation awaited
                state = "training finished; cannot write the run's outputs, trying again (see logs/server.log)"
            elif st.get("scoring"):             # answered between two batches of the test set
                state = "training finished; the server scores the final weights"
            elif st.get("final_evaluation") and st.get("done"):
                # a resumed run whose checkpoint holds it waits for none (its bar said so all along)
                state = "training finished; writing the results"
            elif st.get("done"):
                # its last epoch, images/s and loss sat there as if training went on, for as long as
                # the final evaluation takes (up to --final-eval-timeout, 120 s, for a killed evaluator)
                state = "training finished; waiting for the final evaluation"
            elif st.get("loss") is None:
                state = "starting"
            else:
                state = (f"epoch {min(st['epoch'] + 1, st['epochs'])}/{st['epochs']}, "
                         # 4 significant digits: a loss on its way to diverging, 2.9e+28, filled
                         # the line with 33 digits in fixed point
                         f"{st['images_per_second']:.0f} img/s, loss {st['loss']:.4g}")
                members, arrived = st.get("round_members") or 0, st.get("round_arrived") or 0
                stalled = not st["images_per_second"] or now - progress_at >= hint_after
                if stalled and 0 < arrived < members:
                    # a sync round waits, e.g. on a dead worker until --peer-timeout drops it (the bar
                    # sat at 0 img/s without a word)
                    state += f", round waiting on {members - arrived} of {members} workers"
            bar.set_postfix_str(state, refresh=False)
            if acc is not None:
                # the weights it scored: the evaluator's period (10 s) can leave the untrained model's
                # 0.1380 next to a loss of 0.25, which looked like a run not learning
                bar.set_description(f"test acc {acc:.4f} at update {st.get('eval_version')}", refresh=False)
            bar.refresh()
        time.sleep(0.5)
    code = server.returncode
    if code != 0:
        bar.close()
        # killed by a signal (kill -9, the OOM killer): its log cannot say why
        tail = "" if code < 0 else cluster.log_tail("server")
        said = last_word(tail)
        # its last line says why, alone: not above the rejected pushes (or the writes retried) that led to it
        tail = f": {said}" if said is not None else f"; last lines of its log:\n{tail}" if tail else ""
        _say(f"pscnn run: {exit_text('the server', code)}{tail}")
    return code


def print_report(summary_path: Path) -> None:
    """The final report of a run, from its summary.json, on stdout; nothing where stdout is gone
    (a closed terminal: EIO), as with :func:`_say`."""
    try:
        s = _read_summary(summary_path)
    except (OSError, ValueError) as exc:
        _say(f"pscnn run: no summary ({exc})")
        return
    try:
        _print_report(s, summary_path)
    except OSError:         # what is left in stdout's buffer goes to /dev/null, not to a failing final flush
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass


def _read_summary(summary_path: Path) -> dict:
    """The object summary.json holds; OSError or ValueError saying why there is none."""
    try:
        summary = json.loads(summary_path.read_text())
    except RecursionError:
        raise ValueError(f"{summary_path} nests lists or objects too deep to read") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{summary_path} holds no JSON object")
    return summary


# The staleness counts the report lists one by one; those from the last one up are summed ("7+: 9"):
# a long async run of many workers has a key per staleness seen, dozens.
STALENESS_COUNTS_SHOWN = 8


def _staleness_counts(histogram) -> str:
    """summary.json's staleness histogram ({"0": 365, "1": 719, ...}) as "0: 365, 1: 719, ...",
    at most STALENESS_COUNTS_SHOWN entries; "" for none (a summary without one)."""
    if not isinstance(histogram, dict):
        return ""
    counts = sorted((int(k), v) for k, v in histogram.items() if str(k).isdigit() and isinstance(v, int))
    if len(counts) > STALENESS_COUNTS_SHOWN:
        tail = counts[STALENESS_COUNTS_SHOWN - 1:]
        counts = [*counts[:STALENESS_COUNTS_SHOWN - 1], (f"{tail[0][0]}+", sum(v for _, v in tail))]
    return ", ".join(f"{k}: {v:,}" for k, v in counts)


class _SummaryFields:
    """summary.json's fields as the report reads them, each checked: one missing or null is None
    (or ``default``), as is one present but not what the server writes there (a summary.json by
    hand, or from another version), whose name goes into ``unreadable`` for the report to say."""

    def __init__(self, summary: dict):
        self.summary = summary
        self.unreadable: list[str] = []

    def value(self, fits, *path: str, default=None):
        """The value at ``path`` (keys into nested objects) if it ``fits`` (a type, or a test of the
        value), else as above."""
        value = self.summary
        for depth, key in enumerate(path):
            if value is None:
                return default
            if not isinstance(value, dict):
                return self.unread(*path[:depth])
            value = value.get(key)
        if value is None:
            return default
        return value if (isinstance(value, fits) if isinstance(fits, type) else fits(value)) else self.unread(*path)

    def number(self, *path: str, low: float = 0.0, high: float = math.inf, default=None):
        return self.value(lambda v: is_number(v) and low <= v <= high, *path, default=default)

    def count(self, *path: str, default=None) -> int | None:
        value = self.value(_is_count, *path, default=default)
        return value if value is None else int(value)       # 3, not the 3.0 a file may hold

    def unread(self, *path: str) -> None:
        """Name ``path`` among the fields that could not be read; None, the value read instead."""
        name = ".".join(map(str, path))
        if name not in self.unreadable:
            self.unreadable.append(name)


def _is_count(value) -> bool:
    return is_number(value) and value >= 0 and value == int(value)


def _is_counts(value) -> bool:
    """An object of counts, as rejected_messages and the staleness histogram are."""
    return isinstance(value, dict) and all(_is_count(v) for v in value.values())


def _time_to_accuracy_text(fields: _SummaryFields) -> str | None:
    """The report's time-to-accuracy line's text; None where summary.json gives no time_to_accuracy
    (one from before the field) or no evaluation was recorded."""
    reached = fields.value(dict, "time_to_accuracy")
    if reached is None or not fields.value(list, "evaluations"):
        return None
    times = []
    for key in reached:
        first = fields.value(lambda e: isinstance(e, dict) and is_number(e.get("seconds")) and e["seconds"] >= 0,
                             "time_to_accuracy", key)
        milestone = _milestone(key)
        if first is not None and milestone is None:
            fields.unread("time_to_accuracy", key)
        elif first is not None:
            times.append(f"{milestone:.0%}: {first['seconds']:.1f} s")
    # those never reached named, not left out: a run short of 90% had no line, as if it had no field
    missed = ", ".join(f"{m:.0%}" for m in ACCURACY_MILESTONES if f"{m:g}" not in reached)
    return ("; ".join(filter(None, [", ".join(times), missed and f"{missed} not reached"]))
            + ("  (the first evaluation at or above)" if times else ""))


def _milestone(key) -> float | None:
    """The accuracy a time_to_accuracy key names ("0.9"), or None for one that names none."""
    try:
        accuracy = float(key)
    except (TypeError, ValueError):
        return None
    return accuracy if 0 < accuracy <= 1 else None       # not NaN either


def _print_report(summary: dict, summary_path: Path) -> None:
    # each figure checked (_SummaryFields): one missing, null, true, NaN, negative or of another
    # type (a summary.json by hand, or from another version) reads "n/a" or is left out, where it
    # printed "True%" or "nan messages refused", or raised out of the report; those present but
    # unreadable are named at the end
    fields = _SummaryFields(summary)
    workers, epochs, samples = fields.count("workers"), fields.count("epochs"), fields.count("samples_applied")
    diverged = fields.value(str, "status") == "diverged"    # its error says why: "training diverged: ..."
    print(f"\nrun {'stopped' if diverged else 'finished'}: mode {fields.value(str, 'mode') or '?'}, "
          f"{format_number(workers, ',')} {for_count(workers, 'worker')}, "
          f"{format_number(epochs, ',')} {for_count(epochs, 'epoch')}")
    if diverged:
        print(f"  why                {fields.value(str, 'error') or 'n/a'}")
    accuracy = fields.number("test_accuracy", high=1)    # in percent, as pscnn train's report and the plots give it
    print(f"  test accuracy      {format_number(accuracy, '.2f', 100)}{'%' if accuracy is not None else ''}")
    print(f"  test loss          {format_number(fields.number('test_loss'), '.4f')}")
    print(f"  updates            {format_number(fields.count('updates'), ',')}  ({format_number(samples, ',')} "
          f"{for_count(samples, 'sample')})")
    print(f"  throughput         {format_number(fields.number('train_images_per_second'), ',.0f')} images/s "
          f"over {format_number(fields.number('train_seconds'), '.1f')} s")
    # Where the workers' time went (timeline.png's title): a sync round's waiting, async's none, a
    # round held up by a dead worker, were seen only in the plot or by summing metrics.jsonl by hand.
    shares = worker_time_shares(fields.value(
        lambda v: isinstance(v, dict) and all(is_number(v.get(part)) and v[part] >= 0 for part in TIMELINE_PARTS),
        "worker_seconds"))
    if shares is not None:
        print(f"  workers' time      {time_shares_text(shares)}")
    # ssp's bound is in pushes ahead of the slowest worker, staleness in versions applied since the
    # gradient's weights: with N workers a max of (bound + 1) * N - 1 keeps to it ("max 2 (bound 0)" read broken)
    bound = fields.count("staleness_bound")
    most = fields.count("staleness", "max", default=0)
    print(f"  staleness          mean {format_number(fields.number('staleness', 'mean', default=0), '.2f')}, "
          f"max {format_number(most, ',')} {for_count(most, 'version')}"
          + (f" (ssp: each worker at most {bound} {for_count(bound, 'push', 'pushes')} ahead of the slowest)"
             if bound is not None else ""))
    counts = _staleness_counts(fields.value(_is_counts, "staleness", "histogram"))
    if counts:      # its shape was what experiments 2 and 3 teach (ssp's flat, async's peaked): jq only
        print(f"  staleness counts   {counts}  (versions stale: gradients applied)")
    evaluations = fields.value(list, "evaluations", default=[])
    print(f"  evaluations        {format_number(None if evaluations is None else len(evaluations), ',')}")
    dead = fields.count("peers_dropped", "declared dead", default=0)
    faulty = fields.count("peers_dropped", DROPPED_FOR_NAN, default=0)     # such a trainer exited 3 (named above)
    requeued = fields.count("lease_requeues", default=0)
    refused = int(sum((fields.value(_is_counts, "rejected_messages") or {}).values()))
    if dead or requeued or refused:     # what the run survived (every incarnation of its server)
        print(f"  faults             {format_number(dead, ',')} declared dead, "
              + (f"{faulty:,} {for_count(faulty, 'trainer')} {DROPPED_FOR_NAN}, " if faulty else "")
              + f"{format_number(requeued, ',')} {for_count(requeued, 'lease')} requeued, "
              + f"{refused:,} {for_count(refused, 'message')} refused")
    reached = _time_to_accuracy_text(fields)
    if reached is not None:
        print(f"  time to accuracy   {reached}")
    pca = fields.value(lambda v: isinstance(v, list) and all(is_number(a) and 0 <= a <= 1 for a in v),
                       "per_class_accuracy")
    matrix = fields.value(lambda v: isinstance(v, list) and all(
        isinstance(row, list) and len(row) == len(v) and all(_is_count(c) for c in row) for row in v),
        "confusion_matrix")
    if pca:
        print("  per-class accuracy " + per_class_text(pca, classes_scored(pca, matrix)))
    if fields.unreadable:
        print(f"  could not read     {', '.join(fields.unreadable)}  (not what pscnn writes in summary.json)")
    print(f"  results in         {summary_path.parent}")
