"""A trainer worker: lease a batch, compute its gradient, push it, repeat.

One round trip per step: the push carries the gradient (and BatchNorm
statistics) and its reply carries the next task, plus the weights when the
server has newer ones.  The worker computes a batch's indices itself from
(seed, epoch, batch) with ``cnn_core.data.batch_index`` (the seeded per-epoch
permutation whose batches the server leases out by number), so a task is
three integers.  Its dropout masks are seeded from the
same triple (``Model.reseed``): a batch's gradient is a function of the
weights and the batch, whichever worker computes it.

Each push reports the batch's compute time and the time from the previous push
to this batch's task (the push's round trip, and any work requests and waits
after it) split into communication (``rtt - held``) and waiting (``held``: time
the server parked a request at the start or a sync barrier or an SSP bound,
and the time slept on its "wait" replies, as when an async epoch drains).

With ``--overlap`` (async) a trainer holds two leases and computes one batch
while the push of the other travels (:meth:`Trainer.loop_overlapped`); the
server's mode decides, again at each rejoin: a new server may run another.

The welcome's run settings and model, and each task, are checked before use: a
bad welcome ends the worker with one line; a bad task (a field outside the run,
a ``held_s`` below 0 or longer than the request took; weights of a name, shape
or dtype the model does not have, with a NaN or Inf, or a negative BatchNorm
variance), an error reply or a reply of the wrong type is logged and skipped,
up to ``client.MAX_FAILURES_IN_A_ROW`` in a row (then one line, exit status 1).
A usable answer to a work request ends a streak of failed work requests, but
not of refused pushes: only a push the server accepted (its reply carries an
``ack``) does, so a server that leases batches and refuses every push ends the
worker too.  The exception: a push refused as NaN or Inf that really is (the
server counts those and stops a diverging run itself).
"""
from __future__ import annotations

import logging
import math
import time
import traceback

import numpy as np

from cnn_core import backend
from cnn_core.config import is_integer
from cnn_core.data import batch_index, batch_length, batches_per_epoch, load_mnist, resolve_mnist_dir
from cnn_core.errors import DataError, PscnnError
from cnn_core.flat import FlatArrays, all_finite
from cnn_core.model import build_model
from cnn_core.text import for_count
from cnn_core.memory import check_memory_fits
from pscnn import curve
from pscnn import protocol as P
from pscnn.cli import raise_lost_stop

from .client import (HELD_LIMIT_FACTOR, STALL_S, BadReply, Client, DroppedByServer, FailureStreak, Rejoined,
                     ServerError, ServerUnreachable, exit_status_unreachable, retry_delay)

log = logging.getLogger("pscnn.worker")

# How much longer than our own round trip a reply's held_s may say the server held
# the request (the two clocks may drift a little); anything longer makes no sense.
HELD_SLACK_S = 1.0


def _is_int(value, low: int) -> bool:
    return is_integer(value) and value >= low


def check_run(run: dict, required: tuple = ()) -> dict:
    """The welcome's ``run`` settings, or BadReply naming the first one that is missing or wrong.

    ``required``: the keys this role reads; the others are checked when present.
    """
    lows = {"seed": 0, "batch_size": 1, "num_samples": 1, "epochs": 1, "test_limit": 0}
    for key in required:
        if key not in run:
            raise BadReply(f"the server's welcome has no run setting {key!r}")
    for key, low in lows.items():
        if key in run and not (_is_int(run[key], low) or key == "test_limit" and run[key] is None):
            raise BadReply(f"the server's welcome has run setting {key!r} = {P.one_line(repr(run[key]), 80)}, "
                           f"not an integer >= {low}")
    if "mode" in run and not isinstance(run["mode"], str):
        raise BadReply(f"the server's welcome has run setting 'mode' = {P.one_line(repr(run['mode']), 80)}, not a string")
    return run


def model_from_welcome(spec, device: str, seed: int = 0, data=None):
    """The server's model, or BadReply if its spec cannot be built (too big included: more
    parameters or values per image than cnn_core.model allows) or, given ``data`` (x, y),
    does not take those images or cannot score those labels."""
    try:
        model = build_model(spec, seed=seed, device=device)
    except PscnnError as exc:                   # SpecError: the server's spec, not ours
        raise BadReply(f"the server's model spec cannot be built: {P.one_line(exc)}") from None
    if data is not None:
        check_model_fits(model, *data)
    return model


def check_model_fits(model, x, y) -> None:
    """BadReply unless ``model`` takes images shaped like ``x`` and has an output for every label in ``y``."""
    if tuple(model.spec["input_shape"]) != tuple(x.shape[1:]):
        raise BadReply(f"the server's model takes input {list(model.spec['input_shape'])}, "
                       f"but the images are {list(x.shape[1:])}")
    labels = int(y.max()) + 1 if len(y) else 0
    if model.num_classes < labels:
        raise BadReply(f"the server's model has {model.num_classes} outputs, but the labels go up to {labels - 1}")


def check_weights(model, arrays, what: str = "weights") -> None:
    """BadReply unless the server's ``arrays`` (none: the weights we hold are the newest) are
    every parameter and state of ``model``, each of its shape and dtype, all finite, and state
    its layer can run with (no negative BatchNorm variance, which the server refuses in a push):
    what ``Model.assign`` would raise on, cast, load for the worker to train on or score, or leave
    as it was (a missing array).  One reduction over a FlatArrays' buffer."""
    if not arrays:
        return
    for name, value in arrays.items():
        target = model.params.get(name, model.state.get(name))
        if target is None:
            raise BadReply(f"the server sent {what} with an array {P.one_line(repr(name), 80)}: "
                           "the model has no parameter or state of that name")
        if tuple(value.shape) != tuple(target.shape):
            raise BadReply(f"the server sent {what} with {P.one_line(repr(name), 80)} of shape "
                           f"{list(value.shape)}, but the model's is {list(target.shape)}")
        if value.dtype != target.dtype:
            raise BadReply(f"the server sent {what} with {P.one_line(repr(name), 80)} of dtype "
                           f"{value.dtype}, but the model's is {target.dtype}")
    missing = [name for name in (*model.params, *model.state) if name not in arrays]
    if missing:
        raise BadReply(f"the server sent {what} without {len(missing)} of the model's arrays "
                       f"(the first: {missing[0]!r})")
    if not (isinstance(arrays, FlatArrays) and all_finite(arrays.flat)):
        for name, value in arrays.items():         # which one (or, several dtypes: each of them)
            if not all_finite(value.reshape(-1)):
                raise BadReply(f"the server sent {what} with NaN or Inf in {P.one_line(repr(name), 80)}")
    # Loaded, a negative variance made every evaluation NaN, reported as the run's final result
    for name in model.state:
        problem = model.state_problem(name, arrays[name])
        if problem:
            raise BadReply(f"the server sent {what} whose state {P.one_line(repr(name), 80)} {problem}")


def _refused_as_non_finite(exc: Exception, push: P.Message) -> bool:
    """Whether ``exc`` is the server refusing ``push`` for a NaN or Inf that it really has
    (its loss sent as nil, or its arrays; checked only when refused so)."""
    if not (isinstance(exc, ServerError) and exc.code == "non_finite"):
        return False
    if push.body.get("loss") is None:
        return True
    arrays = push.arrays
    flat = arrays.flat if isinstance(arrays, FlatArrays) else None
    if flat is not None:
        return not all_finite(backend.to_numpy(flat))
    return not all(all_finite(backend.to_numpy(v).reshape(-1)) for v in arrays.values())


def check_local_setup(device: str, mnist_dir, split: str | None, progress: bool = True) -> None:
    """What a worker can check before it reaches the server: the device, and that the MNIST
    ``split`` is there (downloaded into the cache if need be, with a progress bar on a terminal
    if ``progress``; None: no data needed).

    A missing folder or GPU then fails at once, in one line, instead of after
    the connection (or after ``--give-up-after`` of retrying a server that is down).
    """
    backend.array_module(device)
    if split is not None:
        resolve_mnist_dir(mnist_dir, files=[f"{split}-images", f"{split}-labels"], progress=progress)


def _no_time() -> dict:
    """A push's ``timing`` of communication and waiting before anything is counted."""
    return {"comm_s": 0.0, "wait_s": 0.0}


def _finite_or_none(loss) -> float | None:
    """The push's loss: None for NaN or Inf, which the server rejects (and counts towards divergence)."""
    loss = float(loss)
    return loss if math.isfinite(loss) else None


class _OtherLoop(Exception):
    """A rejoined server runs in a mode that takes the other loop (see :meth:`Trainer.work`)."""


class Trainer:
    def __init__(self, client: Client, device: str = "cpu", mnist_dir: str | None = None,
                 compute_ms: float | None = None, overlap: bool = False, check_memory: bool = True):
        self.client = client
        self.check_memory = check_memory    # False: --no-memory-check
        self.overlap = overlap              # --overlap: asked for; the server's mode decides (_overlapped)
        self.device = device
        self.mnist_dir = mnist_dir
        self.compute_ms = compute_ms
        self.model = None
        self.held_version = -1          # of the weights the model holds; -1: none this server sent or built
        self.run: dict = {}
        self._memory_checked = None     # (model spec, batch) of the last check_memory_fits that passed
        self.data = None
        self._epoch_batches: tuple[int, list] | None = None
        self._zero_push: FlatArrays | None = None      # synthetic mode: built once, sent every step
        self.steps = 0
        self.samples = 0
        self._failures: FailureStreak | None = None      # loop_overlapped's, for _answer_or_none
        self._refused_pushes = 0        # pushes refused (or answered unusably) since the server last accepted one
        self._waited_s = 0.0        # the "wait"s since the last task: their round trips and the sleeps they asked for

    def setup(self, welcome: P.Message) -> None:
        """Build the model from the server's spec and load this run's training data.

        BadReply (or DataError) when the welcome's settings cannot be used.
        """
        run = check_run(welcome.body["run"], required=("seed", "batch_size", "num_samples"))
        planned = (welcome.body["model"], min(run["batch_size"], run["num_samples"]))
        if self.model is None or welcome.body["model"] != self.model.spec:
            self.model = model_from_welcome(welcome.body["model"], self.device, seed=run["seed"])
            self._zero_push = None
            self.held_version = 0       # built as the server builds its own version 0, from the spec and seed
        else:
            self.held_version = -1      # a rejoin: a restarted server's versions need not be the old one's
        if self.compute_ms is None and self.check_memory and planned != self._memory_checked:
            # Against this machine's memory, which the server cannot know (a worker failed at its first
            # batch); not again on a rejoin to the same model and batch, which has run here, and whose
            # data and weights MemAvailable no longer counts.
            check_memory_fits(self.model, planned[1], f"the server's batch size {run['batch_size']}")
            self._memory_checked = planned
        if self.compute_ms is None:
            if self.data is None or len(self.data[1]) != run["num_samples"]:     # a restarted server may differ
                x, y = load_mnist("train", mnist_dir=self.mnist_dir, limit=run["num_samples"])
                if len(y) != run["num_samples"]:
                    raise DataError(f"the server's run trains on {run['num_samples']} images, but this worker's "
                                    f"MNIST training set has {len(y)}")
                self.data = (self.model.xp.asarray(x), self.model.xp.asarray(y))
            check_model_fits(self.model, *self.data)
        self.run = run
        self._epoch_batches = None          # seed, sizes or data may have changed

    def _overlapped(self) -> bool:
        """Whether this run takes loop_overlapped: --overlap, and a server in async mode (a sync round or
        an ssp clock counts one batch per worker: a second lease is refused, or waits for ever)."""
        return self.overlap and self.run.get("mode") == "async"

    def work(self) -> int:
        """:meth:`loop_overlapped` or :meth:`loop`, as the server's mode asks; a server rejoined in
        another mode (a new run on the same endpoint) switches to the other.  Returns the exit status."""
        if self.overlap and not self._overlapped():
            self._warn_one_batch_at_a_time("")
        while True:
            try:
                return self.loop_overlapped() if self._overlapped() else self.loop()
            except _OtherLoop:
                pass

    def _warn_one_batch_at_a_time(self, when: str) -> None:
        """--overlap asked for, and a server whose mode takes one batch at a time (``when``: "" at the
        start, " now" after a rejoin)."""
        log.warning("the server runs %s%s: --overlap applies to async mode only; computing one batch at a time",
                    P.one_line(self.run.get("mode")), when)

    def _rejoined(self, welcome: P.Message, overlapped: bool) -> None:
        """Set up for a rejoined server's ``welcome``; _OtherLoop if its mode takes the other loop than
        the one running (``overlapped``): an --overlap trainer kept two leases on a sync server, which
        refused every second work request (a warning each, and counted a fault of the run)."""
        self.setup(welcome)
        if not self.overlap or self._overlapped() == overlapped:
            return
        if overlapped:
            self._warn_one_batch_at_a_time(" now")
        else:
            log.info("the server runs async now: computing each batch while the previous push travels (--overlap)")
        raise _OtherLoop

    def check_task(self, reply: P.Message) -> dict:
        """The body of a task that fits this run, or BadReply: the wrong reply type, a field out of
        range (an epoch or batch outside the run, a held_s below 0 or longer than the request
        took), or weights the model cannot take (:func:`check_weights`)."""
        if reply.type != P.TASK:
            raise BadReply(f"the server answered with {reply.type!r}, not a task, wait or stop")
        body = reply.body
        batches = batches_per_epoch(self.run["num_samples"], self.run["batch_size"])
        problems = [f"{key} {body[key]} < 0" for key in ("epoch", "lease", "version") if body[key] < 0]
        epochs = self.run.get("epochs")
        if epochs is not None and body["epoch"] >= epochs:
            problems.append(f"epoch {body['epoch']} is not one of the run's {epochs} epochs")
        if not 0 <= body["batch"] < batches:
            problems.append(f"batch {body['batch']} is not one of the run's {batches} batches per epoch")
        held = self._held_problem(body)
        if held:
            problems.append(held)
        if not reply.arrays and body["version"] != self.held_version:
            # Taken for "the weights you hold are this version": the gradient of other weights went out
            # as computed on it, its staleness misjudged
            problems.append(f"version {body['version']} comes with no weights, but we hold "
                            + (f"version {self.held_version}" if self.held_version >= 0 else "none of this server's"))
        if problems:
            raise BadReply(f"bad task from the server: {'; '.join(problems)}")
        check_weights(self.model, reply.arrays, "a task")
        return body

    def take_weights(self, reply: P.Message) -> None:
        """Load the weights a checked task carries, if any: the model then holds its version."""
        if reply.arrays:
            self.model.assign(reply.arrays)
            self.held_version = reply.body["version"]

    def check_held(self, reply: P.Message) -> float:
        """A task's or wait's ``held_s`` (0 for a stop), or BadReply: below 0, or longer than
        the request took (it goes into the next push's timing, which must be >= 0)."""
        problem = self._held_problem(reply.body)
        if problem:
            raise BadReply(f"bad {reply.type} from the server: {problem}")
        return float(reply.body.get("held_s", 0.0))

    def _held_problem(self, body: dict) -> str | None:
        held = body.get("held_s", 0.0)
        if held < 0:
            return f"held_s {held} < 0"
        rtt = getattr(self.client, "last_rtt_s", None)          # the request's round trip, the reply's included
        if isinstance(rtt, float) and held > rtt + HELD_SLACK_S:
            return f"held_s {held:.6g} is longer than our request took ({rtt:.3g} s)"
        return None

    def _usable(self, failures: FailureStreak, reply: P.Message, from_push: bool) -> None:
        """A usable reply: a push's ack ends the failure streak; any other usable answer
        leaves in it only the refused pushes since the server last accepted one.  A run of
        waits is bounded too (:meth:`_waited`)."""
        if from_push and "ack" in reply.body:
            self._refused_pushes = 0
        if self._refused_pushes:
            failures.count = self._refused_pushes
        else:
            failures.reset()
        self._waited(reply)

    def _waited(self, reply: P.Message) -> None:
        """Note a usable task or wait (from :meth:`_usable`); ServerUnreachable once the server has said nothing but "wait" for
        HELD_LIMIT_FACTOR times give_up_after: like a request held back for good (client._roundtrip),
        a server that answers every request with a wait, and heartbeats too, must not park us for good.
        That time is the waits' round trips and the sleeps they asked for, not the clock's: a trainer
        stopped (SIGSTOP, Ctrl-Z) past the limit while it waited gave up at once when continued."""
        if reply.type != P.WAIT:
            self._waited_s = 0.0
            return
        if self._waited_s > HELD_LIMIT_FACTOR * self.client.give_up_after:
            raise ServerUnreachable(f"{self.client.endpoint} answered every request with 'wait' for "
                                    f"{self._waited_s:.0f} s", answering=True)
        self._waited_s += self.client.last_rtt_s + retry_delay(reply)

    def _failed(self, failures: FailureStreak, exc: Exception, push: P.Message | None, then: str) -> None:
        """Count a failure (raises TooManyFailures at the limit).  ``push``: the push it answers,
        if any; its failure stays counted until the server accepts a push, unless the server
        refused a push of ours that was NaN or Inf, as it must (its divergence check counts those
        and stops the run itself: until then the trainer goes on with the next batch)."""
        if push is not None and not _refused_as_non_finite(exc, push):
            self._refused_pushes += 1
        failures.failed(exc, then)

    def batch(self, epoch: int, batch: int):
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            n, bs = self.run["num_samples"], self.run["batch_size"]
            self._epoch_batches = (epoch, batch_index(n, bs, self.run["seed"], epoch))
        idx = self._epoch_batches[1][batch]
        x, y = self.data
        return x[idx], y[idx]

    def compute(self, body: dict) -> tuple[dict, dict]:
        """Gradient of one leased batch -> (push body fields, arrays)."""
        started = (time.perf_counter(), time.process_time())
        if self.compute_ms is not None:            # synthetic: a fixed compute time, zero gradients
            time.sleep(self.compute_ms / 1000)
            count = batch_length(self.run["num_samples"], self.run["batch_size"], body["batch"])
            if self._zero_push is None:             # read-only: sent without a copy, never changed
                self._zero_push = self.push_arrays({k: self.model.xp.zeros_like(v)
                                                    for k, v in self.model.params.items()})
                self._zero_push.flat.flags.writeable = False
            return ({"loss": 0.0, "correct": 0, "count": count,
                     "compute_s": self._computing_s(started, asleep_s=self.compute_ms / 1000)}, self._zero_push)
        xb, yb = self.batch(body["epoch"], body["batch"])
        self.model.reseed((self.run["seed"], body["epoch"], body["batch"]))    # the batch's own dropout masks
        with np.errstate(over="ignore", invalid="ignore"):     # a NaN or Inf loss: refused as such (see evaluator)
            loss, logits, grads = self.model.loss_and_grads(xb, yb)
        correct = int((logits.argmax(axis=1) == yb).sum())
        return {"loss": loss, "correct": correct, "count": int(len(yb)),
                "compute_s": self._computing_s(started)}, self.push_arrays(grads)

    def _computing_s(self, started: tuple, asleep_s: float = 0.0) -> float:
        """Seconds a computation took since ``started`` (perf_counter, process_time), less the time
        this process did not run meanwhile (SIGSTOP, Ctrl-Z, a suspended VM, starved of CPU): that
        was not computing.  On the CPU a computation runs whenever it is not asleep (``asleep_s``:
        --compute-ms's sleep), so wall time beyond both by STALL_S or more is such a pause (the
        client's threshold for one); shorter gaps count as computing.  On a GPU the host may wait
        on the device without using its CPU: the wall time stands."""
        wall = time.perf_counter() - started[0]
        stalled = wall - (time.process_time() - started[1]) - asleep_s
        if self.device != "cpu" or stalled < STALL_S:
            return wall
        log.info("this process did not run for %.1f s while it computed a batch (stopped, suspended or "
                 "starved of CPU); not counted as computing", stalled)
        return wall - stalled

    def push_arrays(self, grads: dict) -> FlatArrays:
        """Gradients, then the model state, in one host buffer.

        The layout the server expects (``protocol.model_layout``): the push
        leaves as one frame without a further copy, and the server validates
        and applies it in place.  On a GPU it is one device-to-host transfer.
        """
        packed = FlatArrays.pack({**grads, **self.model.state}, dtype=self.model.dtype)
        return FlatArrays(packed.specs, backend.to_numpy(packed.flat))

    def loop(self) -> int:
        """Work until the server says stop.  Returns the exit status.

        Raises TooManyFailures after too many failed requests in a row, DroppedByServer when
        the server drops this trainer.
        """
        failures = FailureStreak(self.client.endpoint)
        self._refused_pushes = 0
        timing = _no_time()                 # since the last push: what the next one reports
        reply = None                        # None: ask for work
        push = None                         # the push that reply (or the failure) answers; None: a work request
        while True:
            try:
                if reply is None:
                    push = None
                    reply = self.client.request(P.WORK)
                    self._add_round_trip(timing, self.check_held(reply))
                if reply.type == P.STOP:
                    return self._stopped(reply)
                if reply.type == P.WAIT:
                    self._usable(failures, reply, push is not None)
                    self._sleep_on(reply, timing)
                    reply = None
                    continue
                body = self.check_task(reply)
                self._usable(failures, reply, push is not None)
                self.take_weights(reply)
                result, arrays = self.compute(body)
                push = P.Message(P.PUSH, body=self._push_body(body, result, timing), arrays=arrays)
                timing = _no_time()
                reply = None                # a refused push: ask for new work
                reply = self.client.request(P.PUSH, push.body, push.arrays)
                self._count(result)
                self._add_round_trip(timing, self.check_held(reply))
            except Rejoined as exc:
                self._failed(failures, exc, push, "asking for new work")    # a server that forgets us every time
                self._rejoined(exc.welcome, overlapped=False)
                reply = None
            except (ServerError, BadReply) as exc:
                self._failed(failures, exc, push, "asking for new work")
                reply = None

    def _add_round_trip(self, timing: dict, held: float) -> None:
        """Add the last request's round trip to ``timing``: ``held`` (the server parked it) is
        waiting, the rest communication."""
        timing["comm_s"] += max(0.0, self.client.last_rtt_s - held)
        timing["wait_s"] += held

    @staticmethod
    def _sleep_on(wait: P.Message, timing: dict) -> None:
        """Sleep as the server's ``wait`` asks; that time is waiting too."""
        delay = retry_delay(wait)
        time.sleep(delay)
        timing["wait_s"] += delay

    def _count(self, result: dict) -> None:
        """One more batch pushed (counted once the server answered its push without refusing it;
        both loops report these at the end)."""
        self.steps += 1
        self.samples += result["count"]

    def _stopped(self, reply: P.Message) -> int:
        """0: the run is over; DroppedByServer when the server dropped this trainer (the run goes on
        without it: a failed worker, said in one line, not one that finished)."""
        if reply.body.get("dropped"):
            raise DroppedByServer(f"stopped by the server: {P.one_line(reply.body['reason'])}")
        # "this trainer": "training finished after 22 steps" read as the run's count, not this worker's share
        log.info("server says %s; this trainer pushed %d %s (%d %s); exiting", P.one_line(reply.body["reason"]),
                 self.steps, for_count(self.steps, "batch", "batches"), self.samples, for_count(self.samples, "sample"))
        return 0

    @staticmethod
    def _push_body(task: dict, result: dict, timing: dict) -> dict:
        return {"epoch": task["epoch"], "batch": task["batch"], "lease": task["lease"],
                "base_version": task["version"], "loss": _finite_or_none(result["loss"]),
                "correct": result["correct"], "count": result["count"],
                "timing": {"compute_s": result["compute_s"], **timing}}

    def loop_overlapped(self) -> int:
        """:meth:`loop`, but each batch is computed while the previous push travels.

        The trainer holds two leased batches: it computes one on the weights it
        has while the push of the other is in flight, then collects that push's
        answer (the next batch and newer weights) and sends the new push.  The
        round trip hides behind the computation; each gradient is computed on
        weights one push older, about N versions staler with N workers.  Meant
        for async mode (a sync round or an ssp clock counts one
        batch per worker).  Returns 0 when the server says stop; raises
        TooManyFailures after too many failed requests in a row, DroppedByServer
        when the server drops this trainer.
        """
        self._failures = FailureStreak(self.client.endpoint)
        self._refused_pushes = 0
        tasks: list[dict] = []              # leased, not yet computed
        pending = None                      # the push in flight
        more = True                         # False after a "wait": compute what we hold first
        timing = _no_time()                 # since the last push: what the next one reports
        while True:
            push = None                     # the push that reply (or the failure) answers; None: a work request
            try:
                if pending is None and (not tasks or len(tasks) < 2 and more):
                    reply = self._answer_or_none(self.client.request, P.WORK)     # fill the pipeline
                    more = more and reply is not None       # refused: compute what we hold before asking again
                elif tasks:
                    # Computed on the weights held now, which a second task's reply may have made
                    # newer than this task's: the push names their version (staleness counts from it).
                    task = {**tasks.pop(0), "version": self.held_version}
                    result, arrays = self.compute(task)
                    reply = None
                    if pending is not None:
                        push = pending.msg
                        reply = self._collect(pending, timing)
                        if reply is not None and reply.type == P.STOP:    # over: no push for this batch
                            return self._stopped(reply)
                    pending = self.client.submit(P.PUSH, self._push_body(task, result, timing), arrays)
                    timing = _no_time()
                else:                                             # nothing to compute: wait for the push
                    push = pending.msg
                    reply, pending = self._collect(pending, timing), None
                if reply is None:
                    continue
                if reply.type == P.STOP:                          # a push still in flight is moot
                    return self._stopped(reply)
                try:
                    held = self.check_held(reply)
                    if reply.type != P.WAIT:
                        tasks.append(self.check_task(reply))
                except BadReply as exc:
                    self._failed(self._failures, exc, push, "going on")
                    more = False
                    continue
                if push is None:                    # a work request's round trip (_collect timed a push's)
                    self._add_round_trip(timing, held)
                self._usable(self._failures, reply, push is not None)
                if reply.type == P.TASK:            # one without weights names the version held (check_task)
                    self.take_weights(reply)
                more = reply.type == P.TASK
                if reply.type == P.WAIT and not tasks and pending is None:
                    self._sleep_on(reply, timing)
            except Rejoined as exc:                               # the server forgot our leases
                self._failed(self._failures, exc, push, "asking for new work")
                self._rejoined(exc.welcome, overlapped=True)
                tasks, pending, more = [], None, True

    def _collect(self, pending, timing: dict) -> P.Message | None:
        """The answer to the push in flight (None if rejected); the time spent waiting for it
        is added to ``timing``'s communication."""
        waited = time.perf_counter()
        reply = self._answer_or_none(pending.result, push=pending.msg)
        timing["comm_s"] += time.perf_counter() - waited
        if reply is not None:               # answered, not refused: a step, as loop() counts them
            self._count(pending.msg.body)
        return reply

    def _answer_or_none(self, call, *args, push: P.Message | None = None) -> P.Message | None:
        """``call(*args)``, or None when the server refused it (counted in the failure streak;
        ``push``: the push it answers, see :meth:`_failed`)."""
        try:
            return call(*args)
        except ServerError as exc:
            self._failed(self._failures, exc, push, "going on")
            return None


def run_trainer(endpoint: str, name: str | None = None, device: str = "cpu", mnist_dir: str | None = None,
                give_up_after: float = 600.0, compute_ms: float | None = None, overlap: bool = False,
                keys: str | None = None, check_memory: bool = True) -> int:
    """``keys``: the folder of this client's CURVE keys (:mod:`pscnn.curve`), for a server that requires them.
    ``check_memory``: False (``--no-memory-check``) trains on a batch whose step's estimate exceeds
    this machine's memory (:func:`~cnn_core.memory.check_memory_fits`)."""
    client_keys = curve.client_keys(keys) if keys else None     # a bad key file: one line, before the data loads
    check_local_setup(device, mnist_dir, None if compute_ms is not None else "train")
    client = Client(endpoint, "trainer", name=name, device=device, give_up_after=give_up_after, keys=client_keys)
    try:
        raise_lost_stop("worker")
        welcome = client.connect()
        log.info("joined %s as %s", endpoint, client.wid)
        trainer = Trainer(client, device=device, mnist_dir=mnist_dir, compute_ms=compute_ms, overlap=overlap,
                          check_memory=check_memory)
        trainer.setup(welcome)
        raise_lost_stop("worker")
        return trainer.work()
    except ServerUnreachable as exc:
        return exit_status_unreachable(client, exc, log)
    except (SystemExit, KeyboardInterrupt) as exc:   # leave politely: our lease is requeued at once
        return leave_on_signal(client, exc)
    except DroppedByServer:                     # no goodbye: the server has dropped us already
        raise
    except PscnnError:                          # refused, or a server we cannot use: the CLI prints one line
        client.close(say_bye=client.welcome is not None, reason="error")    # (bounded) our leases go back at once
        raise
    finally:
        client.close()


def leave_on_signal(client: Client, exc: BaseException) -> int:
    """The end of a worker stopped by a signal (``exc``): goodbye to the server, one line; 0 for
    SIGTERM/SIGHUP (SystemExit: see pscnn.cli.stop_on_signals), so the server requeues its lease at
    once instead of after --peer-timeout, and Ctrl-C (KeyboardInterrupt) raised on, for the CLI's
    "interrupted" (130)."""
    stopped_by = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else "a signal"
    joined = client.welcome is not None         # else there is no one to say goodbye to
    # A stop that came as a socket was being made (pyzmq's Context.socket, a monitor's) left it held by
    # a frame of this traceback, open, and close()'s ctx.term() waited for it for good: a worker stopped
    # 0.5 s in hung till a SIGKILL.  Those frames' variables cleared, the socket goes (pyzmq closes it).
    traceback.clear_frames(exc.__traceback__)
    log.info("stopped by %s; %s", stopped_by,
             "saying goodbye to the server" if joined else "the server had not answered our hello yet")
    client.close(say_bye=joined, reason="interrupted" if stopped_by == "Ctrl-C" else "terminated")
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    return 0


def run_trainer_from_args(args) -> int:
    return run_trainer(args.server, name=args.name, device=args.device, mnist_dir=args.mnist_dir,
                       give_up_after=args.give_up_after, compute_ms=args.compute_ms, overlap=args.overlap,
                       keys=args.keys, check_memory=not args.no_memory_check)
