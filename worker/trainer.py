"""A trainer worker: lease a batch, compute its gradient, push it, repeat.

One round trip per step: the push carries the gradient (and BatchNorm
statistics) and its reply carries the next task, plus the weights when the
server has newer ones.  The worker computes a batch's indices itself from
(seed, epoch, batch) with ``cnn_core.data.batch_index`` (the seeded per-epoch
permutation whose batches the server leases out by number), so a task is
three integers.  Its dropout masks are seeded from the
same triple (``Model.reseed``): a batch's gradient is a function of the
weights and the batch, whichever worker computes it.

Each push reports the batch's compute time and the previous round trip split
into communication (``rtt - held``) and waiting (``held``: time the server
parked the request at a sync barrier or an SSP bound).

With ``--overlap`` (async) a trainer holds two leases and computes one batch
while the push of the other travels (:meth:`Trainer.loop_overlapped`).
"""
from __future__ import annotations

import logging
import math
import signal
import time

from cnn_core import backend
from cnn_core.data import batch_index, batch_length, load_mnist
from cnn_core.flat import FlatArrays
from cnn_core.losses import softmax_cross_entropy
from cnn_core.model import build_model
from pscnn import protocol as P

from .client import Client, Rejoined, ServerError, ServerUnreachable, exit_status_unreachable

log = logging.getLogger("pscnn.worker")


def _finite_or_none(loss) -> float | None:
    """The push's loss: None for NaN or Inf, which the server rejects (and counts towards divergence)."""
    loss = float(loss)
    return loss if math.isfinite(loss) else None


class Trainer:
    def __init__(self, client: Client, device: str = "cpu", mnist_dir: str | None = None,
                 compute_ms: float | None = None):
        self.client = client
        self.device = device
        self.mnist_dir = mnist_dir
        self.compute_ms = compute_ms
        self.model = None
        self.run: dict = {}
        self.data = None
        self._epoch_batches: tuple[int, list] | None = None
        self._zero_push: FlatArrays | None = None      # synthetic mode: built once, sent every step
        self.steps = 0
        self.samples = 0

    def setup(self, welcome: P.Message) -> None:
        """Build the model from the server's spec and load this run's training data."""
        run = welcome.body["run"]
        if self.model is None or welcome.body["model"] != self.model.spec:
            self.model = build_model(welcome.body["model"], seed=run["seed"], device=self.device)
            self._zero_push = None
        if self.data is None and self.compute_ms is None:
            x, y = load_mnist("train", mnist_dir=self.mnist_dir, limit=run["num_samples"])
            self.data = (self.model.xp.asarray(x), self.model.xp.asarray(y))
        self.run = run

    def batch(self, epoch: int, batch: int):
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            n, bs = self.run["num_samples"], self.run["batch_size"]
            self._epoch_batches = (epoch, batch_index(n, bs, self.run["seed"], epoch))
        idx = self._epoch_batches[1][batch]
        x, y = self.data
        return x[idx], y[idx]

    def compute(self, body: dict) -> tuple[dict, dict]:
        """Gradient of one leased batch -> (push body fields, arrays)."""
        t0 = time.perf_counter()
        if self.compute_ms is not None:            # synthetic: a fixed compute time, zero gradients
            time.sleep(self.compute_ms / 1000)
            count = batch_length(self.run["num_samples"], self.run["batch_size"], body["batch"])
            if self._zero_push is None:             # read-only: sent without a copy, never changed
                self._zero_push = self.push_arrays({k: self.model.xp.zeros_like(v)
                                                    for k, v in self.model.params.items()})
                self._zero_push.flat.flags.writeable = False
            return ({"loss": 0.0, "correct": 0, "count": count, "compute_s": time.perf_counter() - t0},
                    self._zero_push)
        xb, yb = self.batch(body["epoch"], body["batch"])
        self.model.reseed((self.run["seed"], body["epoch"], body["batch"]))    # the batch's own dropout masks
        logits = self.model.forward(xb, train=True)
        loss, dlogits = softmax_cross_entropy(logits, yb)
        grads = self.model.backward(dlogits)
        correct = int((logits.argmax(axis=1) == yb).sum())
        return {"loss": loss, "correct": correct, "count": int(len(yb)),
                "compute_s": time.perf_counter() - t0}, self.push_arrays(grads)

    def push_arrays(self, grads: dict) -> FlatArrays:
        """Gradients, then the model state, in one host buffer.

        The layout the server expects (``protocol.model_layout``): the push
        leaves as one frame without a further copy, and the server validates
        and applies it in place.  On a GPU it is one device-to-host transfer.
        """
        packed = FlatArrays.pack({**grads, **self.model.state}, dtype=self.model.dtype)
        return FlatArrays(packed.specs, backend.to_numpy(packed.flat))

    def loop(self) -> int:
        """Work until the server says stop.  Returns the exit status."""
        reply = self.client.request(P.WORK)
        timing = {"comm_s": 0.0, "wait_s": 0.0}
        while True:
            try:
                if reply.type == P.STOP:
                    return self._stopped(reply)
                if reply.type == P.WAIT:
                    time.sleep(reply.body["retry_s"])
                    reply = self.client.request(P.WORK)
                    continue
                if reply.type != P.TASK:
                    log.warning("unexpected %s reply; asking for work", reply.type)
                    reply = self.client.request(P.WORK)
                    continue
                body = reply.body
                if reply.arrays:
                    self.model.assign(reply.arrays)
                result, arrays = self.compute(body)
                reply = self.client.request(P.PUSH, self._push_body(body, result, timing), arrays)
                held = float(reply.body.get("held_s", 0.0))
                timing = {"comm_s": max(0.0, self.client.last_rtt_s - held), "wait_s": held}
                self._count(result)
            except Rejoined as exc:
                self.setup(exc.welcome)
                reply = self.client.request(P.WORK)
            except ServerError as exc:
                log.warning("server rejected our request: %s; asking for new work", exc)
                reply = self.client.request(P.WORK)

    def _count(self, result: dict) -> None:
        """One more batch pushed (counted when sent; both loops report these at the end)."""
        self.steps += 1
        self.samples += result["count"]

    def _stopped(self, reply: P.Message) -> int:
        log.info("server says %s after %d steps (%d samples); exiting",
                 reply.body["reason"], self.steps, self.samples)
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
        round trip hides behind the computation; each gradient is one version
        staler.  Meant for async mode (a sync round or an ssp clock counts one
        batch per worker).  Returns 0 when the server says stop.
        """
        tasks: list[dict] = []              # leased, not yet computed
        pending = None                      # the push in flight
        more = True                         # False after a "wait": compute what we hold first
        timing = {"comm_s": 0.0, "wait_s": 0.0}
        while True:
            try:
                if pending is None and (not tasks or len(tasks) < 2 and more):
                    reply = self._answer_or_none(self.client.request, P.WORK)     # fill the pipeline
                elif tasks:
                    task = tasks.pop(0)
                    result, arrays = self.compute(task)
                    reply = None
                    if pending is not None:
                        reply, timing = self._collect(pending)
                    pending = self.client.submit(P.PUSH, self._push_body(task, result, timing), arrays)
                    self._count(result)
                else:                                             # nothing to compute: wait for the push
                    (reply, timing), pending = self._collect(pending), None
                if reply is None:
                    continue
                if reply.type == P.STOP:                          # a push still in flight is moot
                    return self._stopped(reply)
                if reply.arrays:
                    self.model.assign(reply.arrays)
                more = reply.type == P.TASK
                if reply.type == P.TASK:
                    tasks.append(reply.body)
                elif reply.type == P.WAIT and not tasks and pending is None:
                    time.sleep(reply.body["retry_s"])
            except Rejoined as exc:                               # the server forgot our leases
                self.setup(exc.welcome)
                tasks, pending, more = [], None, True

    def _collect(self, pending) -> tuple[P.Message | None, dict]:
        """The answer to the push in flight (None if rejected), and the time spent waiting for it."""
        waited = time.perf_counter()
        reply = self._answer_or_none(pending.result)
        return reply, {"comm_s": time.perf_counter() - waited, "wait_s": 0.0}

    @staticmethod
    def _answer_or_none(call, *args) -> P.Message | None:
        try:
            return call(*args)
        except ServerError as exc:
            log.warning("server rejected our request: %s; going on", exc)
            return None


def run_trainer(endpoint: str, name: str | None = None, device: str = "cpu", mnist_dir: str | None = None,
                give_up_after: float = 600.0, compute_ms: float | None = None, overlap: bool = False) -> int:
    client = Client(endpoint, "trainer", name=name, device=device, give_up_after=give_up_after)
    _exit_on_sigterm()
    try:
        welcome = client.connect()
        log.info("joined %s as %s", endpoint, client.wid)
        trainer = Trainer(client, device=device, mnist_dir=mnist_dir, compute_ms=compute_ms)
        trainer.setup(welcome)
        overlapped = overlap and trainer.run.get("mode") == "async"
        if overlap and not overlapped:
            log.warning("--overlap applies to async mode only; the server runs %s", trainer.run.get("mode"))
        status = trainer.loop_overlapped() if overlapped else trainer.loop()
        client.close()
        return status
    except ServerUnreachable as exc:
        return exit_status_unreachable(client, exc, log)
    except SystemExit:                          # SIGTERM: leave politely so our lease is requeued at once
        client.close(say_bye=True, reason="terminated")
        return 0


def _exit_on_sigterm() -> None:
    def on_term(signum, frame):
        raise SystemExit(0)
    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:                          # not the main thread (tests)
        pass


def run_trainer_from_args(args) -> int:
    return run_trainer(args.server, name=args.name, device=args.device, mnist_dir=args.mnist_dir,
                       give_up_after=args.give_up_after, compute_ms=args.compute_ms, overlap=args.overlap)
