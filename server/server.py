"""The parameter server: one ZeroMQ ROUTER socket, one thread, one event loop.

What it does per message type (see ``pscnn/protocol.py``):

* ``hello``  registers a trainer or the evaluator and answers with the model
  spec and the run's data settings;
* ``work``   leases the next batch (``task``, with weights when newer) or asks
  to ``wait``;
* ``push``   validates a gradient, applies it according to the consistency
  mode, and answers with the next ``task``: one round trip per step.  It
  counts only for a batch its sender was leased this epoch; a push for a
  batch applied already is acknowledged and dropped;
* ``pull`` / ``eval_report``  serve the evaluator, whose work never blocks
  the trainers (its reports are logged, kept as the run's evaluation
  history, and the final one becomes ``summary.json``'s test metrics);
* ``status`` / ``heartbeat``  answer at once.

Reliability: every client request carries (worker id, sequence number).  A
request seen again (a client resend) gets the cached reply (see ``_resend``
for one that carried weights), or nothing while its reply is still parked, so
a retried push is never applied twice; one under an older number (a late
duplicate, a hello too) is ignored.
Liveness: any message from a peer's own connections counts as a heartbeat; a worker silent for
``peer_timeout`` is declared dead and its leases go back to the queue; a lease
older than ``lease_timeout`` is requeued too.
Time the server itself did not run (stopped, starved of CPU) counts towards
neither: see ``_forgive_stall``.

Consistency (``--mode``):

* ``async``  apply each gradient on arrival;
* ``sync``   BSP: the workers holding a lease of the current version form the
  round; their gradients are averaged (weighted by batch size, summed in
  batch order) and applied once all of them arrived, or the dead ones were
  dropped.  A trainer that finds no batch left in the epoch is parked, not
  told to retry, and gets its next task when the round closes, with the
  others;
* ``ssp``    apply on arrival, but a worker more than ``staleness`` pushes
  ahead of the slowest worker at work (holding a lease) gets its next task
  only when it catches up.

The start barrier (``wait_for_workers`` N, which ``pscnn run`` sets to its
``--workers``): no work is handed out until N trainers are asking for it, or
``start_timeout`` seconds after the first one did.  With it, and dropout
seeded per batch by the workers, a sync run with a fixed set of workers is the
same computation whatever the timing: each round is the next N batches of the
epoch's permutation, so two runs on one machine end with bit-identical weights.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import socket as pysocket
import sys
import time
import uuid
import weakref
from collections import Counter, OrderedDict, deque
from dataclasses import replace

import numpy as np
import zmq

from cnn_core.checkpoint import load_model_checkpoint
from cnn_core.data import training_set_size
from cnn_core.errors import CheckpointError, ConfigError, PscnnError, SpecError
from cnn_core.fileio import atomic_write
from cnn_core.flat import FlatArrays
from cnn_core.model import resolve_spec
from cnn_core.runlog import (TIMELINE_PARTS, RunLogError, RunWriter, new_run_id, push_spans, read_metrics,
                             without_lost_updates)
from cnn_core.text import for_count
from cnn_core.training import check_batches_fit, check_model_fits_mnist, effective_batch_size
from pscnn import curve
from pscnn import protocol as P
from pscnn.cli import MODES, ignore_stop_signals, stop_raised
from pscnn.names import heartbeat_routing_id, name_problem, without_route_token
from pscnn.ratelog import REMINDER_WINDOW_S, RateLimitedLog

from .checkpoints import CheckpointFile
from .config import ServerConfig, config_from_args
from .consistency import SyncRound, ssp_floor, ssp_start_clock, ssp_within_bound
from .eval_report import checkpointable_metrics, metrics_problem
from .evaluations import EvaluationHistory, evaluation_record, final_evaluation_settled, log_evaluation
from .peers import DroppedPeer, KeptReply, Peer, RecentIds
from .results import PlotDrawing, staleness_summary, write_results
from .resume import (check_resume_meta, joined_since_checkpoint, optimizer_trained_with, resume_checkpoint,
                     server_resume_advice, unfinished_run_warning)
from .router import configure_router, raise_open_files_limit
from .store import ParameterStore, TrainingDiverged
from .work import WorkQueue

log = logging.getLogger("pscnn.server")

# Messages handled before housekeeping
BURST = 256
# Dropped peers remembered (oldest forgotten first), so that a message from one, late from a
# network that was cut, is refused with the reason and logged once, not as an unknown id each time.
DROPPED_MEMORY = 4096
# Ids of workers whose gradients were applied that the server keeps (those that pushed last): each
# worker process that ever pushed added one, for as long as the run lasted, in memory, in every
# checkpoint and in summary.json's worker_ids.  They are counted all the same (RecentIds.count).
CONTRIBUTORS_MEMORY = 4096

# Why a trainer was dropped whose pushes were all NaN or Inf while another's are finite: its
# count in summary.json's peers_dropped, and in pscnn run's report.
DROPPED_FOR_NAN = "dropped for NaN or Inf pushes"


def check_model_travels(spec: dict, arrays) -> None:
    """SpecError unless the messages that carry a model fit the protocol: the welcome (``spec``) and
    a task (``arrays``: every parameter and state array, by name; ParameterStore.snapshot()).

    A model past the protocol's limits (a spec of over 64 KB, more than 256 arrays, a name of over 128
    characters) passed every check, then the server failed every hello or request with an internal
    error.  The other fields at their largest, so that no run of this model fails.
    """
    name = "w" * P.MAX_NAME_LEN
    run = {"seed": 2**63 - 1, "batch_size": 10**9, "num_samples": 10**9, "epochs": 10**9, "mode": "async",
           "test_limit": 10**9}
    welcome = P.welcome(name, "evaluator", spec, run, uuid.uuid4().hex[:12], 1.0)
    task = P.task(2**62, 10**9, 10**9, 2**62, 1.0, {"applied": False, "reason": "training diverged"}, arrays)
    task.wid = name
    for msg in (welcome, task):
        try:
            P.encode(msg)
        except P.ProtocolError as exc:
            raise SpecError(f"model spec: the server could not send this model to its workers: {exc}") from None


def checked_store(cfg: ServerConfig) -> ParameterStore:
    """The run's model and optimizer, built from ``cfg`` and checked as the server needs them:
    ConfigError or SpecError, one line, for what it refuses.

    The server's own checks, which ``pscnn run`` makes too before it starts a process
    (:func:`pscnn.launcher.check_run_args`): a copy of them there had fallen behind (a model
    whose output width is not MNIST's was refused only by the server it had started).
    """
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown mode {cfg.mode!r}: expected one of {', '.join(MODES)}")
    if cfg.wait_for_workers > cfg.max_workers:
        raise ConfigError(f"--wait-for-workers {cfg.wait_for_workers} exceeds --max-workers {cfg.max_workers}: "
                          "the run could never start with all of them")
    store = ParameterStore(resolve_spec(cfg.model), cfg.optimizer, seed=cfg.seed)
    check_model_fits_mnist(store.model)      # else the first push fails, as a label range error
    check_batches_fit(store.model, training_set_size(cfg.train_limit), cfg.batch_size)  # else a worker fails mid-epoch
    check_model_travels(store.model.spec, store.snapshot()[1])
    return store


class _ScoringInterrupted(Exception):
    """A stop, or an evaluator's final report, came while the server scored the final weights itself
    (see _between_scoring_batches)."""


class ParameterServer:
    def __init__(self, cfg: ServerConfig, endpoint_file: str | None = None):
        """``endpoint_file``: where to write the endpoint it listens on, once it does (--endpoint-file)."""
        self.store = checked_store(cfg)
        self.cfg = cfg
        self.endpoint_file = endpoint_file
        self.num_samples = training_set_size(cfg.train_limit)
        self.spec = self.store.model.spec
        self.work = WorkQueue(self.num_samples, cfg.batch_size, cfg.epochs, cfg.lease_timeout)
        self.incarnation = new_run_id()
        self.run_id = new_run_id()         # a resumed run's is its checkpoint's (_resume)
        self.peers: dict[str, Peer] = {}
        # How many peers of each role the table holds: what hello's "server full", status and "is there an
        # evaluator" ask on every message of theirs, without walking the table (85 us with 1,000 peers).
        # Changed only by _add_peer and _remove_peer, the one way into and out of the table.
        self.role_counts = Counter({role: 0 for role in P.ROLES})
        # Routing id -> the peer that joined from it (one at most: see _on_hello), kept as role_counts is.
        self.peer_on_connection: dict[bytes, Peer] = {}
        self.dropped: OrderedDict[str, DroppedPeer] = OrderedDict()    # worker id -> why it was dropped
        self.drops = Counter()          # peers this server dropped, by why: "declared dead", "left", ...
        # worker id -> name, of the workers whose gradients were applied (the CONTRIBUTORS_MEMORY latest)
        self.contributors = RecentIds(CONTRIBUTORS_MEMORY)
        # summary.json's "workers": the most distinct workers whose gradients were applied within
        # one incarnation of the server (this one, or an earlier one, from the checkpoint).  Not
        # len(contributors): a run stopped and resumed with new worker processes would count
        # each worker once per incarnation (a 2-worker run resumed once reported 4).
        self.incarnation_contributors = RecentIds(CONTRIBUTORS_MEMORY)
        # After a --resume: the ids of the clients of the run before the restart (the checkpoint's
        # peer_ids and contributors) that have not said hello again yet -> their messages since.
        # They come back by themselves, under the same ids: told to say hello as any unknown id,
        # but no fault (see _ask_client_before_to_rejoin).
        self.clients_before: dict[str, int] = {}
        self.workers_before = 0
        self.samples_applied = 0
        self.staleness = Counter()
        # The workers' time, seconds per TIMELINE_PARTS part, summed as each push is applied (summary.json's
        # worker_seconds, pscnn run's report): reading metrics.jsonl at the end took 31 s for a million
        # step records.  None after a --resume from a checkpoint that did not count them.
        self.worker_seconds: dict | None = dict.fromkeys(TIMELINE_PARTS, 0.0)
        self.history = EvaluationHistory()
        self._evaluations_reported = 0              # records this server made of evaluators' reports
        self.final_eval: dict | None = None
        self.final_eval_from: str | None = None     # who scored it: an evaluator's name, or "the server"
        self.losses = deque(maxlen=50)
        self.rate_window = deque(maxlen=200)        # (time, samples_applied)
        self.sync_round = SyncRound()
        self.started = cfg.wait_for_workers <= 1     # the start barrier: see _maybe_start
        self.rejected = Counter()
        # The log lines a peer can make as often as it sends: rejections up to --log-rejected a second;
        # joins and leaves (ids made up each time) beyond any real run's: every peer the server
        # admits, trainers and evaluators, joining or leaving within one second, and at least 64
        # (a small run's clients restarted over and over).
        self.log_rejected = RateLimitedLog(log, ("rejected message", "rejected messages"), cfg.log_rejected,
                                           " (summary.json's rejected_messages counts them all)")
        peer_lines = max(64, 2 * cfg.max_workers)
        self.log_joins = RateLimitedLog(log, ("join", "joins"), peer_lines)
        self.log_leaves = RateLimitedLog(log, ("leave", "leaves"), peer_lines)
        self.log_clients_before = RateLimitedLog(log, ("client of the run before the restart",
                                                       "clients of the run before the restart"), peer_lines)
        # CURVE: a client that cannot mend its handshake by itself retries it every 0.1 s, until it stops
        self.log_handshakes = RateLimitedLog(log, ("refused handshake", "refused handshakes"), 1)
        # An honest evaluator with a tiny --every on a tiny --test-limit is refused most reports once past
        # EVAL_RECORDS_AT_ONCE, for the rest of the run: one line, then one a minute (as it warns itself)
        self.log_too_many_evaluations = RateLimitedLog(
            log, ("eval_report refused as too many", "eval_reports refused as too many"), 1,
            " (summary.json's rejected_messages counts them all)", window_s=REMINDER_WINDOW_S)
        self.train_seconds_before = 0.0             # from earlier incarnations (resume)
        self.wall_seconds_before = 0.0              # theirs, from each one's start to its last checkpoint
        self.t_start = time.monotonic()
        # The training clock (throughput, time to accuracy) runs from the first batch handed out,
        # as pscnn train's runs over its loop: not while the workers load their data.
        self.t_train_start: float | None = None
        self.t_train_end: float | None = None
        self.t_finish_start: float | None = None
        self.summary_written = False
        self.plots = PlotDrawing()
        self.results_written_at: float | None = None     # when summary.json and model.npz were written
        self.finished_before = False                # resumed from a run trained to its end (see _finish)
        self.scoring = False                        # scoring the final weights here (_evaluate_here)
        self.failure: str | None = None             # why the run stopped early (divergence)
        self.nonfinite_streak = 0                   # pushes rejected as non-finite since the last update
        self.nonfinite_senders: set[str] = set()    # the trainers that sent them
        self._stop_requested = False
        # (wall, CPU) clocks when the loop last looked for a stall: the time since then that the
        # process did not spend computing is how long it did not run (see _forgive_stall)
        self._stall_checked_at = (time.monotonic(), time.process_time())
        self.checkpoint_file = CheckpointFile(cfg.out)
        self._final_write_since: float | None = None  # when the run's outputs first failed to be written
        self.final_write_failing: str | None = None  # why they cannot be, while they are tried again (status)
        self._final_write_next = 0.0
        self.write_error: str | None = None         # the run's outputs could not be written: exit 1
        self._resumed_text: str | None = None
        # Why the last evaluator is gone (a goodbye, or declared dead: killed, or cut off) while no
        # other is connected: no report can come from it, so the end does not wait the rest of
        # --final-eval-timeout for one (pscnn run starts none again).  A new evaluator's hello
        # clears it; one back (cut off) while the server scores the weights may still report.
        self.evaluator_left: str | None = None
        self.writer = None
        # made by open(), terminated when serving ends: a server built only for its checks (pscnn run's and
        # pscnn bench's of a --resume) or whose checkpoint was refused never terminated one it held
        self.ctx = None
        self.sock = None
        self.keys = curve.server_keys(cfg.keys) if cfg.keys else None
        self.authenticator = None               # ZeroMQ's ZAP handler, while serving with keys
        self.refused_handshakes = None          # what the ZAP handler never hears of, while serving with keys
        if cfg.resume:
            self._resume()
        else:
            warning = unfinished_run_warning(
                cfg.out, lambda: server_resume_advice(cfg, self.store.model, self.store.optimizer))
            if warning:
                log.warning("%s", warning)

    @property
    def rate_limited_logs(self) -> tuple[RateLimitedLog, ...]:
        return (self.log_rejected, self.log_joins, self.log_leaves, self.log_clients_before, self.log_handshakes,
                self.log_too_many_evaluations)

    @property
    def over(self) -> bool:
        """No more training: every epoch applied, or the run failed."""
        return self.work.done or self.failure is not None

    # Non-finite pushes (a NaN or Inf loss or gradient, for a batch the sender holds) with no
    # update between that mean the weights themselves are broken, not one faulty trainer: once
    # there are NONFINITE_LIMIT of them, the run diverged when no trainer vouches for the weights
    # any more (see _vouches: each one still working sends only those).  A trainer whose last
    # NONFINITE_LIMIT pushes were all non-finite while another vouches is the faulty one: it is
    # told to stop and dropped (else it kept taking batches back, the last one of an epoch for good).
    NONFINITE_LIMIT = 8
    # Leases one trainer may hold at once: two with --overlap, one otherwise. A
    # trainer asking for more is hoarding batches the others could compute.  Sync
    # mode (no --overlap there) allows one: a round counts one batch per trainer,
    # and a second lease would push the first out of it.
    MAX_LEASES_PER_WORKER = 2
    # Evaluations one server records besides the final one: EVAL_RECORDS_AT_ONCE, then one more for
    # each second it has served.  A real evaluator reports one per --every (10 s by default), and
    # scoring the test set takes a while itself; an evaluator reporting every version, or every
    # old version at once, wrote an eval line in metrics.jsonl (the full record, never thinned) per
    # update, as fast as training made them.  A report beyond the bound is refused: one record a
    # second is finer than any curve of the run needs; an honest evaluator with a tiny --every is
    # told to evaluate less often.
    EVAL_RECORDS_AT_ONCE = 100
    EVAL_RECORDS_PER_S = 1.0

    def _fail(self, reason: str, now: float) -> None:
        """Stop training for good: trainers are told to stop, the summary records why."""
        if self.failure is None:
            self.failure = reason
            self.t_train_end = self.t_train_end or now
            log.error("%s", reason)
            self.writer.log("failed", version=self.store.version, reason=reason)

    # ================================================================== lifecycle
    def open(self) -> None:
        """Bind the socket, then open the run folder: what serving needs before the first message.

        In that order: a server that cannot bind (the port is taken) must leave the
        run folder as it was, an earlier run's metrics.jsonl included.
        """
        shortage = raise_open_files_limit(self.cfg.max_workers)
        if shortage:
            log.warning("%s", shortage)
        self.ctx = P.own_context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        if self.keys is not None:       # before the bind: no connection is ever accepted unchecked
            curve.secure_server(self.sock, self.keys)
            self.authenticator = curve.start_authenticator(self.ctx, self.keys)
            self.refused_handshakes = curve.RefusedHandshakes(self.sock)
        configure_router(self.sock, P.max_frame_bytes(self.store.push_bytes), self.cfg.peer_timeout)
        try:
            P.bind(self.sock, self.cfg.bind)
            address = P.tcp_address(self.cfg.bind)
            if address is not None and int(address[1]) == 0:
                # the port it got, in its log line and config.json ("the address it listened on")
                self.cfg = replace(self.cfg, bind=self.sock.getsockopt_string(zmq.LAST_ENDPOINT))
            if self.endpoint_file is not None:
                self._tell_endpoint()
            # a run started over keeps the earlier run's files until it has an update of its own: stopped
            # before (see _would_replace_an_earlier_run_with_nothing), it leaves that run whole, for --resume
            self.writer = RunWriter(self.cfg.out, {"server": self.cfg.to_json(), "model": self.spec},
                                    resume=self.cfg.resume,
                                    keep_earlier=self.checkpoint_file.from_before_this_server())
        except BaseException:
            self.sock.close(linger=0)
            self._stop_curve()
            self.ctx.term()
            raise
        if self.cfg.resume:
            self._adopt_logged_records()

    def _tell_endpoint(self) -> None:
        """Write the endpoint it listens on to --endpoint-file, whole or not at all: pscnn run starts its
        clients once it is there.  A port found free and handed to the server could be taken by another
        process before the server bound it (pscnn run failed, "Address already in use", its evaluator
        had joined that process's run); a port the server binds itself, 0, cannot."""
        try:
            with atomic_write(self.endpoint_file, "w", encoding="utf-8") as fh:
                fh.write(self.cfg.bind + "\n")
        except OSError as exc:
            raise RunLogError(f"--endpoint-file {self.endpoint_file}: cannot write: {exc.strerror or exc}") from None

    def _log_start(self) -> None:
        """metrics.jsonl's record of this server's start: where each incarnation's records begin."""
        self.writer.log("start", run_id=self.run_id, incarnation=self.incarnation, version=self.store.version,
                        resumed=self.cfg.resume, epoch=self.work.epoch)

    def _stop_curve(self) -> None:
        """Stop the ZAP handler and the handshakes' watch (with keys)."""
        if self.refused_handshakes is not None:
            self.refused_handshakes.close()
            self.refused_handshakes = None
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    def serve(self) -> int:
        """Run until training is over and every client was told to stop.

        Returns 0, or 1 when training failed (diverged): the summary and the
        log say why, and the last periodic checkpoint is kept; or when the
        run's outputs (or an interrupted run's checkpoint) could not be written.
        """
        old_handlers = self._install_signal_handlers()  # first: a stop while binding is a stop too
        try:
            self.open()
        except BaseException:
            self._restore_signal_handlers(old_handlers)
            if self._stop_requested and old_handlers:
                ignore_stop_signals()   # stopping: a repeat must not cut the outputs short (see there)
            raise
        keys = len(self.keys.authorized) if self.keys else 0
        log.info("listening on %s%s: mode=%s%s, %d %s x %d %s of %d, model %s (%s params), "
                 "optimizer %s", self.cfg.bind,
                 f" (CURVE: {keys} authorized client {for_count(keys, 'key')})" if self.keys else "", self.cfg.mode,
                 f" (staleness {self.cfg.staleness})" if self.cfg.mode == "ssp" else "",
                 self.cfg.epochs, for_count(self.cfg.epochs, "epoch"), self.work.batches_per_epoch,
                 for_count(self.work.batches_per_epoch, "batch", "batches"),
                 effective_batch_size(self.cfg.batch_size, self.num_samples),
                 self.cfg.model if isinstance(self.cfg.model, str) else "custom",
                 f"{self.store.model.num_parameters():,}", self.store.optimizer.config()["name"])
        if self._resumed_text:
            log.info("%s", self._resumed_text)
        if not self.started:
            log.info("handing out no work until %d trainers ask for it (at most %.0f s after the first)",
                     self.cfg.wait_for_workers, self.cfg.start_timeout)
        self._log_start()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        last_housekeeping = 0.0
        self._stall_checked_at = (time.monotonic(), time.process_time())     # the time since __init__ was no stall
        try:
            while True:
                events = dict(poller.poll(50))
                # before the messages: those that came during a stall are handled with it forgiven (one
                # more trainer at the start barrier must not find the first one waited past --start-timeout)
                self._forgive_stall(time.monotonic())
                if self.sock in events:
                    self._drain_burst()         # before housekeeping
                now = time.monotonic()
                if now - last_housekeeping >= 0.05:
                    last_housekeeping = now
                    # and at the ``now`` of the deadlines: a stall during the messages (or between the
                    # check above and here) declared every peer dead before it was forgiven
                    self._forgive_stall(now)
                    if self._housekeeping(now):
                        break
                if self._stop_requested:
                    if self.summary_written and self.finished_before:
                        # the wait for clients yet to connect (see _finish), nothing else, was cut
                        # short: pscnn run stops it so, as it starts none ("interrupted after the
                        # run finished: no checkpoint written" said a run had lost something)
                        log.info("stopped while waiting for clients: the run had finished already, and its "
                                 "results are written")
                    elif self.summary_written or self.failure is not None:
                        # Finished: a checkpoint now would postdate summary.json and make the folder
                        # look unfinished (see unfinished_run_warning); diverged: the last periodic
                        # checkpoint, from before the failure, is the one to keep.
                        log.info("interrupted after the run %s: no checkpoint written",
                                 "diverged" if self.failure is not None else "finished")
                        if not self.summary_written:
                            # diverged while its final evaluation was awaited: the summary says so, without
                            # it (no summary, and pscnn run said "the same command starts the run again",
                            # exit 130: a command that diverges again)
                            log.info("writing the diverged run's summary without a final evaluation")
                            self._write_final(time.monotonic())
                    elif self._would_replace_an_earlier_run_with_nothing():
                        log.warning("interrupted before the first update: no checkpoint written; the one there, "
                                    "from before this server started, stays, with its metrics.jsonl and config.json")
                    else:
                        log.warning("interrupted%s: writing a checkpoint; continue later with --resume",
                                    " before the final evaluation" if self.over and self.final_eval is None else "")
                        if not self._checkpoint():
                            self.write_error = (f"interrupted, and the checkpoint could not be written "
                                                f"({P.one_line(self.checkpoint_file.failing)}); --resume would "
                                                f"continue from {self.checkpoint_file.last_text()}")
                    break
        finally:
            for limited in self.rate_limited_logs:
                limited.flush(time.monotonic(), final=True)
            self._restore_signal_handlers(old_handlers)
            if self._stop_requested and old_handlers:
                ignore_stop_signals()   # stopping: a repeat must not cut the outputs short (see there)
            if self.plots.drawing:
                # a stop while they are drawn: the run's results are written, its plots soon
                log.info("waiting for the plots to be drawn")
                self.plots.join()
            self.sock.close(linger=1000)
            self._stop_curve()
            self.ctx.term()             # waits out the linger: the last replies go before the process ends
            self.writer.close()
        for problem in (self.failure, self.write_error):
            if problem is not None:
                print(f"pscnn server: {problem}", file=sys.stderr)
        return 1 if self.failure is not None or self.write_error is not None else 0

    def _drain_burst(self) -> None:
        """Handle the messages waiting, up to BURST of them."""
        for _ in range(BURST):
            try:
                frames, count = P.recv_message(self.sock, zmq.NOBLOCK, routed=True)
            except zmq.Again:
                return
            excess = P.too_many_frames(count, routed=True)
            if excess is not None:
                self._reject(frames[0].bytes, None, excess)
                continue
            self._on_frames_guarded(frames)

    def _install_signal_handlers(self):
        def on_signal(signum, _frame):
            self._stop_requested = True
        if stop_raised():               # a stop while the server loaded, whose exception was lost: stop now
            self._stop_requested = True
        old = {}
        # SIGHUP: the terminal closed (an ssh session dropped): checkpoint and stop, as on SIGTERM
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                old[sig] = signal.signal(sig, on_signal)
            except ValueError:          # not the main thread (tests): no handlers
                pass
        return old

    @staticmethod
    def _restore_signal_handlers(old) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    # ================================================================== dispatch
    def _on_frames_guarded(self, frames) -> None:
        """:meth:`_on_frames`, but a bug it hits costs one message, not the run.

        Validation rejects bad input before this could happen; should a
        message still raise, the server logs one line (the traceback at debug
        level), answers with an error where it can, and keeps serving: the
        weights and everything trained since the last checkpoint stay.
        """
        try:
            self._on_frames(frames)
        except Exception as exc:   # noqa: BLE001  (deliberately broad: see above)
            self.rejected["internal_error"] += 1
            rid = frames[0].bytes if frames else b""
            self.log_rejected.log(logging.ERROR, "internal error on a message from %s: %s: %s; still serving",
                                  _sender(rid), type(exc).__name__, " ".join(str(exc).split())[:300])
            log.debug("traceback", exc_info=True)
            try:
                self._send(rid, P.error("internal_error", f"the server failed on this message ({type(exc).__name__})"))
            except Exception:      # noqa: BLE001  (the peer may be gone: nothing more to do)
                pass

    def _on_frames(self, frames) -> None:
        if len(frames) < 2:
            return                      # a ROUTER always prefixes the routing id; nothing to answer
        rid = frames[0].bytes
        try:
            msg = P.decode(frames[1:])
        except P.ProtocolError as exc:
            self._reject(rid, None, exc)
            return
        now = time.monotonic()
        if msg.type == P.STATUS:
            self._send(rid, P.Message(P.STATUS, body={"progress": self.progress()}))
            return
        key = curve.sender_key(frames) if self.keys is not None else None
        if msg.type == P.HELLO:
            self._on_hello(rid, msg, now, key)
            return
        peer = self.peers.get(msg.wid)
        if peer is None:
            self._refuse_unknown(rid, msg, now, key)
            return
        if self._refused_as_anothers(rid, msg, peer, key):     # before it counts as alive or anything of it moves on
            return
        peer.last_seen = now
        if msg.type == P.HEARTBEAT:     # from the client's heartbeat socket: no sequence number
            self._send(rid, P.Message(P.HEARTBEAT, body={"version": self.store.version,
                                                         "done": self.over}))
            return
        if msg.seq == peer.last_seq and msg.type != peer.last_type:
            self._reject(rid, msg, _seq_reused(msg, peer))
            return
        if msg.seq == peer.last_seq:    # a resend: same answer, never a second application
            self._resend(peer, msg, rid, now)
            return
        if msg.seq < peer.last_seq:
            log.debug("ignoring late duplicate seq %d from %s", msg.seq, peer.name)
            return
        peer.last_seq = msg.seq
        peer.last_type = msg.type
        peer.cached_reply = None
        peer.pending = True
        handler = {P.WORK: self._on_work, P.PUSH: self._on_push, P.PULL: self._on_pull,
                   P.EVAL_REPORT: self._on_eval_report, P.BYE: self._on_bye}.get(msg.type)
        allowed = {"trainer": (P.WORK, P.PUSH, P.BYE), "evaluator": (P.PULL, P.EVAL_REPORT, P.BYE)}[peer.role]
        if handler is None or msg.type not in allowed:
            self._reply(peer, P.error("unexpected_type", f"{peer.role}s may not send {msg.type!r}"))
            self._rejected("unexpected_type", "rejected %s from %s: %ss may not send it", msg.type, peer.name,
                           peer.role)
            return
        handler(peer, msg, now)

    def _refuse_unknown(self, rid: bytes, msg: P.Message, now: float, key: str | None) -> None:
        """A message from a worker id that is not in the run: it must say hello (again).

        A dropped peer's messages are refused with the reason and logged once: after a
        network cut, what the peer sent meanwhile (heartbeats, resends) arrives in a burst.
        ``key``: the CURVE key the message came with; another than the dropped peer's is told only that.
        """
        gone = self.dropped.get(msg.wid)
        if gone is not None and self._refused_as_anothers(rid, msg, gone, key):
            return
        if gone is None and msg.wid in self.clients_before:
            self._ask_client_before_to_rejoin(rid, msg)
            return
        if gone is None:
            self._reject(rid, msg, _unknown_id(msg.wid))
            return
        ago = now - gone.at
        if msg.type == P.HEARTBEAT and gone.reason == "left" and ago < self.cfg.peer_timeout:
            # its heartbeat socket's last beat, sent before its goodbye on a connection of its own and
            # come after it (held up by a reconnect: a client of the run before a --resume): no fault
            log.debug("a heartbeat from %s after its goodbye (%.1f s ago)", gone.name, ago)
        else:
            gone.refused += 1
            if gone.refused == 1:
                self._rejected("unknown_worker", "refusing messages from %s until it says hello again: dropped "
                               "%.1f s ago (%s)", gone.name, ago, gone.why)
            else:
                self._rejected("unknown_worker", None)
        self._send(rid, P.error("unknown_worker", f"worker id {msg.wid!r} ({gone.name}) was dropped from the run "
                                f"{ago:.1f} s ago ({gone.why}): send hello to rejoin", msg.seq))

    def _ask_client_before_to_rejoin(self, rid: bytes, msg: P.Message) -> None:
        """A message from a client of the run before this server's --resume: answered as an unknown
        id's, so that it says hello again.  Every client of a restarted server comes back so, with a
        few messages sent meanwhile (heartbeats, resends): one INFO line per client, and not counted
        in rejected_messages (a clean restart's report showed them as faults)."""
        self.clients_before[msg.wid] += 1
        if self.clients_before[msg.wid] == 1:
            self.log_clients_before.log(logging.INFO, "a client of the run before the restart: %s (%s); "
                                        "told to say hello again", msg.wid, msg.type)
        exc = _unknown_id(msg.wid)
        self._send(rid, P.error(exc.code, str(exc), msg.seq))

    def _refused_as_anothers(self, rid: bytes, msg: P.Message, owner, key: str | None) -> bool:
        """Refuse a message under the id of ``owner`` (a Peer or DroppedPeer) from a client that is not
        it: one with another CURVE key (plain: None == None), or from a connection not its own
        (:func:`_from_own_connection`).  Whether it was refused."""
        if owner.key != key:
            self._refuse_other_key(rid, msg, owner, key)
            return True
        if not _from_own_connection(rid, msg, owner):
            self._refuse_other_connection(rid, msg, owner)
            return True
        return False

    def _refuse_other_key(self, rid: bytes, msg: P.Message, owner, key: str) -> None:
        """A message under the id of ``owner`` (a Peer or DroppedPeer) from a client that holds another
        CURVE key than the one ``owner`` joined with: a key holder must not push, work or rejoin as
        another's peer.  Its own key may rejoin under the id (a client that lost its connection)."""
        self._rejected("wrong_key", "refused %s under worker id %s (%s, joined with CURVE key %s) from a client "
                       "with key %s", msg.type, msg.wid, owner.name, self.keys.name(owner.key), self.keys.name(key))
        self._send(rid, P.error("wrong_key", f"worker id {msg.wid!r} belongs to a peer that joined with another "
                                "CURVE key: a client may use only the ids it joined with", msg.seq))

    def _refuse_other_connection(self, rid: bytes, msg: P.Message, owner) -> None:
        """A request under the id of ``owner`` (a Peer or DroppedPeer) from another connection than the one
        it joined from.  Taken, one with a sequence number far ahead silenced the peer (its own requests
        ignored as late duplicates, for 10 x its --give-up-after), a goodbye dropped it, and its replies
        went to the sender.  A pscnn client keeps its routing id, which holds a secret token
        (pscnn.names.routing_id), across reconnects; its heartbeats come from a socket of their own,
        whose routing id is made from that one (pscnn.names.heartbeat_routing_id).  Heartbeats from
        anyone who knew the id kept a peer that was gone counted alive."""
        self._rejected("wrong_connection", "refused %s under worker id %s (%s) from %s, not the connection it "
                       "joined from", msg.type, msg.wid, owner.name, _sender(rid))
        self._send(rid, P.error("wrong_connection", f"worker id {msg.wid!r} belongs to a peer that joined from "
                                "another connection: a client may use only the ids it joined with", msg.seq))

    def _rejected(self, code: str, fmt: str | None, *args, lines: RateLimitedLog | None = None) -> None:
        """Count a rejected message and log it, up to ``--log-rejected`` lines a second (or as
        ``lines`` allows).

        A flood of bad messages must not flood the log: beyond the limit they
        are only counted (summary.json's ``rejected_messages``), and the
        housekeeping says how many went unlogged.  ``fmt`` None: counted only
        (what was said once already).
        """
        self.rejected[code] += 1
        if fmt is not None:
            (lines or self.log_rejected).log(logging.WARNING, fmt, *args)

    def _reject(self, rid: bytes, msg, exc: P.ProtocolError) -> None:
        who = msg.wid if msg is not None and msg.wid else _sender(rid)
        self._rejected(exc.code, "rejected message from %s: %s", who, exc)
        self._send(rid, P.error(exc.code, str(exc), msg.seq if msg is not None else 0))

    def _send(self, rid: bytes, msg: P.Message) -> list:
        frames = P.encode(msg)
        P.send_frames(self.sock, frames, rid)
        return frames

    def _reply(self, peer: Peer, msg: P.Message) -> None:
        """Answer the peer's current request; the reply is kept for resends."""
        msg.wid = ""
        msg.seq = peer.last_seq
        peer.replied_at = time.monotonic()      # before sending: a preemption must not shrink the next push's window
        frames = self._send(peer.rid, msg)
        peer.cached_reply = KeptReply(message=replace(msg, arrays={}), weights=weakref.ref(msg.arrays.flat)) \
            if msg.arrays else KeptReply(frames=frames)
        peer.pending = False

    def _resend(self, peer: Peer, request: P.Message, rid: bytes, now: float) -> None:
        """Answer ``request``, a resend of ``peer``'s last one, with the reply kept; nothing while it is parked.

        A reply that carried weights goes with them while the server still holds them: they are the
        newest, or an answer ZeroMQ still queues carries them (byte for byte the first answer).  Else
        a task goes again with its lease and ack and the newest weights, and the next task carries
        weights too (the trainer may have taken either answer); a pull, which changes nothing, is
        answered afresh.  A peer resending without reading while training went on was answered with
        a new version each time, each queued with its own weights: 377 MB of the seed model for one.
        """
        kept = peer.cached_reply
        if kept is None:
            return
        if kept.message is None:
            P.send_frames(self.sock, kept.frames, rid)
            return
        held = kept.weights()
        if held is not None:
            self._send(rid, replace(kept.message, arrays=FlatArrays(self.store.push_specs, held)))
            return
        version, weights = self.store.snapshot()
        reply = kept.message
        if reply.body["version"] != version:
            if reply.type == P.WEIGHTS:
                self._on_pull(peer, request, now)
                return
            reply = replace(reply, body={**reply.body, "version": version})
            peer.known_version = -1
        peer.cached_reply = KeptReply(message=reply, weights=weakref.ref(weights.flat))
        self._send(rid, replace(reply, arrays=weights))

    # ================================================================== joining / leaving
    def _on_hello(self, rid: bytes, msg: P.Message, now: float, key: str | None) -> None:
        """``key``: the CURVE key it came with (None: plain), bound to its id from now on."""
        wid = msg.wid
        if not wid:
            self._reject(rid, msg, P.ProtocolError("hello: 'wid' (the client id) must not be empty"))
            return
        owner = self.peers.get(wid) or self.dropped.get(wid)
        if owner is not None and self._refused_as_anothers(rid, msg, owner, key):
            return
        # The client's own rule: a name goes into every line about the peer, its table entry, the
        # dropped peers remembered and every checkpoint (summary.json's worker_names).
        problem = name_problem(msg.body.get("name", ""))
        if problem:
            self._reject(rid, msg, P.ProtocolError(f"hello: name {problem}", "bad_name"))
            return
        old = self.peers.get(wid)
        if old is not None and msg.seq < old.last_seq:
            # A resend of its hello, arriving after its next request (over a connection it has
            # since replaced): taken as a new hello it dropped the peer and requeued its leases.
            log.debug("ignoring late duplicate hello seq %d from %s", msg.seq, old.name)
            return
        if old is not None and old.last_seq == msg.seq:
            if old.last_type != P.HELLO:
                self._reject(rid, msg, _seq_reused(msg, old))
                return
            if old.cached_reply is not None:
                self._resend(old, msg, rid, now)     # a resent hello
                return
        # One peer a connection: a hello under a new id from the connection another peer joined from
        # replaces that peer.  One connection saying hello under a new id each time took every
        # --max-workers place, and honest workers were refused "server full".  A pscnn client keeps
        # its id and its routing id (made from that id) for life, so its rejoins and restarts are
        # not affected.
        leaving = old or self.peer_on_connection.get(rid)
        role = msg.body["role"]
        name = msg.body.get("name") or wid
        if (leaving is None or leaving.role != role) \
                and self.role_counts[role] >= self.cfg.max_workers:
            self._reject(rid, msg, P.ProtocolError(f"server full ({self.cfg.max_workers} {role}s)", "full"))
            return
        if old is not None:
            self._drop_peer(old, "rejoined")
        elif leaving is not None:
            self._drop_peer(leaving, f"replaced (its connection said hello as {name})")
        peer = Peer(wid=wid, role=msg.body["role"], name=name, rid=rid, last_seen=now,
                    last_seq=msg.seq, key=key)
        if self.cfg.mode == "ssp":
            peer.clock = ssp_start_clock(peer, self.peers, self._ssp_floor())
            # and again at its first task: a trainer asks for work only once its data is loaded,
            # and with the clock it joined at it held back every trainer that pushed meanwhile
            peer.clock_behind = True
        self._add_peer(peer)
        if peer.role == "evaluator":
            self.evaluator_left = None
        gone = self.dropped.pop(wid, None)
        back = f"; back {now - gone.at:.1f} s after it was dropped ({gone.why})" if gone and old is None else ""
        self.log_joins.log(logging.INFO, "%s joined: %s (host %s, pid %s, device %s)%s", peer.role, name,
                           msg.body.get("host", "?"), msg.body.get("pid", "?"), msg.body.get("device", "?"), back)
        self.writer.log("join", worker=name, id=wid, role=peer.role, version=self.store.version)
        run = {"seed": self.cfg.seed, "batch_size": self.cfg.batch_size, "num_samples": self.num_samples,
               "epochs": self.cfg.epochs, "mode": self.cfg.mode, "test_limit": self.cfg.test_limit}
        self._reply(peer, P.welcome(wid, peer.role, self.spec, run, self.incarnation, self.heartbeat_s))

    def _on_bye(self, peer: Peer, msg: P.Message, now: float) -> None:
        self._reply(peer, P.Message(P.ACK))
        # Cut: it is kept with each of the DROPPED_MEMORY peers remembered, and quoted in the log,
        # metrics.jsonl and every refusal of a late message (a line may be 4,096 characters).
        reason = P.one_line(msg.body.get("reason", "bye"), 200)
        self._drop_peer(peer, f"left ({reason})")

    def _add_peer(self, peer: Peer) -> None:
        """Put ``peer`` in the peer table (its id is not there: a rejoin drops the old one first)."""
        self.peers[peer.wid] = peer
        self.role_counts[peer.role] += 1
        self.peer_on_connection[peer.rid] = peer
        self.clients_before.pop(peer.wid, None)        # back: what it sends now is a peer's

    def _remove_peer(self, peer: Peer) -> None:
        """Take ``peer`` out of the peer table, if it is there (not another peer under its id)."""
        if self.peers.get(peer.wid) is peer:
            del self.peers[peer.wid]
            self.role_counts[peer.role] -= 1
            del self.peer_on_connection[peer.rid]

    def _drop_peer(self, peer: Peer, why: str, level: int | None = None) -> None:
        """Forget a peer: requeue its leases, take it out of barriers.  ``level``: of its log line
        (WARNING for one declared dead, else INFO by default)."""
        self._remove_peer(peer)
        # not there: a hello took it out
        gone = self.dropped[peer.wid] = DroppedPeer(peer.name, why, time.monotonic(), key=peer.key, rid=peer.rid)
        if peer.role == "evaluator" and not self.role_counts["evaluator"]:
            self.evaluator_left = why
        if not self.over:   # what the run survived: not the evaluator's goodbye after the final evaluation,
            self.drops[gone.reason] += 1            # counted in summary.json when it came before the summary
        if len(self.dropped) > DROPPED_MEMORY:
            self.dropped.popitem(last=False)
        requeued = self.work.release_worker(peer.wid)
        level = level or (logging.WARNING if "dead" in why else logging.INFO)
        self.log_leaves.log(level, "%s %s %s%s", peer.role, peer.name, why,
                            f"; requeued batches {requeued}" if requeued else "")
        self.writer.log("leave", worker=peer.name, reason=why, requeued=requeued, version=self.store.version)
        now = time.monotonic()
        if self.cfg.mode == "sync":            # an arrived gradient stays in the round
            self.sync_round.members.pop(peer.wid, None)
            self._maybe_close_round(now)
        if self.cfg.mode != "async":           # its requeued batches, or the SSP bound it held back
            self._release_parked(now)

    # ================================================================== trainers
    def _on_work(self, peer: Peer, msg: P.Message, now: float) -> None:
        if not self._awaits_round(peer, msg):
            self._give_task(peer, now, ack=None)

    def _awaits_round(self, peer: Peer, msg: P.Message) -> bool:
        """Sync mode: refuse a new request from a trainer whose push waits for its round.

        The round's reply (the next task) answers that push; answering a second
        request too would lease the trainer a batch outside every round.
        """
        if not peer.in_round:
            return False
        batch = self.sync_round.arrived[peer.wid][0]["batch"]
        problem = (f"your push of batch {batch} waits for its sync round; its reply brings the next task, "
                   f"so wait for it before sending a {msg.type}")
        self._rejected("round_pending", "rejected %s from %s: %s", msg.type, peer.name, problem)
        self._reply(peer, P.error("round_pending", problem))
        return True

    def _park(self, peer: Peer, now: float, ack: dict | None) -> None:
        """Leave the trainer's request unanswered for now: :meth:`_release_parked` retries it."""
        peer.parked_since = peer.parked_since or now
        peer.parked_ack = ack

    def _give_task(self, peer: Peer, now: float, ack: dict | None) -> None:
        """Answer a trainer's current request with a task, a wait, or stop, or park it.

        The reply's ``held_s`` is how long the request was parked (at the start
        barrier, a sync round, an SSP bound).
        """
        if self.over:
            peer.told_to_stop = True
            peer.parked_since = 0.0
            body = {"version": self.store.version, "reason": self.failure or "training finished"}
            if ack is not None:
                body["ack"] = ack
            self._reply(peer, P.Message(P.STOP, body=body))
            return
        if not self.started:
            self._park(peer, now, ack)
            self._maybe_start(now)      # this request may be the last one awaited
            return
        if self.cfg.mode == "ssp" and not ssp_within_bound(peer.clock, self._ssp_floor(), self.cfg.staleness):
            self._park(peer, now, ack)
            return
        if self.cfg.mode == "sync" and peer.wid in self.sync_round.arrived:
            # It rejoined while its earlier push waits in the round, kept under its id: a batch
            # leased now would join that round under the same id, and its push replace the earlier
            # one, whose batch was then never applied (the epoch never ended).  Its task comes
            # when the round closes (_release_parked), as for a trainer finding the epoch draining.
            self._park(peer, now, ack)
            return
        held = self.work.held_by(peer.wid)
        if len(held) >= (1 if self.cfg.mode == "sync" else self.MAX_LEASES_PER_WORKER):
            peer.parked_since = 0.0     # answered now: a later task's held_s must not count this wait
            self._rejected("too_many_leases", "refused %s another batch: it holds leases on batches %s already",
                           peer.name, held)
            self._reply(peer, P.error("too_many_leases", f"this worker holds leases on batches {held} already; "
                                                         "push their gradients before asking for more"))
            return
        if self.cfg.mode == "ssp" and peer.clock_behind:
            # Back after its lease expired: it must not hold the others back while it
            # makes up pushes it never computed.
            peer.clock = ssp_start_clock(peer, self.peers, self._ssp_floor())
            peer.clock_behind = False
        lease = self.work.lease(peer.wid, now, self.store.version)
        if lease is not None and self.t_train_start is None:
            self.t_train_start = now
        if lease is None and self.cfg.mode == "sync":
            self._park(peer, now, ack)  # the epoch is draining: the next task comes when the round closes
            return
        held_s = now - peer.parked_since if peer.parked_since else 0.0
        peer.parked_since = 0.0
        if lease is None:
            # ssp: without a lease it holds nobody back while the others finish the epoch, so
            # back at work it starts from the slowest clock at work (not behind it, over the bound)
            peer.clock_behind = self.cfg.mode == "ssp"
            body = {"retry_s": 0.05, "held_s": held_s, "reason": "epoch draining"}
            if ack is not None:
                body["ack"] = ack
            self._reply(peer, P.Message(P.WAIT, body=body))
            return
        if self.cfg.mode == "sync":
            self.sync_round.members[peer.wid] = (lease.epoch, lease.batch)
        arrays = {}
        if peer.known_version != self.store.version:
            _, arrays = self.store.snapshot()
            peer.known_version = self.store.version
        self._reply(peer, P.task(self.store.version, lease.epoch, lease.batch, lease.lease_id, held_s, ack, arrays))

    def _on_push(self, peer: Peer, msg: P.Message, now: float) -> None:
        b = msg.body
        peer.push_window = (peer.replied_at, now)
        if self._awaits_round(peer, msg):
            return
        if self.over:               # diverged, or done: nothing is applied any more
            self._give_task(peer, now, {"applied": False, "reason": "training is over"})
            return
        live = self.work.is_live(b["epoch"], b["batch"])
        try:
            if live:                # first: only a batch the sender holds may count towards divergence
                self._check_claims(peer, b)
            else:                   # a late push is fine; one for a batch that never was is not
                self._check_batch_exists(b)
            if b["loss"] is None:
                raise P.ProtocolError("push: the loss is NaN or Inf; gradient rejected", "non_finite")
            grads, state = self.store.check_push_arrays(msg.arrays)
        except P.ProtocolError as exc:
            non_finite = exc.code == "non_finite" and live
            if non_finite:
                self.nonfinite_streak += 1
                self.nonfinite_senders.add(peer.wid)
                peer.nonfinite_streak += 1
            requeued = self.work.release(b["epoch"], b["batch"], holder=peer.wid)
            self._resend_state_after_unapplied_push(peer)
            if self.cfg.mode == "sync":
                self.sync_round.members.pop(peer.wid, None)
            self._rejected(exc.code, "rejected push from %s (epoch %d batch %d): %s%s", peer.name, b["epoch"],
                           b["batch"], exc, "; batch requeued" if requeued else "")
            if non_finite and self._diverged(now):
                self._reply(peer, P.error(exc.code, str(exc)))
                senders = len(self.nonfinite_senders)
                self._fail(f"training diverged: the last {self.nonfinite_streak} pushes, from {senders} "
                           f"{for_count(senders, 'trainer')}, had a NaN or Inf loss or gradient (weights of "
                           f"version {self.store.version}). {TrainingDiverged.ADVICE}", now)
                return
            if non_finite and peer.nonfinite_streak >= self.NONFINITE_LIMIT:
                self._drop_faulty(peer)
                return
            self._reply(peer, P.error(exc.code, str(exc)))
            if self.cfg.mode == "sync":
                self._maybe_close_round(now)
            elif self.cfg.mode == "ssp" and requeued:
                # Its sender holds no lease now: the SSP bound it held may have moved (else a
                # slowest trainer sending only NaN keeps the others parked until the run is
                # declared diverged on its pushes alone), and back at work it starts from the
                # slowest clock at work, as after an expired lease.
                peer.clock_behind = True
                self._release_parked(now)
            return
        if live:
            peer.nonfinite_streak = 0       # finite again: it vouches for the weights (_vouches)
        if not live:
            # ssp: its lease went with the batch, applied by another (it held nobody back since)
            peer.clock_behind = self.cfg.mode == "ssp"
            self._give_task(peer, now, {"applied": False, "reason": "batch already applied or epoch over"})
            return
        if self.cfg.mode == "sync":
            self._push_sync(peer, msg, grads, state, now)
            return
        staleness = self.store.version - b["base_version"]
        try:
            lr = self.store.apply(grads, state)
        except TrainingDiverged as exc:
            self._fail(str(exc), now)
            self._give_task(peer, now, {"applied": False, "reason": "training diverged"})
            return
        self._applied([(peer, b)], lr, [staleness], now)
        if self.cfg.mode == "ssp":
            peer.clock += 1
        self._give_task(peer, now, {"applied": True, "staleness": staleness})
        if self.cfg.mode == "ssp":
            self._release_parked(now)

    def _resend_state_after_unapplied_push(self, peer: Peer) -> None:
        """Make the next task of ``peer``, whose push was refused (or dropped as a sync stale round),
        carry the weights again when the model has state: computing that batch moved the trainer's
        BatchNorm statistics, which the server never adopted.  Sent nothing while the version stood still, it trained on with them
        (with a NaN or Inf statistic, every later push of its own was refused)."""
        if self.store.state:
            peer.known_version = -1

    def _diverged(self, now: float) -> bool:
        """Whether the non-finite pushes since the last update mean broken weights (NONFINITE_LIMIT)."""
        return (self.nonfinite_streak >= self.NONFINITE_LIMIT
                and not any(self._vouches(p, now) for p in self.peers.values()))

    def _vouches(self, peer: Peer, now: float) -> bool:
        """Whether trainer ``peer``'s pushes say the weights are fine: its last push of a batch it held
        was finite (or it has pushed none yet), and it still works: a request of its waits here, or
        it was answered less than --lease-timeout ago.  A trainer hung for that long (its lease
        expired) or gone quiet vouches for nothing: it must not keep a broken run going."""
        return (peer.role == "trainer" and peer.nonfinite_streak == 0
                and (peer.pending or now - peer.replied_at < self.cfg.lease_timeout))

    def _drop_faulty(self, peer: Peer) -> None:
        """Answer trainer ``peer``'s refused push with a stop and drop it: its last NONFINITE_LIMIT
        pushes were non-finite while another trainer vouches for the weights (_diverged)."""
        why = (f"{DROPPED_FOR_NAN} (its last {peer.nonfinite_streak} had a NaN or Inf loss or gradient, "
               f"while another trainer's are finite: check that worker)")
        peer.told_to_stop = True
        self._reply(peer, P.Message(P.STOP, body={
            "version": self.store.version, "reason": f"this trainer was {why}",
            "ack": {"applied": False, "reason": "NaN or Inf"}, "dropped": True}))
        self._drop_peer(peer, why, logging.WARNING)

    def _check_batch_exists(self, b: dict) -> None:
        """ProtocolError unless (epoch, batch) names a batch of this run up to now."""
        count = self.work.batches_per_epoch
        if not 0 <= b["batch"] < count:
            raise P.ProtocolError(f"push: batch {b['batch']} is not a batch of this run (0-{count - 1}); not applied",
                                  "bad_batch")
        if not 0 <= b["epoch"] <= self.work.epoch:
            raise P.ProtocolError(f"push: epoch {b['epoch']} has not begun (the run is at epoch {self.work.epoch}); "
                                  "not applied", "bad_batch")

    def _check_claims(self, peer: Peer, b: dict) -> None:
        """ProtocolError unless what a push says of itself holds: that its sender was leased
        the batch, the batch's size, and a version this server made."""
        epoch, batch = b["epoch"], b["batch"]
        if not self.work.granted(peer.wid, epoch, batch, b["lease"]):
            raise P.ProtocolError(f"push: batch {batch} of epoch {epoch} was not leased to this worker under lease "
                                  f"{b['lease']} (a lease from before a server restart?); not applied", "not_leased")
        size = self.work.batch_size_of(batch)
        if b["count"] != size:      # a sync round's weight, and the samples counted: other data must not count
            raise P.ProtocolError(f"push: count {b['count']}, but batch {batch} has {size} samples in this run; "
                                  "not applied", "bad_count")
        if not 0 <= b["base_version"] <= self.store.version:       # staleness counts from it
            raise P.ProtocolError(f"push: base version {b['base_version']} is not one this server made "
                                  f"(0-{self.store.version}); not applied", "bad_version")
        # Nor older than the weights its task carried (a trainer only ever moves to newer ones): each
        # staleness is a key of the histogram, kept in memory, in every checkpoint and in summary.json,
        # and a push claiming version 0 made one more key per update.  Sync: answered as a stale round.
        granted_at = self.work.granted_version(b["lease"])
        if self.cfg.mode != "sync" and b["base_version"] < granted_at:
            raise P.ProtocolError(f"push: base version {b['base_version']} is older than the weights of version "
                                  f"{granted_at} sent with lease {b['lease']}; not applied", "bad_version")

    def _applied(self, contributions: list, lr: float, staleness: list, now: float) -> None:
        """Bookkeeping after one optimizer step over ``[(peer or None, push body), ...]``.

        async/ssp: one push; sync: a round (a member that died after pushing is
        None here, but its batch was in the average and counts as applied).
        """
        self.writer.replace_earlier()       # this run's first update: the earlier run's records go
        samples = 0
        self.nonfinite_streak = 0
        self.nonfinite_senders.clear()
        for p, body in contributions:
            self.work.complete(body["epoch"], body["batch"])
            samples += body["count"]
            self.losses.append(body["loss"])
            if p is not None:
                p.nonfinite_streak = 0
                self.contributors.add(p.wid, p.name)
                self.incarnation_contributors.add(p.wid, p.name)
        for s in staleness:
            self.staleness[s] += 1
        self.samples_applied += samples
        self.rate_window.append((now, self.samples_applied))
        timeline = self._timeline(contributions)
        if self.cfg.log_steps:
            timings = [body["timing"] for _, body in contributions]
            mean = {k: sum(t.get(k, 0.0) for t in timings) / len(timings) for k in P.TIMING_FIELDS}
            self.writer.log_deferred(
                "step", version=self.store.version, epoch=contributions[0][1]["epoch"],
                workers=[p.name for p, _ in contributions if p is not None], samples=samples, lr=lr,
                batches=[[body["epoch"], body["batch"]] for _, body in contributions],
                loss=sum(body["loss"] for _, body in contributions) / len(contributions),
                accuracy=sum(body["correct"] for _, body in contributions) / max(samples, 1),
                staleness=staleness, **mean, timeline=timeline)
        if self.work.done and self.t_train_end is None:
            self.t_train_end = now
            log.info("training finished: %d %s, %d %s applied", self.store.version,
                     for_count(self.store.version, "update"), self.samples_applied,
                     for_count(self.samples_applied, "sample"))
            # Now, before any reply says training is over: trainers told so exit for good, and a
            # server killed before its end's checkpoint resumed from an older one with none left.
            self._checkpoint()

    def _timeline(self, contributions: list) -> list:
        """A step record's ``timeline``: ``[worker id, answered_s, arrived_s, compute_s]`` per push (the id:
        two workers may share a name, and timeline.png drew them as one),
        the times in the run's seconds by the server's clock (when it last answered that
        worker, when this push arrived) and the worker's own compute time for it.  Between
        answer and arrival the worker computed, and its messages travelled; from arrival to
        the next answer it waited on the server (a sync round, the update).  The run
        folder's timeline.png is drawn from these (:func:`cnn_core.runlog.make_plots`).
        Each push's spans are added to :attr:`worker_seconds` here, from the same figures, so
        that the report's split is the plot title's."""
        offset = self.writer.seconds - time.monotonic()
        timeline = []
        for p, body in contributions:
            if p is None or p.push_window[0] <= 0:
                continue
            entry = [p.wid, round(p.push_window[0] + offset, 4), round(p.push_window[1] + offset, 4),
                     round(body["timing"].get("compute_s", 0.0), 4)]
            timeline.append(entry)
            if self.worker_seconds is not None:
                for start, end, part in push_spans(*entry[1:], p.last_applied_arrival):
                    self.worker_seconds[part] += end - start
            p.last_applied_arrival = entry[2]
        return timeline

    # ---------------------------------------------------------------- sync (BSP)
    def _push_sync(self, peer: Peer, msg: P.Message, grads: dict, state: dict, now: float) -> None:
        b = msg.body
        member = self.sync_round.members.get(peer.wid)
        if member is None and b["base_version"] == self.store.version and peer.wid not in self.sync_round.arrived \
                and self.work.reclaim(b["epoch"], b["batch"]):
            # Its lease expired while it computed, but the round it was computed for is still
            # open and nobody took the batch since: it joins that round, as a late push counts in
            # async (else a trainer slower than --lease-timeout never had a batch applied).
            member = self.sync_round.members[peer.wid] = (b["epoch"], b["batch"])
        if b["base_version"] != self.store.version or member != (b["epoch"], b["batch"]):
            # Computed against an older version (the worker was dropped from that round, and
            # its batch requeued then).  A batch the pusher still holds goes back to the queue,
            # and a member claiming another version leaves the round: neither waits for the
            # lease to expire (nor the pusher, allowed one lease in sync mode, for its next task).
            self.work.release(b["epoch"], b["batch"], holder=peer.wid)
            if member == (b["epoch"], b["batch"]):
                self.sync_round.members.pop(peer.wid)
                self._maybe_close_round(now)
            self._resend_state_after_unapplied_push(peer)       # the round still open: the version stood still
            self._give_task(peer, now, {"applied": False, "reason": "stale round"})
            return
        self.work.hand_in(b["epoch"], b["batch"])            # it waits in the round, no longer leased
        self.sync_round.arrived[peer.wid] = (b, grads, state)
        peer.in_round = True
        peer.parked_since = now
        self._maybe_close_round(now)

    def _maybe_close_round(self, now: float) -> None:
        if not self.sync_round.complete():
            return
        arrived = self.sync_round.in_batch_order()
        contributions = [(self.peers.get(w), b) for w, (b, _, _) in arrived]
        try:
            lr = self.store.apply_mean([(grads, state, b["count"]) for _, (b, grads, state) in arrived])
            self._applied(contributions, lr, [0] * len(contributions), now)
            ack = {"applied": True, "staleness": 0}
        except TrainingDiverged as exc:
            self._fail(str(exc), now)
            ack = {"applied": False, "reason": "training diverged"}
        self.sync_round.clear()
        for p, _ in contributions:
            # The reply to the push, if that push is still the peer's request: not to a
            # request since refused (answered already), nor to a peer that rejoined since.
            if p is not None and p.in_round:
                p.in_round = False
                if p.pending:
                    self._give_task(p, now, ack)
        self._release_parked(now)       # those that found the epoch draining: a new one may have begun

    # ---------------------------------------------------------------- ssp
    def _ssp_floor(self) -> int | None:
        """The slowest clock among the trainers at work (see ssp_floor), or None."""
        return ssp_floor(self.peers, self.work.leases.values())

    def _release_parked(self, now: float) -> None:
        """Retry every parked task request (not pushes waiting for their sync round).

        ssp: the slowest clock at work is looked up once, and again only after a retry leased a
        batch (a new trainer at work may lower it); a request it still holds back stays parked as
        it is.  Looked up for each request, it cost 0.76 s per push with 2,047 trainers held back.
        """
        floor, floor_known = None, False     # the slowest clock at work, as the leases are now
        for p in list(self.peers.values()):
            if not (p.role == "trainer" and p.pending and p.parked_since and p.wid not in self.sync_round.arrived):
                continue
            if self.cfg.mode == "ssp" and self.started and not self.over:
                if not floor_known:
                    floor, floor_known = self._ssp_floor(), True
                if not ssp_within_bound(p.clock, floor, self.cfg.staleness):
                    continue            # as _give_task would: it stays parked
            self._give_task(p, now, p.parked_ack)
            floor_known = False

    def _ready_trainers(self) -> list[Peer]:
        """Trainers whose request for work waits at the start barrier."""
        return [p for p in self.peers.values() if p.role == "trainer" and p.pending and p.parked_since]

    def _maybe_start(self, now: float) -> None:
        """Lift the start barrier once ``wait_for_workers`` trainers are asking for work, or
        ``start_timeout`` seconds after the first of them did (a server may be up long before its
        workers, and a worker asks only once its data is loaded).  Not after the first that ever
        asked: one that left since would have the next ones start the run alone, one by one."""
        if self.started:
            return
        ready, waited = self._at_start_barrier(now)
        if not ready:
            return
        if ready < self.cfg.wait_for_workers and waited < self.cfg.start_timeout:
            return
        self.started = True
        if ready < self.cfg.wait_for_workers:
            log.warning("starting with %d of the %d trainers waited for: no more asked for work within %.0f s",
                        ready, self.cfg.wait_for_workers, self.cfg.start_timeout)
        else:
            log.info("all %d trainers waited for are ready (%.1f s after the first): handing out work",
                     ready, waited)
        self.writer.log("started", trainers=ready, waited_s=round(waited, 3), version=self.store.version)
        self._release_parked(now)

    def _at_start_barrier(self, now: float) -> tuple[int, float]:
        """The trainers waiting at the start barrier, and how long the first of them has waited."""
        waiting = self._ready_trainers()
        return len(waiting), (now - min(p.parked_since for p in waiting)) if waiting else 0.0

    # ================================================================== evaluator
    def _on_pull(self, peer: Peer, msg: P.Message, now: float) -> None:
        version, arrays = self.store.snapshot()
        done = self.over
        # Scored already: a report would not be recorded (_on_eval_report), so the evaluator need not
        # spend seconds of CPU on it: a resumed run's checkpoint version, which an evaluator usually
        # scored before the restart; once training is over, a final evaluation the run has already.
        scored = self._final_evaluation_settled() is not None if done else self.history.is_recorded(version)
        body = {"version": version, "epoch": self.work.epoch, "done": done, "updates": version, "scored": scored}
        if msg.body["have_version"] == version:
            arrays = {}
        if peer.pulled is None or peer.pulled[0] != version:
            peer.pulled = (version, self._train_clock(now))    # its evaluation's time (see _on_eval_report)
        if done:
            peer.told_to_stop = True
        self._reply(peer, P.Message(P.WEIGHTS, body=body, arrays=arrays))

    def _on_eval_report(self, peer: Peer, msg: P.Message, now: float) -> None:
        m, version = msg.body["metrics"], msg.body["version"]
        acc = m.get("test_accuracy")
        code, problem = "bad_metrics", metrics_problem(m, self.store.model.num_classes)
        if not 0 <= version <= self.store.version:          # the evaluation history is indexed by it
            code, problem = "bad_version", f"version {version} is not one this server made (0-{self.store.version})"
        final = msg.body["final"] and self.over and version == self.store.version   # not a mid-run claim
        if not problem and not final and not self.history.is_recorded(version):       # a new record
            allowed = self.EVAL_RECORDS_AT_ONCE + int(self.EVAL_RECORDS_PER_S * (now - self.t_start))
            if self._evaluations_reported >= allowed:
                code, problem = "too_many_evaluations", (
                    f"version {version} not recorded: this server records {self.EVAL_RECORDS_AT_ONCE} evaluations, "
                    f"then one for each second it has served ({allowed} so far); evaluate less often (--every)")
        if problem:
            self._reply(peer, P.error(code, f"eval_report: {problem}"))
            self._rejected(code, "rejected eval_report from %s: %s", peer.name, problem,
                           lines=self.log_too_many_evaluations if code == "too_many_evaluations" else None)
            return
        settled = self._final_evaluation_settled() if final else \
            "the run's results are written already" if self.summary_written else None
        if settled is not None:
            # Pulled before the run had its final evaluation (or its results were written), scored, and
            # late (the server scored the weights itself meanwhile): acknowledged, no fault of the
            # evaluator's, but not recorded.  A final one was acknowledged as if it were the run's result,
            # and the evaluator's log showed a final accuracy that summary.json did not have; one recorded
            # after summary.json (the results written without a final evaluation, or a periodic one)
            # was in metrics.jsonl and never in summary.json's evaluations.
            log.info("%s of version %d from %s (test accuracy %.4f) came too late, not recorded: %s",
                     "final evaluation" if final else "evaluation", version, peer.name, acc, settled)
            self._reply(peer, P.Message(P.ACK, body={"not_recorded": settled}))
            return
        loss = m.get("test_loss")
        # The weights' time is when they were pulled, not when their score came back: the scoring
        # (13 s for the seed model's 10,000 images) and the period put the untrained model's accuracy
        # at the end of a short run, and every time to accuracy that much late.
        pulled = peer.pulled[1] if peer.pulled is not None and peer.pulled[0] == version else None
        record = evaluation_record(self._train_clock(now) if pulled is None else pulled, version, acc, loss, final)
        if not self.history.record(record):
            log.debug("evaluation of version %d from %s: that version is recorded already", version, peer.name)
            if final and self.final_eval is None:
                # A resumed run whose checkpoint holds its final evaluation already (the report
                # came just before the end's checkpoint): it is the run's result all the same;
                # else the server waited --final-eval-timeout and scored the weights itself.
                self.final_eval = m
            self._reply(peer, P.Message(P.ACK))
            return
        self._evaluations_reported += 1
        log_evaluation(self.writer, record, m)
        log.info("evaluation of version %d: test accuracy %.4f, loss %s, %s test images%s", record["version"], acc,
                 "?" if loss is None else f"{loss:.4f}", "?" if m.get("count") is None else f"{m['count']:.0f}",
                 " (final)" if record["final"] else "")
        if final:
            self.final_eval, self.final_eval_from = m, peer.name
        self._reply(peer, P.Message(P.ACK))

    def _final_evaluation_settled(self) -> str | None:
        """Why a final report would not be the run's result now, if it would not (see
        final_evaluation_settled); None while it awaits one."""
        return final_evaluation_settled(self.final_eval, self.final_eval_from, self.summary_written)

    # ================================================================== housekeeping
    @property
    def heartbeat_s(self) -> float:
        """How often a client heartbeats (its welcome says so): five of them per --peer-timeout."""
        return max(0.2, self.cfg.peer_timeout / 5)

    def _forgive_stall(self, now: float) -> None:
        """Count no time this process did not run as its peers' silence or against their leases.

        A server stopped (SIGSTOP, a debugger, a paused VM) or starved of CPU reads nothing
        meanwhile while its clock runs on: after --peer-timeout of it, every peer looked silent,
        was declared dead at once and had to rejoin, and every lease expired, its batch computed
        for nothing; the start barrier opened with whichever trainers had asked by then; the
        end scored the final weights itself, not waiting for a live evaluator; and a trainer
        computing its batch no longer vouched for the weights, so that another's NaN pushes
        declared the run diverged.  Time between two turns of the loop that the process spent
        neither computing nor in its poll (50 ms) is such a stall: once it is a heartbeat period
        or longer, each peer's silence and last answer, each lease's deadline, each parked
        request's wait and the end's wait for the final evaluation is moved on by it.  A server
        busy computing is not stalled: a peer that died meanwhile is still found out.
        """
        cpu = time.process_time()
        last_wall, last_cpu = self._stall_checked_at
        self._stall_checked_at = (now, cpu)
        stalled = (now - last_wall) - (cpu - last_cpu)
        if stalled < self.heartbeat_s:
            return
        for peer in self.peers.values():
            peer.last_seen = min(peer.last_seen + stalled, now)
            peer.replied_at = min(peer.replied_at + stalled, now)   # _vouches: a trainer at work still does
            if peer.parked_since:       # the start barrier's wait counts from the first one parked
                peer.parked_since = min(peer.parked_since + stalled, now)
        self.work.postpone(stalled)
        if self.t_finish_start is not None:     # the wait for the evaluator's final report
            self.t_finish_start = min(self.t_finish_start + stalled, now)
        log.log(logging.WARNING if stalled >= self.cfg.peer_timeout / 2 else logging.DEBUG,
                "the server did not run for %.1f s (stopped, suspended or starved of CPU): not counted as its "
                "peers' silence, nor against their leases or the run's waits", stalled)

    def _housekeeping(self, now: float) -> bool:
        """Leases, dead peers, checkpoints, step records and the end of the run.  True: exit the loop."""
        self.writer.flush()
        for limited in self.rate_limited_logs:
            limited.flush(now)
        if self.refused_handshakes is not None:
            for line in self.refused_handshakes.failures(BURST):
                self.log_handshakes.log(logging.WARNING, "%s", line)
        expired = self.work.expire(now)
        for worker, batch in expired:
            peer = self.peers.get(worker)
            if peer is not None:
                peer.clock_behind = True
            log.warning("lease of batch %d (epoch %d) held by %s expired; requeued", batch, self.work.epoch,
                        peer.name if peer else worker)
            if self.cfg.mode == "sync" and self.sync_round.members.get(worker, (None, None))[1] == batch:
                self.sync_round.members.pop(worker, None)
                self._maybe_close_round(now)
        if expired and self.cfg.mode != "async":
            self._release_parked(now)           # sync: a trainer parked at a draining epoch takes them;
                                                # ssp: the expired holder no longer holds the others back
        self._maybe_start(now)
        for peer in list(self.peers.values()):
            if now - peer.last_seen > self.cfg.peer_timeout:
                silent = f"silent for {now - peer.last_seen:.1f} s"
                # one that was told the run is over has simply exited, as told (trainers say no bye then)
                self._drop_peer(peer, f"gone after being told to stop ({silent})" if peer.told_to_stop
                                else f"declared dead ({silent})")
        if self.cfg.checkpoint_every and now - self.checkpoint_file.period_start >= self.cfg.checkpoint_every \
                and self.started and not self.over:     # at the start barrier nothing has changed yet
            if self._would_replace_an_earlier_run_with_nothing():
                self.checkpoint_file.period_start = now
            elif self.checkpoint_file.unchanged(self.store.version, self._checkpoint_extra()):
                # paused (every trainer gone, or a round waiting): the same file again, every period
                self.checkpoint_file.period_start = now
                log.debug("checkpoint not written: nothing changed since the last one (version %d)",
                          self.store.version)
            else:
                self._checkpoint()
        if self.over:
            return self._finish(now)
        return False

    def _finish(self, now: float) -> bool:
        if self.t_finish_start is None:
            self.t_finish_start = now
            # else the last periodic checkpoint stays: a state before the failure; tried again with
            # the run's other outputs if it fails (written already when training finished here)
            if self.failure is None and self.checkpoint_file.version != self.store.version:
                self._checkpoint()
            for p in list(self.peers.values()):     # parked trainers learn it is over
                if p.role == "trainer" and p.pending and p.parked_since:
                    self._give_task(p, now, p.parked_ack)
            # (a resumed run whose checkpoint holds its final evaluation waits for none)
            if self.cfg.final_eval_timeout and not self.role_counts["evaluator"] and self.final_eval is None \
                    and self.evaluator_left is None:
                # what for, how long and how not to: a server started by hand without an evaluator said only
                # "no evaluator connected; waiting up to 120 s for one", then nothing for two minutes
                log.info("no evaluator connected to score the final weights: waiting up to %g s for one, then "
                         "scoring them here (--final-eval-timeout sets the wait; 0 scores them at once)",
                         self.cfg.final_eval_timeout)
        if self.final_eval is None and self.evaluator_left is None \
                and now - self.t_finish_start < self.cfg.final_eval_timeout:
            return False
        if not self.summary_written:
            if self.final_eval is None:
                # --final-eval-timeout 0 asks for exactly this (pscnn run --no-evaluator)
                log.log(logging.WARNING if self.cfg.final_eval_timeout else logging.INFO,
                        "no final evaluation from an evaluator%s; scoring the final weights here",
                        f": the evaluator {self.evaluator_left}" if self.evaluator_left is not None else "")
                scoring_from = time.monotonic()
                try:
                    self.final_eval, self.final_eval_from = self._evaluate_here(), "the server"
                except _ScoringInterrupted:
                    if self.final_eval is None:
                        return False                    # a stop: the loop stops, and checkpoints
                    log.info("the evaluator's final evaluation came in while the server scored the final "
                             "weights: it is the run's result")
                now += time.monotonic() - scoring_from  # the summary comes after it: its wall_seconds count it
            if not self._write_final(now):
                return self.write_error is not None     # trying again, or given up
            self.results_written_at = now
            if self.finished_before:
                log.info("the run had finished already: clients that connect in the next %.0f s (--peer-timeout) "
                         "are told it is over", self.cfg.peer_timeout)
        # A run that had finished before this server started has no clients yet: those started with
        # it (Compose's, loading their data) would find no server and retry for --give-up-after.
        if self.finished_before and now - self.results_written_at < self.cfg.peer_timeout:
            return False
        if self.plots.drawing:
            return False        # still answering (status, pscnn run's watch for a silent server) until drawn
        # linger until every live client was told to stop (they exit on it), bounded by peer_timeout
        waiting = [p for p in self.peers.values() if not p.told_to_stop]
        return not waiting or now - self.t_finish_start > self.cfg.final_eval_timeout + self.cfg.peer_timeout

    def _write_final(self, now: float) -> bool:
        """Write the run's outputs: the final checkpoint (unless written or the run failed), then
        model.npz and summary.json; the plots are drawn in a thread from then on.  True once written.

        While they cannot be (a full disk), the server keeps serving and tries
        again every FINAL_WRITE_RETRY_S, for FINAL_WRITE_PATIENCE_S; then it
        gives up, with :attr:`write_error` set (exit status 1).
        """
        if now < self._final_write_next:
            return False
        try:
            written_from = time.monotonic()
            # the end's checkpoint again once it can hold the final evaluation: the run's result is
            # then in it for --resume (no second wait for an evaluator) and for whoever loads it
            if self.failure is None and (self.checkpoint_file.version != self.store.version
                                         or (self.final_eval and not self.checkpoint_file.holds_final_eval)):
                self._checkpoint(raise_errors=True)
            self._write_summary(now + time.monotonic() - written_from)      # its wall_seconds: to the summary
        except (OSError, PscnnError) as exc:
            text = self.final_write_failing = P.one_line(exc)
            if self._final_write_since is None:
                self._final_write_since = now
                log.error("cannot write the run's outputs to %s: %s; trying again every %.0f s for %.0f s "
                          "(free some space there)", self.cfg.out, text, self.FINAL_WRITE_RETRY_S,
                          self.FINAL_WRITE_PATIENCE_S)
            if now - self._final_write_since >= self.FINAL_WRITE_PATIENCE_S:
                self.write_error = (f"the run's outputs could not be written to {self.cfg.out} for "
                                    f"{now - self._final_write_since:.0f} s: {text}; --resume would continue "
                                    f"from {self.checkpoint_file.last_text()}")
                log.error("%s", self.write_error)
            self._final_write_next = now + self.FINAL_WRITE_RETRY_S
            return False
        if self._final_write_since is not None:
            log.info("the run's outputs are written after all")
            self.final_write_failing = None
        return True

    def _evaluate_here(self) -> dict:
        """The final weights' metrics, scored here ({} if they cannot be).  Between two batches of
        the test set the server handles its messages (_drain_burst): a status request is answered
        (``scoring``), and the clients' heartbeats, while a large model takes minutes; silent that
        long, ``pscnn run`` took the server for hung and stopped it, the run's results unwritten."""
        try:
            from cnn_core.data import load_mnist   # noqa: PLC0415
            from cnn_core.metrics import evaluate  # noqa: PLC0415
            x, y = load_mnist("test", mnist_dir=self.cfg.mnist_dir, limit=self.cfg.test_limit or None)
            self.scoring = True
            try:
                m = evaluate(self.store.model, x, y, between_batches=self._between_scoring_batches)
            finally:
                self.scoring = False
            record = evaluation_record(self._train_clock(time.monotonic()), self.store.version, m["accuracy"],
                                       m["loss"], True)
            # not logged again when recorded already: a resumed run's final evaluation the killed server
            # logged (the same weights and test set, the same scores)
            if self.history.record(record):
                log_evaluation(self.writer, record, m, by="server")
            return {"test_accuracy": m["accuracy"], "test_loss": m["loss"], **m}
        except _ScoringInterrupted:
            raise
        except Exception as exc:    # the run's weights are saved either way
            log.error("could not evaluate the final weights: %s", exc)
            return {}

    def _between_scoring_batches(self) -> None:
        """Handle the messages waiting; _ScoringInterrupted on a stop (SIGTERM, Ctrl-C) unless the
        run diverged: the end's checkpoint holds the finished run, and its --resume scores it then
        (a diverged run's summary, which says why, is written first).  And once an evaluator's
        final report came in (late, past --final-eval-timeout): the history and the log have it as
        the final evaluation already, and the score here would only have replaced it as the run's
        result, another figure of perhaps another test set."""
        self._drain_burst()
        if (self._stop_requested and self.failure is None) or self.final_eval is not None:
            raise _ScoringInterrupted

    def _train_clock(self, now: float) -> float:
        """Seconds of training, this incarnation's from its first batch handed out, earlier ones' added."""
        if self.t_train_start is None:
            return self.train_seconds_before
        end = self.t_train_end if self.t_train_end is not None else now
        return self.train_seconds_before + (end - self.t_train_start)

    def _wall_clock(self, now: float) -> float:
        """Seconds the run's servers ran: this one's since its start, earlier ones' added (not the time
        between a stop and the --resume), as pscnn train's wall_seconds counts its one process."""
        return self.wall_seconds_before + (now - self.t_start)

    def _write_summary(self, now: float) -> None:
        m = self.final_eval or {}
        train_s = self._train_clock(now)
        summary = {
            "test_accuracy": m.get("test_accuracy"), "test_loss": m.get("test_loss"),
            # as pscnn train's: the evaluator's own --test-limit, not config's, may have set how many
            "test_samples": m.get("count"),
            "per_class_accuracy": m.get("per_class_accuracy"), "confusion_matrix": m.get("confusion_matrix"),
            "precision": m.get("precision"), "recall": m.get("recall"),
            "epochs": self.cfg.epochs, "mode": self.cfg.mode,
            "staleness_bound": self.cfg.staleness if self.cfg.mode == "ssp" else None,
            # the most workers at work within one incarnation (see __init__); worker_ids and
            # worker_names list the workers whose gradients were applied, in any incarnation
            # (the CONTRIBUTORS_MEMORY that pushed last)
            "workers": self.workers_most, "worker_ids": sorted(self.contributors),
            "worker_names": sorted(set(self.contributors.values())),
            "updates": self.store.version, "samples_applied": self.samples_applied,
            "samples_seen": self.samples_applied,
            "staleness": staleness_summary(self.staleness),
            **self.history.summary(),
            "wall_seconds": round(self._wall_clock(now), 3),
            "train_seconds": round(train_s, 3),
            "train_images_per_second": self.samples_applied / train_s if train_s > 0 else 0.0,
            "batch_size": effective_batch_size(self.cfg.batch_size, self.num_samples),   # config's: as given
            "model": self.cfg.model, "optimizer": self.store.optimizer.config(),
            "rejected_messages": dict(self.rejected), "lease_requeues": self.work.requeued_total,
            "peers_dropped": dict(sorted(self.drops.items())),
            "worker_seconds": self.worker_seconds,
            "device": "cpu (server)", "config": self.cfg.to_json(),
            "status": "diverged" if self.failure else "complete", "error": self.failure,
        }
        write_results(self.cfg.out, self.writer, self.store.model, self.store.version, summary)
        self.summary_written = True
        self.writer.flush()     # every record so far in the file the plots are drawn from
        self.plots.start(self.cfg.out)
        acc = m.get("test_accuracy")
        # a diverged run's "run complete", below its ERROR "training diverged", said all was well
        log.info("run %s: %d %s, test accuracy %s, %.1f img/s; wrote %s", summary["status"], self.store.version,
                 for_count(self.store.version, "update"),
                 f"{acc:.4f}" if isinstance(acc, float) else "n/a", summary["train_images_per_second"],
                 self.cfg.out)

    # ================================================================== checkpoints
    # The run's final outputs (checkpoint, summary, model) that cannot be written
    # (a full disk) are tried again every FINAL_WRITE_RETRY_S, for FINAL_WRITE_PATIENCE_S:
    # time to free some space without losing the run.
    FINAL_WRITE_RETRY_S = 5.0
    FINAL_WRITE_PATIENCE_S = 300.0

    def _checkpoint(self, raise_errors: bool = False) -> bool:
        """Write OUT/checkpoint.npz; True if it was written.

        One that cannot be written (a full disk, a folder gone) does not stop
        the run: it is logged (once, until one is written again), the last
        checkpoint written stays as it was (writes are atomic), and the next
        one is tried after --checkpoint-every as usual.  ``raise_errors``: raise
        instead (the run's final outputs, see :meth:`_write_final`).
        """
        try:
            self._write_checkpoint()
        except (OSError, PscnnError) as exc:
            if raise_errors:
                raise
            self.checkpoint_file.period_start = time.monotonic()        # next try after the period
            if self.checkpoint_file.failing is None:
                log.warning("checkpoint not written: %s; the run goes on, and --resume would continue from %s",
                            P.one_line(exc), self.checkpoint_file.last_text())
            self.checkpoint_file.failing = str(exc)
            return False
        if self.checkpoint_file.failing is not None:
            log.info("checkpoint written again (version %d)", self.store.version)
            self.checkpoint_file.failing = None
        return True

    def _would_replace_an_earlier_run_with_nothing(self) -> bool:
        """Whether a checkpoint now would hold version 0 over the one an earlier run left in the folder
        (this server started over, without --resume, and has applied no update).  That checkpoint
        stays: stopped at once, as its warning (unfinished_run_warning) advises, then started with
        --resume, the earlier run went on from version 0, every update it had made lost."""
        return self.store.version == 0 and not self.cfg.resume and self.checkpoint_file.from_before_this_server()

    def _checkpoint_extra(self) -> dict:
        """The checkpoint's meta besides the model's and the optimizer's: the run's state and history."""
        extra = {"work": self.work.state_dict(), "samples_applied": self.samples_applied,
                 "staleness": {str(k): v for k, v in self.staleness.items()},
                 "evaluations": self.history.evaluations, "evaluations_thinned_through": self.history.thinned_through,
                 "contributors": self.contributors, "contributors_count": self.contributors.count,
                 "workers_most": self.workers_most,
                 # who a --resume will hear from again (see clients_before): the peers, those declared
                 # dead (stopped or cut off, not gone: they come back, a finished run's too), and for a
                 # while after a restart those of before not back yet (a server killed again before they
                 # came back), no longer (a client gone for good is not carried from one to the next)
                 "peer_ids": sorted(set(self.peers).union(
                     (wid for wid, gone in self.dropped.items() if gone.reason == "declared dead"),
                     self.clients_before if time.monotonic() - self.t_start < self.cfg.peer_timeout else ())),
                 # what the run survived so far (summary.json's), not only since the last restart
                 "peers_dropped": dict(self.drops), "lease_requeues": self.work.requeued_total,
                 "rejected_messages": dict(self.rejected), "worker_seconds": self.worker_seconds,
                 "train_seconds": self._train_clock(time.monotonic()),
                 "wall_seconds": self._wall_clock(time.monotonic()), "mode": self.cfg.mode,
                 "seed": self.cfg.seed, "run_id": self.run_id}
        if self.final_eval:
            extra["final_eval"] = checkpointable_metrics(self.final_eval)
        return extra

    def _write_checkpoint(self) -> None:
        extra = self._checkpoint_extra()
        t = time.perf_counter()
        self.writer.replace_earlier()   # this run's checkpoint replaces the earlier run's: its records too
        self.writer.flush()     # every step record the checkpoint includes is on disk before it
        self.checkpoint_file.write(self.store.model, self.store.optimizer, self.store.version, extra)
        log.info("checkpoint written: version %d, epoch %d (%d/%d batches) in %.0f ms", self.store.version,
                 self.work.epoch, len(self.work.applied), self.work.batches_per_epoch,
                 (time.perf_counter() - t) * 1e3)
        self.writer.log("checkpoint", version=self.store.version, epoch=self.work.epoch)

    @property
    def workers_most(self) -> int:
        """summary.json's "workers": the most distinct workers applied within one incarnation."""
        return max(self.workers_before, self.incarnation_contributors.count)

    def _resume(self) -> None:
        """Continue from ``OUT/checkpoint.npz``: every field read back is checked first.

        CheckpointError (one line naming the file and the field or setting) for a
        field of the wrong type or out of range, NaN or Inf in the arrays, or a
        run setting that differs from the checkpoint's where a continuation
        needs it to match (see server/resume.py).
        """
        path = resume_checkpoint(self.cfg.out)
        checked = {"warnings": []}

        def check(meta: dict) -> None:
            checked.update(check_resume_meta(self.cfg, path, meta, self.store.model, self.store.optimizer))

        try:
            load_model_checkpoint(path, model=self.store.model, optimizer=self.store.optimizer, check_meta=check)
        except CheckpointError as exc:       # the loader's own findings (arrays, NaN, format): say where too
            text = str(exc)
            raise CheckpointError(text if text.startswith("--resume") else f"--resume: {text}") from None
        self.store.version = checked["step"]
        self.run_id = checked["run_id"] or self.run_id      # an older checkpoint's run gets one now
        self.work = WorkQueue(self.num_samples, self.cfg.batch_size, self.cfg.epochs, self.cfg.lease_timeout,
                              epoch=checked["epoch"], applied=checked["applied"])
        self.samples_applied = checked["samples_applied"]
        self.staleness = Counter(checked["staleness"])
        self.history = EvaluationHistory(checked["evaluations"], checked["evaluations_thinned_through"])
        if len(self.history.evaluations) < len(checked["evaluations"]):
            log.info("--resume: the checkpoint's %d evaluations thinned to %d (metrics.jsonl holds them all)",
                     len(checked["evaluations"]), len(self.history.evaluations))
        self.contributors = RecentIds(CONTRIBUTORS_MEMORY, checked["contributors"], checked["contributors_count"])
        self.clients_before = dict.fromkeys(set(checked["peer_ids"]).union(self.contributors), 0)
        self.workers_before = checked["workers_most"]
        self.drops = Counter(checked["peers_dropped"])
        self.work.requeued_total = checked["lease_requeues"]
        self.rejected = Counter(checked["rejected_messages"])
        self.worker_seconds = checked["worker_seconds"]
        self.train_seconds_before = checked["train_seconds"]
        self.wall_seconds_before = checked["wall_seconds"]
        if self.work.done:              # trained to the end already: this incarnation trains for 0 s
            self.finished_before = True
            # no start barrier: no work to hand out (it logged "handing out no work until 2 trainers
            # ask", and pscnn run's bar said "waiting for the workers: 0 of 2 ready", for no worker)
            self.started = True
            if checked["optimizer"] is not None:        # another --lr or schedule given: none trained
                # a finished run's summary.json, config.json and checkpoint name the settings that trained it
                self.store.optimizer = optimizer_trained_with(path, checked["optimizer"], self.store.optimizer,
                                                              self.store.params)
                self.cfg = replace(self.cfg, optimizer=checked["optimizer"])
            self.t_train_start = self.t_train_end = self.t_start
            # and scored already, when the end's checkpoint holds it (not one of a shorter run's end)
            self.final_eval = checked["final_eval"]
        for warning in checked["warnings"]:     # only once the whole checkpoint was accepted
            log.warning("%s", warning)
        # said once serving (pscnn run builds a server only to check its --resume first)
        # a run trained to its end: "epoch 1 with 0/8 batches applied" (of a 1-epoch run, epochs counted
        # from 0) read as one with nothing trained
        where = ("every epoch trained already" if self.work.done else
                 f"epoch {self.work.epoch} with {len(self.work.applied)}/{self.work.batches_per_epoch} batches applied")
        self._resumed_text = f"resumed from {path}: version {self.store.version}, {where}"

    def _adopt_logged_records(self) -> None:
        """Take from metrics.jsonl what the earlier server logged after writing the checkpoint (the
        run folder is open: no one else writes it): its evaluations and who joined it."""
        try:
            logged = without_lost_updates(read_metrics(self.writer.metrics_path,
                                                       kinds=("start", "checkpoint", "eval", "join")))
        except OSError as exc:
            log.warning("--resume: cannot read %s (%s): the evaluation history is the checkpoint's",
                        self.writer.metrics_path, exc)
            return
        self.history.adopt_logged(logged, self.store.version, self.train_seconds_before)
        for wid in joined_since_checkpoint(logged):
            self.clients_before.setdefault(wid, 0)

    # ================================================================== status
    def _mean_loss(self) -> float | None:
        """The mean of the last losses applied, or None.  A loss is any finite number on the
        wire, and two of 1.7e308 overflow: no NumPy warning in the log, no inf in the JSON."""
        with np.errstate(over="ignore"):
            mean = float(np.mean(self.losses)) if self.losses else None
        return mean if mean is not None and math.isfinite(mean) else None

    def progress(self) -> dict:
        now = time.monotonic()
        rate = 0.0
        recent = [(t, s) for t, s in self.rate_window if now - t <= 5.0]
        if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
            rate = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])
        last = self.history.newest
        ready, waited = (0, 0.0) if self.started else self._at_start_barrier(now)
        return {"version": self.store.version, **self.work.progress(), "done": self.over,
                # pscnn run stops a server that has "finished" (a resumed finished run's linger): not
                # while it draws the plots, which its grace before SIGKILL cut short
                "finished": self.summary_written and not self.plots.drawing, "scoring": self.scoring,
                "final_evaluation": self.final_eval is not None, "error": self.failure,
                "write_failing": self.final_write_failing, "mode": self.cfg.mode,
                "samples_applied": self.samples_applied, "images_per_second": rate,
                "loss": self._mean_loss(),
                "test_accuracy": last["test_accuracy"] if last else None,
                "eval_version": last["version"] if last else None,
                "started": self.started, "ready": ready, "wait_for_workers": self.cfg.wait_for_workers,
                # seconds before --start-timeout lifts the barrier: a worker at it could say only
                # "or its --start-timeout", not how long that was
                "start_in_s": round(max(0.0, self.cfg.start_timeout - waited), 1) if ready else None,
                "round_members": len(self.sync_round.members),
                "round_arrived": len(self.sync_round.arrived),
                "trainers": self.role_counts["trainer"], "evaluators": self.role_counts["evaluator"],
                "contributors": self.contributors.count, "declared_dead": self.drops["declared dead"],
                "lease_requeues": self.work.requeued_total, "incarnation": self.incarnation,
                "host": pysocket.gethostname()}


def _unknown_id(wid: str) -> P.ProtocolError:
    """What a message under an id the server does not know is answered (the client says hello again)."""
    return P.ProtocolError(f"unknown worker id {wid!r}: send hello first (the server may have restarted)",
                           "unknown_worker")


def _from_own_connection(rid: bytes, msg: P.Message, owner) -> bool:
    """Whether ``msg``, under the id of ``owner`` (a Peer or DroppedPeer), came from routing id ``rid`` of
    a connection of the owner's: the one it joined from, or, for a heartbeat, its heartbeat socket's."""
    return rid == owner.rid or msg.type == P.HEARTBEAT and rid == heartbeat_routing_id(owner.rid)


def _sender(rid: bytes) -> str:
    """Who sent a message the server could not read, for its log line: a pscnn client's routing
    id is its client id (printable text, told apart by its last 8 characters) and a secret token,
    left out (the log is not secret); one ZeroMQ made up is 5 binary bytes, shown in hex."""
    try:
        text = without_route_token(rid.decode())
    except UnicodeDecodeError:
        text = ""
    return text if text and text.isprintable() and len(text) <= P.MAX_NAME_LEN else rid.hex()[:16]


def _seq_reused(msg: P.Message, peer: Peer) -> P.ProtocolError:
    """A new request under the number of the peer's last one, of another type: not a resend.

    The reply cache would answer it with the old request's reply and drop it unseen."""
    return P.ProtocolError(f"{msg.type}: sequence number {msg.seq} already numbered a {peer.last_type}; "
                           "number each new request higher", "bad_seq")


def serve_from_args(args) -> int:
    """``pscnn server``: build the config from the CLI flags and serve.

    The server reads the test set only to score the final weights itself when
    no evaluator does.  A folder given for it (--mnist-dir, MNIST_DIR) is read
    at the start, so that a missing or corrupt file is a one-line error then,
    not a run that ends with no test accuracy; after the flags are checked
    (building the server checks them all), which it used to precede.
    """
    cfg = config_from_args(args)
    endpoint_file = getattr(args, "endpoint_file", None)
    if not (getattr(args, "auto_resume", False) and not cfg.resume and unfinished_run_warning(cfg.out)):
        server = ParameterServer(cfg, endpoint_file)
    else:
        # A server restarted after a crash (Compose's restart: on-failure) continues its run:
        # starting over would replace the checkpoint within --checkpoint-every.
        log.info("--auto-resume: %s holds an unfinished run; continuing it", cfg.out)
        try:
            server = ParameterServer(replace(cfg, resume=True), endpoint_file)
        except CheckpointError as exc:
            # Compose restarts a server that exits 1 (a bounded number of times): the same line each time,
            # so it names every way out, in the variables' names too
            raise CheckpointError(f"--auto-resume: cannot continue the unfinished run in {cfg.out}: "
                                  f"{str(exc).removeprefix('--resume: ')}. To start over instead, replacing that "
                                  f"checkpoint, run with --no-auto-resume (PSCNN_AUTO_RESUME=0); to keep it, give "
                                  f"another --out (PSCNN_OUT)") from None
    if cfg.mnist_dir is not None or os.environ.get("MNIST_DIR"):
        from cnn_core.data import load_mnist  # noqa: PLC0415
        load_mnist("test", mnist_dir=cfg.mnist_dir, limit=cfg.test_limit or None, download=False)
    return server.serve()
