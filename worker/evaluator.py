"""The evaluator: every T seconds, pull the newest weights and score the test set.

It runs in its own process at a lower CPU priority (nice +10), asks the
server only for weights it has not seen, and sends each result as a small
``eval_report`` that the server logs and keeps (the final one is the run's
test result), so it never slows the trainers.
When the server says training is over, it scores the final weights, reports
them as final, says goodbye and exits 0.  Weights the pull's answer says are
scored already (a resumed run's checkpoint version, evaluated before the
restart; once training is over, a final evaluation the run has) are not scored
again: the server would not record the report.  Nor is a version scored twice:
final weights it scored already (a diverged run's last periodic version) are
reported as final with the metrics they had.

A welcome whose model or run settings cannot be used ends it with one line; a
pull answered with an error, anything but weights, or weights the model cannot
take (a name, shape or dtype it does not have, a NaN or Inf, a negative
BatchNorm variance), a newer version without its weights, or a "done" with
nothing to score, is retried, up to ``client.MAX_FAILURES_IN_A_ROW`` in a row
(then one line, exit status 1).
A periodic report the server refuses is a warning, then one line a minute
says how many more it refused for that reason
(a server refusing each one, ``too_many_evaluations`` for a tiny ``--every``,
warned every period for the whole run); a final one it refuses ends the
evaluator with one line, exit status 1.
The pulls start every T seconds, however long the scoring between them takes
(one that takes longer than T is followed by the next pull at once: versions
are skipped, never queued).  The pull's answer says whether training is over:
a heartbeat answer that says so, or that the server does not know us (it
restarted), wakes the evaluator early, once.
"""
from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

import numpy as np

from cnn_core.data import load_mnist
from cnn_core.errors import PscnnError
from cnn_core.metrics import evaluate
from pscnn import curve
from pscnn import protocol as P
from pscnn.cli import raise_lost_stop
from pscnn.ratelog import REMINDER_WINDOW_S, RateLimitedLog

from .client import (BadReply, Client, FailureStreak, Rejoined, ServerError, ServerUnreachable,
                     exit_status_unreachable)
from .trainer import (check_local_setup, check_model_fits, check_run, check_weights,
                      leave_on_signal, model_from_welcome)

log = logging.getLogger("pscnn.evaluator")


def run_evaluator(endpoint: str, every: float = 10.0, test_limit: int = 0, device: str = "cpu",
                  mnist_dir: str | None = None, name: str | None = None, give_up_after: float = 600.0,
                  nice: int = 10, keys: str | None = None) -> int:
    """``keys``: the folder of this client's CURVE keys (:mod:`pscnn.curve`), for a server that requires them."""
    client_keys = curve.client_keys(keys) if keys else None     # a bad key file: one line, before the data loads
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    check_local_setup(device, mnist_dir, "test")
    client = Client(endpoint, "evaluator", name=name, device=device, give_up_after=give_up_after, keys=client_keys)
    refused = RateLimitedLog(log, ("refused report", "refused reports"), 1, window_s=REMINDER_WINDOW_S)
    try:
        raise_lost_stop("evaluator")
        welcome = client.connect()
        model = model_from_welcome(welcome.body["model"], device)
        test = _test_set(check_run(welcome.body["run"]), test_limit, mnist_dir)
        check_model_fits(model, test.x, test.y)
        raise_lost_stop("evaluator")
        log.info("joined %s; scoring %d test images every %g s", endpoint, len(test.y), every)
        failures = FailureStreak(endpoint)
        have = -1
        scored = -1
        scored_metrics: dict | None = None      # the report's metrics of version ``scored``, if we scored it
        while True:
            client.wake.clear()         # a heartbeat's news from now on ends the pause after this pull
            pulled_at = time.monotonic()
            try:
                reply = _weights(client.request(P.PULL, {"have_version": have}), model, have)
            except Rejoined as exc:
                failures.failed(exc, "pulling again")           # a server that forgets us every time
                model, test = _rejoined(exc.welcome, device, test_limit, mnist_dir, test)
                have, scored, scored_metrics = -1, -1, None
                continue
            except (ServerError, BadReply) as exc:
                failures.failed(exc, "pulling again")
                continue
            failures.reset()
            if reply.arrays:
                model.assign(reply.arrays)
                have = reply.body["version"]
            done = reply.body["done"]
            recorded = reply.body.get("scored", False) and reply.body["version"] == have
            not_recorded = None
            if recorded and (have != scored or done):
                # done: the server may have written the results without one (it could not score the weights)
                log.info("version %d: %s", have,
                         "the run has its final evaluation already, or its results are written; exiting without "
                         "scoring it" if done else "the server has its evaluation already; not scoring it")
                scored, scored_metrics = have, None
            elif have >= 0 and (have != scored or done):
                # The final weights scored already as a periodic version (a diverged run ends on the
                # last one it applied): the same weights and test set, so the same metrics
                metrics = scored_metrics if have == scored and scored_metrics is not None \
                    else _score(model, test)
                try:
                    answer = client.request(P.EVAL_REPORT, {"version": have, "final": done, "metrics": metrics})
                    if answer.type != P.ACK:
                        raise BadReply(f"the server answered our eval_report with {answer.type!r}, not an ack")
                    # a final report the server acknowledged but did not record (late: the run had its final
                    # evaluation already) is not the run's result, and its line must not pass for it
                    not_recorded = answer.body.get("not_recorded")
                except (ServerError, BadReply) as exc:
                    if done:                    # the run's test result: not recorded
                        raise FinalReportRefused(f"the final evaluation (version {have}) was not recorded: "
                                                 f"{exc}") from None
                    refused.log(logging.WARNING, "server rejected our report: %s", exc,
                                reason=getattr(exc, "code", "bad reply"))
                except Rejoined as exc:                          # a new server: its own model and versions
                    failures.failed(exc, "pulling again")
                    model, test = _rejoined(exc.welcome, device, test_limit, mnist_dir, test)
                    have, scored, scored_metrics = -1, -1, None
                    continue
                log.info("version %d: test accuracy %.4f, loss %.4f (%s)%s", have, metrics["test_accuracy"],
                         metrics["test_loss"], "scored already" if metrics is scored_metrics
                         else f"{metrics['eval_seconds']:.1f} s",
                         (", final" if done else "") + (f", not recorded: {not_recorded}" if not_recorded else "")
                         + ("; exiting" if done else ""))
                scored, scored_metrics = have, metrics
            refused.flush(time.monotonic())
            if done:
                client.close(say_bye=True, reason="final evaluation recorded already" if recorded
                             else "final evaluation not recorded" if not_recorded else "final evaluation sent")
                return 0
            # Every T seconds from pull to pull, the scoring included (T after it, a 10 s period with
            # a 6 s scoring was 16 s); at once after a scoring that took longer: versions are skipped,
            # never queued.  Cut short when a heartbeat says training is over (once: a pull may say
            # otherwise), or that the server does not know us: a restarted server went unnoticed for
            # up to T (with --every 600, past its final evaluation).
            client.wake.wait(max(0.0, every - (time.monotonic() - pulled_at)))
    except ServerUnreachable as exc:
        return exit_status_unreachable(client, exc, log)
    except (SystemExit, KeyboardInterrupt) as exc:
        return leave_on_signal(client, exc)
    except PscnnError:                          # refused, or a server we cannot use: the CLI prints one line
        client.close(say_bye=client.welcome is not None, reason="error")
        raise
    finally:
        refused.flush(time.monotonic(), final=True)
        client.close()


class _TestSet(NamedTuple):
    limit: int | None           # the first N test images (None: all)
    x: np.ndarray               # (N, 1, 28, 28) images
    y: np.ndarray               # (N,) labels


def _score(model, test: _TestSet) -> dict:
    """The metrics of an eval_report: ``model`` scored on the ``test`` set."""
    t = time.perf_counter()
    # Finite weights may still overflow: the report says so (a NaN or Inf loss), and
    # NumPy's warnings, a few lines each, would only clutter the log (as in pscnn train).
    with np.errstate(over="ignore", invalid="ignore"):
        m = evaluate(model, test.x, test.y)
    return {"test_accuracy": m["accuracy"], "test_loss": m["loss"],
            "per_class_accuracy": m["per_class_accuracy"], "confusion_matrix": m["confusion_matrix"],
            "precision": m["precision"], "recall": m["recall"], "count": m["count"],
            "eval_seconds": time.perf_counter() - t}


def _test_set(run: dict, test_limit: int, mnist_dir, held: _TestSet | None = None) -> _TestSet:
    """The test images to score: the first ``test_limit``, or (0) as many as the run's --test-limit;
    ``held``, the set loaded before, when it is those already."""
    limit = test_limit or run.get("test_limit") or None
    if held is not None and held.limit == limit:
        return held
    return _TestSet(limit, *load_mnist("test", mnist_dir=mnist_dir, limit=limit))


def _rejoined(welcome: P.Message, device: str, test_limit: int, mnist_dir, held: _TestSet) -> tuple:
    """(model, test set) for a new server's welcome: its model, and its run's test set (a server
    resumed with another --test-limit scores another one)."""
    test = _test_set(check_run(welcome.body["run"]), test_limit, mnist_dir, held)
    model = model_from_welcome(welcome.body["model"], device, data=(test.x, test.y))
    # the join line named the old count; the figures from now on are of this one.  By the count, not the
    # limit: --test-limit 0 and 10000 (or more) are the same 10,000 images, no change to speak of
    if len(test.y) != len(held.y):
        log.info("the server's run scores %d test images (%d before); scoring those from now on",
                 len(test.y), len(held.y))
    return model, test


class FinalReportRefused(PscnnError):
    """The server refused (or did not acknowledge) the final evaluation report."""


def _weights(reply: P.Message, model, have: int) -> P.Message:
    """A pull's answer if it is usable weights for ``model`` (``have``: the version it holds,
    -1 for none; versions never go back; an answer without weights says ``have`` is the newest),
    else BadReply."""
    if reply.type != P.WEIGHTS:
        raise BadReply(f"the server answered our pull with {reply.type!r}, not weights")
    if reply.body["version"] < 0:
        raise BadReply(f"the server sent weights of version {reply.body['version']}, below 0")
    if have < 0 and reply.body["done"] and not reply.arrays:
        raise BadReply("the server says training is over but sent no weights to score")
    if reply.body["version"] < have:        # a restarted server makes us rejoin (have: -1) first
        raise BadReply(f"the server sent weights of version {reply.body['version']}, older than the "
                       f"version {have} we hold")
    if not reply.arrays and reply.body["version"] != have:
        # Taken for "the weights you hold are the newest": told training was over, the evaluator
        # reported the version it held as the run's final evaluation
        raise BadReply(f"the server says version {reply.body['version']} is the newest, but sent no weights "
                       f"of it (we hold {f'version {have}' if have >= 0 else 'none'})")
    check_weights(model, reply.arrays)
    return reply


def run_evaluator_from_args(args) -> int:
    return run_evaluator(args.server, every=args.every, test_limit=args.test_limit, device=args.device,
                         mnist_dir=args.mnist_dir, name=args.name, give_up_after=args.give_up_after, keys=args.keys)
