"""The evaluator: every T seconds, pull the newest weights and score the test set.

It runs in its own process at a lower CPU priority (nice +10), asks the
server only for weights it has not seen, and sends each result as a small
``eval_report`` that the server logs and keeps (the final one is the run's
test result), so it never slows the trainers.
When the server says training is over, it scores the final weights, reports
them as final, says goodbye and exits 0.
"""
from __future__ import annotations

import logging
import os
import time

from cnn_core.data import load_mnist
from cnn_core.metrics import evaluate
from cnn_core.model import build_model
from pscnn import protocol as P

from .client import Client, Rejoined, ServerError, ServerUnreachable, exit_status_unreachable
from .trainer import _exit_on_sigterm

log = logging.getLogger("pscnn.evaluator")


def run_evaluator(endpoint: str, every: float = 10.0, test_limit: int = 0, device: str = "cpu",
                  mnist_dir: str | None = None, name: str | None = None, give_up_after: float = 600.0,
                  nice: int = 10) -> int:
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    client = Client(endpoint, "evaluator", name=name, device=device, give_up_after=give_up_after)
    _exit_on_sigterm()
    try:
        welcome = client.connect()
        model = build_model(welcome.body["model"], device=device)
        limit = test_limit or welcome.body["run"].get("test_limit") or None
        x, y = load_mnist("test", mnist_dir=mnist_dir, limit=limit)
        log.info("joined %s; scoring %d test images every %g s", endpoint, len(y), every)
        have = -1
        scored = -1
        while True:
            try:
                reply = client.request(P.PULL, {"have_version": have})
            except Rejoined as exc:
                model = build_model(exc.welcome.body["model"], device=device)
                have = scored = -1
                continue
            if reply.arrays:
                model.assign(reply.arrays)
                have = reply.body["version"]
            done = reply.body["done"]
            if have >= 0 and (have != scored or done):
                t = time.perf_counter()
                m = evaluate(model, x, y)
                metrics = {"test_accuracy": m["accuracy"], "test_loss": m["loss"],
                           "per_class_accuracy": m["per_class_accuracy"], "confusion_matrix": m["confusion_matrix"],
                           "precision": m["precision"], "recall": m["recall"], "count": m["count"],
                           "eval_seconds": time.perf_counter() - t}
                try:
                    client.request(P.EVAL_REPORT, {"version": have, "final": done, "metrics": metrics})
                except ServerError as exc:
                    log.warning("server rejected our report: %s", exc)
                except Rejoined:
                    continue
                scored = have
                log.info("version %d: test accuracy %.4f, loss %.4f (%.1f s)%s", have, m["accuracy"], m["loss"],
                         metrics["eval_seconds"], " final" if done else "")
            if done:
                client.close(say_bye=True, reason="final evaluation sent")
                return 0
            client.server_done.wait(every)      # wakes early when a heartbeat says training is over
    except ServerUnreachable as exc:
        return exit_status_unreachable(client, exc, log)
    except SystemExit:
        client.close(say_bye=True, reason="terminated")
        return 0


def run_evaluator_from_args(args) -> int:
    return run_evaluator(args.server, every=args.every, test_limit=args.test_limit, device=args.device,
                         mnist_dir=args.mnist_dir, name=args.name, give_up_after=args.give_up_after)
