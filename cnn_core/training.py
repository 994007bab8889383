"""Single-process training: ``pscnn train``, the baseline the parameter server is measured against.

:func:`train` runs mini-batch training on MNIST and writes a run folder
(:mod:`cnn_core.runlog`)::

    config.json          the resolved configuration (optimizer defaults and
                         "auto" schedule lengths filled in)
    metrics.jsonl        "start"; "step" every ``log_every`` updates, at the
                         end of each epoch and before a divergence; "epoch"
                         after each test evaluation
    model.npz            final weights and optimizer state (load_model_checkpoint)
    summary.json         final test metrics, throughput, configuration; "status"
                         is "complete", "diverged" with the reason in "error", or
                         "interrupted" (Ctrl-C, SIGTERM, SIGHUP)
    learning_curves.png, confusion_matrix.png   when matplotlib is installed

Epochs are numbered from 1 in records and messages; the shuffling of epoch
``e`` is :func:`cnn_core.data.batch_index` with ``epoch = e - 1``, the same
order the parameter server hands out, so both runs see the same batches.

A run diverges when a training loss is NaN or infinite, when an update makes
the weights non-finite, or when the weights, still finite, make the test loss
non-finite: it stops there, model.npz keeps the last finite weights (without
optimizer state: that took the diverging step), summary.json says
``"status": "diverged"`` and why, and :class:`DivergenceError` is raised
(``pscnn train`` exits 1 with that one line), as the parameter server does.
A rate that kills the network without a NaN (the loss in the thousands, then
stuck) is only warned about: an epoch whose mean training loss is over
:data:`BLOWN_UP_LOSS` gets a warning naming the setting to lower.

A run interrupted (KeyboardInterrupt: Ctrl-C, or SIGTERM or SIGHUP under
``pscnn train``) writes an "interrupted" record, model.npz with the weights of
the last update applied (and the optimizer state, unless the interrupt came
during the optimizer's step) and summary.json saying ``"status": "interrupted"``,
then raises KeyboardInterrupt again: training so far is not lost, and no file
of an earlier run in the folder passes for this one's.

model.npz and summary.json that cannot be written (a full disk, a read-only
folder) are tried again, then written to a new folder in the temporary directory,
which the error (:class:`~cnn_core.runlog.RunLogError`, one line) names: the
trained weights are not lost with it.

Throughput is measured over the training loop only (``train_seconds``):
data loading, test evaluation, checkpointing and plotting are excluded, so
``train_images_per_second`` compares directly with the workers' rate.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .checkpoint import save_model_checkpoint
from .config import is_integer, is_number
from .data import (MNIST_FILES, NUM_CLASSES, batch_length, batches_per_epoch, iterate_batches, load_mnist,
                   training_set_size)
from .errors import ConfigError, PscnnError, ShapeError, SpecError
from .flat import all_finite
from .memory import check_memory_fits
from .metrics import evaluate
from .model import build_model
from .optim import build_optimizer
from .runlog import (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, RunLogError, RunWriter, make_plots, new_run_id,
                     to_jsonable)
from .text import for_count

__all__ = ["train", "train_from_args", "default_config", "resolve_config", "format_report", "DivergenceError",
           "check_model_fits_mnist"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.npz"
EVAL_BATCH = 1000            # test images per forward pass: big enough to amortize, small in memory
# An epoch's mean training loss above this (twice a uniform guess's, ln 10) is warned about: a
# learning rate far too high kills the network without a NaN, the loss in the thousands for a while.
BLOWN_UP_LOSS = 2 * math.log(NUM_CLASSES)
# model.npz and summary.json are each tried this often, this far apart (a full disk may get room),
# before they go to a folder in the temporary directory instead (_write_results).
RESULT_WRITE_TRIES = 3
RESULT_WRITE_RETRY_S = 5.0
_INT_KEYS = {"seed": 0, "batch_size": 1, "epochs": 1, "train_limit": 0, "test_limit": 0, "log_every": 1}


class DivergenceError(PscnnError):
    """The loss or the weights became NaN or infinite: the run cannot recover, so it stops.

    ``summary``: what summary.json holds for the stopped run (``"status": "diverged"``),
    or None when raised before the run folder was finished.
    """

    summary: dict | None = None


# --------------------------------------------------------------------------- configuration
def default_config() -> dict:
    """The configuration ``pscnn train`` uses with no flags.

    Derived from the CLI parser itself, so the library and the command can
    never disagree about a default.  ``threads`` is only recorded (BLAS
    threads must be set before NumPy is imported, which the CLI does).
    """
    from pscnn.cli import build_parser  # noqa: PLC0415  (argparse only, cheap)

    return config_from_args(build_parser().parse_args(["train"]), threads=None)


def config_from_args(args, threads: int | None) -> dict:
    """The :func:`train` config from parsed ``pscnn train`` flags."""
    from pscnn.cli import optimizer_config  # noqa: PLC0415

    return {
        "model": args.model,
        "seed": args.seed,
        "optimizer": optimizer_config(args),
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
        "mnist_dir": args.mnist_dir,
        "device": args.device,
        "out": args.out,
        "log_every": args.log_every,
        "threads": threads,
    }


def resolve_config(config: dict) -> dict:
    """``config`` over :func:`default_config`, checked; ConfigError for a bad or unknown key.

    Only the plain values are checked here; the model spec and the optimizer
    config are checked by whatever builds them (SpecError / ConfigError).
    """
    if not isinstance(config, dict):
        raise ConfigError(f"training config must be a dict, got {type(config).__name__}")
    cfg = default_config()
    unknown = sorted(set(config) - set(cfg))
    if unknown:
        raise ConfigError(f"training config: unknown key(s) {unknown}; valid: {sorted(cfg)}")
    cfg.update(config)
    for key, lowest in _INT_KEYS.items():
        value = cfg[key]
        if not is_integer(value) or value < lowest:
            raise ConfigError(f"training config: {key} must be an integer >= {lowest}, got {value!r}")
        cfg[key] = int(value)
    if not isinstance(cfg["model"], (str, dict)):
        raise ConfigError(f"training config: model must be a preset name, JSON text or dict, "
                          f"got {type(cfg['model']).__name__}")
    if not isinstance(cfg["optimizer"], dict):
        raise ConfigError(f"training config: optimizer must be a dict, got {type(cfg['optimizer']).__name__}")
    if cfg["device"] not in ("cpu", "gpu"):
        raise ConfigError(f"training config: device must be 'cpu' or 'gpu', got {cfg['device']!r}")
    if not isinstance(cfg["out"], (str, os.PathLike)) or not os.fspath(cfg["out"]):
        raise ConfigError(f"training config: out must be a folder path, got {cfg['out']!r}")
    cfg["out"] = os.fspath(cfg["out"])
    if cfg["mnist_dir"] is not None:
        cfg["mnist_dir"] = os.fspath(cfg["mnist_dir"])
    return cfg


# --------------------------------------------------------------------------- training
class _Progress:
    """Counters of the whole run and the window since the last "step" record."""

    def __init__(self):
        self.step = 0                 # updates applied
        self.samples = 0              # training images consumed
        self.train_seconds = 0.0      # inside the training loop only
        self.eval_seconds = 0.0
        self.lr = None                # of the last update applied
        self.reset_window()

    def reset_window(self) -> None:
        self.window_loss = 0.0
        self.window_samples = 0
        self.window_start = time.perf_counter()


def _sync(xp) -> None:
    """Wait for queued GPU work, so that a clock read after it measures finished computation."""
    if xp is not np:
        xp.cuda.Device().synchronize()


def train(config: dict, progress: bool = True, check_memory: bool = True) -> dict:
    """Train a model on MNIST as ``config`` says; write the run folder; return the summary.

    ``config`` keys (missing ones take :func:`default_config`'s values):
    ``model`` (preset, JSON spec or dict), ``seed``, ``optimizer`` (a
    :func:`pscnn.cli.optimizer_config` dict; ``"auto"`` schedule lengths are
    resolved from ``epochs`` x batches per epoch), ``batch_size``, ``epochs``,
    ``train_limit`` / ``test_limit`` (first N images, 0 = all), ``mnist_dir``,
    ``device`` ("cpu"/"gpu"), ``out`` (run folder), ``log_every`` (updates
    between "step" records), ``threads`` (recorded only).

    ``progress`` shows a tqdm bar per epoch (and per MNIST file downloaded)
    when stderr is a terminal; without a bar, each "step" record is also
    logged at INFO level, so container logs still show the run advancing.
    ``check_memory``: refuse, before the data is read, a batch whose step would not fit this
    machine's memory by its estimate (:func:`~cnn_core.memory.check_memory_fits`); False is
    ``--no-memory-check``.

    Returns the summary exactly as written to summary.json (plain JSON types).

    Raises a :class:`~cnn_core.errors.PscnnError` subclass for bad input
    (config, spec, a model whose output width is not MNIST's 10 classes,
    missing or corrupt data, an unwritable run folder) and
    :class:`DivergenceError` when the loss or the weights stop being finite,
    after writing the diverged run's model.npz and summary.json (see the
    module docs); KeyboardInterrupt again after writing an interrupted one's.
    Nothing is written before the model is built and the data is loaded, so
    bad input leaves no half-made run folder behind.
    """
    wall_start = time.perf_counter()
    cfg = resolve_config(config)
    # Build the model before reading 47 MB of data: a bad spec or a missing GPU fails at once.
    model = build_model(cfg["model"], seed=cfg["seed"], device=cfg["device"])
    check_model_fits_mnist(model)
    # The run's length is known before the data is read (load_mnist refuses a file of another
    # count): a bad optimizer flag failed only after the 47 MB were read (or downloaded).
    num_train = training_set_size(cfg["train_limit"])
    check_batches_fit(model, num_train, cfg["batch_size"])
    planned_updates = cfg["epochs"] * batches_per_epoch(num_train, cfg["batch_size"])   # as iterate_batches
    optimizer = _build_optimizer(cfg["optimizer"], planned_updates)
    if check_memory:                    # --no-memory-check: for an estimate that refuses a batch which fits
        # the optimizer's slots too (Adam's two moments: twice the weights), which live here
        check_memory_fits(model, min(cfg["batch_size"], num_train), f"--batch-size {cfg['batch_size']}",
                          optimizer_slots=len(optimizer.slots()))
    cfg["optimizer"] = optimizer.config()    # every hyperparameter, defaults and schedule lengths filled in
    x_train, y_train = load_mnist("train", cfg["mnist_dir"], limit=cfg["train_limit"] or None, progress=progress)
    x_test, y_test = load_mnist("test", cfg["mnist_dir"], limit=cfg["test_limit"] or None, progress=progress)

    out_dir = Path(cfg["out"])
    writer = RunWriter(out_dir, cfg)
    log.info("%s model (%s parameters) on %s; %s training %s x %d %s = %d %s of %d; %s test %s; run folder %s",
             _model_name(cfg["model"]), f"{model.num_parameters():,}", cfg["device"], f"{len(x_train):,}",
             for_count(len(x_train), "image"), cfg["epochs"], for_count(cfg["epochs"], "epoch"), planned_updates,
             for_count(planned_updates, "update"), effective_batch_size(cfg["batch_size"], num_train),
             f"{len(x_test):,}", for_count(len(x_test), "image"), out_dir)
    # A run id as a server's start records carry: a distributed run's checkpoint.npz left in this folder is
    # then refused by a later `--resume` here (it took it for the folder's run, and overwrote these results).
    writer.log("start", run_id=new_run_id(), model=_model_name(cfg["model"]), parameters=model.num_parameters(),
               train_samples=len(x_train), test_samples=len(x_test),
               batch_size=effective_batch_size(cfg["batch_size"], num_train),
               epochs=cfg["epochs"], planned_updates=planned_updates, device=cfg["device"])

    # On a GPU the test set is copied over once, not at every evaluation (a no-op on the CPU).
    x_test_dev = model.xp.asarray(x_test)
    prog = _Progress()
    last_good = _LastGood(model)
    result = last = None
    diverged = interrupted = None
    optimizer_midway = False    # interrupted during the optimizer's step: its state is not kept
    unwritten = None        # RunLogError: the results went elsewhere (or nowhere), said in it
    epoch = 0
    try:
        try:
            for epoch in range(1, cfg["epochs"] + 1):
                result = last = None        # a diverged epoch reports no scores of an earlier one
                epoch_stats = _train_epoch(model, optimizer, writer, x_train, y_train, cfg, epoch, prog,
                                           progress, last_good)
                eval_start = time.perf_counter()
                with np.errstate(over="ignore", invalid="ignore"):    # a non-finite loss is caught below
                    result = evaluate(model, x_test_dev, y_test, batch_size=EVAL_BATCH)
                eval_seconds = time.perf_counter() - eval_start
                prog.eval_seconds += eval_seconds
                last = writer.log("epoch", epoch=epoch, step=prog.step, **epoch_stats,
                                  test_loss=result["loss"], test_accuracy=result["accuracy"],
                                  eval_seconds=round(eval_seconds, 3))
                if not math.isfinite(result["loss"]):
                    # Finite weights so large that the logits overflow: after the last
                    # update no training loss would show it, and no later one recovers.
                    writer.log("diverged", step=prog.step, epoch=epoch, loss=None, lr=prog.lr, reason="test loss")
                    raise DivergenceError(
                        f"training diverged by update {prog.step} (epoch {epoch}): the test loss is "
                        f"{result['loss']}, the weights overflow the network; {_advice(optimizer, prog.lr)}")
                log.info("epoch %d/%d: train loss %.4f, accuracy %.2f%% | test loss %.4f, accuracy %.2f%% | "
                         "%.0f img/s", epoch, cfg["epochs"], last["train_loss"], 100 * last["train_accuracy"],
                         result["loss"], 100 * result["accuracy"], last["images_per_second"])
                if last["train_loss"] > BLOWN_UP_LOSS:
                    log.warning("epoch %d: the training loss (%.4g) is far above a uniform guess's (%.2f): "
                                "the run is likely diverging; %s", epoch, last["train_loss"],
                                math.log(NUM_CLASSES), _advice(optimizer, prog.lr))
        except DivergenceError as exc:
            diverged = exc
        except KeyboardInterrupt:
            # Weights part-way through an update go back to before it; the optimizer
            # state, which that update may have changed in part, is then not kept.
            midway = last_good.step == prog.step
            if midway:
                last_good.restore()
            # Only the optimizer's step changes its state: an interrupt while the gradient is computed
            # (most of an update's time) keeps it, as that of the weights restored.
            optimizer_midway = last_good.optimizer_at == prog.step
            interrupted = f"interrupted at update {prog.step} (epoch {epoch} of {cfg['epochs']})"
            # The updates since the last "step" record (those counted), so the curve reaches model.npz's.
            _log_window(writer, prog, model.xp, epoch, prog.lr, echo=False)
            writer.log("interrupted", step=prog.step, samples_seen=prog.samples)
        status = "diverged" if diverged else "interrupted" if interrupted else "complete"
        summary = _summary(cfg, model, prog, len(x_train), result, last, time.perf_counter() - wall_start,
                           out_dir, status, str(diverged) if diverged else interrupted)
        metrics = {"test_accuracy": summary["test_accuracy"], "test_loss": summary["test_loss"],
                   "train_loss": summary["train_loss"], "train_accuracy": summary["train_accuracy"]}
        # A diverged run keeps its last finite weights but no optimizer state: that
        # state took the diverging step, so resuming from it would diverge again.
        unwritten = _write_results(out_dir, [
            (CHECKPOINT_FILE, lambda path: save_model_checkpoint(
                path, model, None if diverged or optimizer_midway else optimizer, step=prog.step, metrics=metrics,
                extra={"config": cfg, "epochs": cfg["epochs"], "samples_seen": prog.samples,
                       "status": summary["status"]})),
            (SUMMARY_FILE, lambda path: writer.write_summary(summary, path))])
    except KeyboardInterrupt:
        # Say in the log why it ends here; the records so far stay valid.
        writer.log("interrupted", step=prog.step, samples_seen=prog.samples)
        raise
    finally:
        try:
            writer.close()
        except RunLogError as exc:
            if unwritten is None:
                raise
            log.error("%s", exc)            # where the results went instead is the line to end on
    if unwritten is not None:
        raise unwritten
    if diverged is not None or interrupted is not None:
        try:
            make_plots(out_dir)             # the curves up to the divergence help choose a learning rate
        except Exception as exc:  # noqa: BLE001  (the divergence or the interrupt is what to report)
            log.warning("plots failed: %s", exc)
    if interrupted is not None:
        log.warning("%s: %s holds the weights of that update, %s says \"interrupted\"", interrupted,
                    out_dir / CHECKPOINT_FILE, out_dir / SUMMARY_FILE)
        raise KeyboardInterrupt
    if diverged is not None:
        diverged.summary = summary
        raise diverged
    make_plots(out_dir)                     # last: it reads the files just written
    return summary                          # exactly what summary.json holds


def _write_results(out_dir: Path, writes: list) -> RunLogError | None:
    """Write a run's results into ``out_dir``: ``writes`` is [(file name, write(path))], in order
    (model.npz before summary.json, which says the run is over).  Each is tried RESULT_WRITE_TRIES
    times, RESULT_WRITE_RETRY_S apart; if one still cannot be written (a full disk, a read-only
    folder), it and those after it go to a new folder in the temporary directory.  Returns None
    once all are in ``out_dir``, else the RunLogError to raise, naming where they went (a full disk
    used to end the run with one error line, and the trained weights lost with it)."""
    for i, (name, write) in enumerate(writes):
        problem = None
        for attempt in range(RESULT_WRITE_TRIES):
            try:
                write(out_dir / name)
                problem = None
                break
            except OSError as exc:              # CheckpointError, RunLogError: one line naming the file
                problem = " ".join(str(exc).split())
                if attempt + 1 < RESULT_WRITE_TRIES:
                    log.error("%s; trying again in %.0f s", problem, RESULT_WRITE_RETRY_S)
                    time.sleep(RESULT_WRITE_RETRY_S)
        if problem is None:
            continue
        left = [n for n, _ in writes[i:]]
        failed = f"{problem} ({RESULT_WRITE_TRIES} tries)"
        elsewhere = None
        try:
            elsewhere = Path(tempfile.mkdtemp(prefix="pscnn-train-"))
            for other, write_other in writes[i:]:
                write_other(elsewhere / other)
        except OSError as exc:
            where = elsewhere or tempfile.gettempdir()
            lost = "the trained weights are lost" if CHECKPOINT_FILE in left else f"{out_dir / CHECKPOINT_FILE} " \
                                                                                 "holds the trained weights"
            return RunLogError(f"{failed}; nor could {', '.join(left)} be written to {where} instead "
                               f"({' '.join(str(exc).split())}): {lost}")
        return RunLogError(f"{failed}; {', '.join(left)} written to {elsewhere} instead")
    return None


def check_model_fits_mnist(model) -> None:
    """SpecError unless the model takes MNIST images and outputs one score per class.

    :func:`train` and the parameter server call it before any data is read:
    a mismatch is caught then, rather than at the first batch as a label range
    error of the loss or an input shape error of the model.
    """
    image = [1, *MNIST_FILES["train-images"]["item_shape"]]
    if list(model.spec["input_shape"]) != image:
        raise SpecError(f"model spec: input_shape is {model.spec['input_shape']}, but MNIST images are {image}")
    if model.num_classes != NUM_CLASSES:
        raise SpecError(f"model spec: the last layer {model.layers[-1].name!r} outputs {model.num_classes} "
                        f"values, but MNIST has {NUM_CLASSES} classes: the output width must be {NUM_CLASSES}")


def effective_batch_size(batch_size: int, num_samples: int) -> int:
    """The images an update takes, as the summary and the logs say it: no more than the training set."""
    return min(batch_size, num_samples)


def check_batches_fit(model, num_samples: int, batch_size: int) -> None:
    """ConfigError, naming the remedy, unless the model can train on every batch of an epoch of
    ``num_samples`` images in batches of ``batch_size`` (the last one may be shorter); a warning
    for a batch larger than the training set, which trains as one batch of it (:func:`effective_batch_size`).

    A BatchNorm that sees 1x1 maps cannot train on one image: with a last batch of one
    (``--train-limit 65 --batch-size 64``) :func:`train` and the distributed workers stopped
    at it, mid-epoch.  :func:`train` and the parameter server check before training starts.
    """
    first = min(batch_size, num_samples)
    try:
        model.check_training_batch(first)
    except ShapeError as exc:
        flag = f"--batch-size {batch_size}" if batch_size <= num_samples else f"--train-limit {num_samples}"
        raise ConfigError(f"{flag}: {exc}; use 2 or more") from None
    last = batch_length(num_samples, batch_size, batches_per_epoch(num_samples, batch_size) - 1)
    try:
        model.check_training_batch(last)
    except ShapeError as exc:
        other = batch_size + 1
        while num_samples % other == 1:
            other += 1
        raise ConfigError(f"{exc}: an epoch of {num_samples} training images in batches of {batch_size} ends "
                          f"with a batch of {last}; use --batch-size {other} or --train-limit {num_samples - last}"
                          ) from None
    if batch_size > num_samples:
        # Not refused (the default 64 over a smoke run's --train-limit 32 is no mistake), but said: it
        # trained silently as full-batch, its summary recording the batch asked for.
        log.warning("--batch-size %d exceeds the %s training images: every update takes all %s of them, "
                    "one batch an epoch (full-batch training)", batch_size, f"{num_samples:,}", f"{num_samples:,}")


def _summary(cfg: dict, model, prog: _Progress, train_samples: int, result: dict | None, last: dict | None,
             wall_seconds: float, out_dir: Path, status: str, error: str | None) -> dict:
    """The summary.json of a run; test and training scores are None where the run stopped before them.

    ``status``: "complete", "diverged" or "interrupted"; ``error`` says why it stopped early.
    """
    result = result or {}
    last = last or {}
    return to_jsonable({
        "status": status,
        "error": error,
        "test_accuracy": result.get("accuracy"),
        "test_loss": result.get("loss"),
        "test_samples": result.get("count"),
        "per_class_accuracy": result.get("per_class_accuracy"),
        "confusion_matrix": result.get("confusion_matrix"),
        "precision": result.get("precision"),
        "recall": result.get("recall"),
        "train_loss": last.get("train_loss"),
        "train_accuracy": last.get("train_accuracy"),
        "train_samples": train_samples,
        "epochs": cfg["epochs"],
        "updates": prog.step,
        "samples_seen": prog.samples,
        "wall_seconds": wall_seconds,
        "train_seconds": prog.train_seconds,
        "eval_seconds": prog.eval_seconds,
        "train_images_per_second": prog.samples / prog.train_seconds if prog.train_seconds > 0 else None,
        "model": cfg["model"],
        "parameters": model.num_parameters(),
        "optimizer": cfg["optimizer"],
        "batch_size": effective_batch_size(cfg["batch_size"], train_samples),   # config's: as given
        "device": cfg["device"],
        "seed": cfg["seed"],
        "threads": cfg["threads"],
        "checkpoint": CHECKPOINT_FILE,
        "out": str(out_dir.resolve()),
        "platform": _platform(model.xp),
        "config": cfg,
    })


def _build_optimizer(opt_cfg: dict, planned_updates: int):
    """The optimizer, with "auto" schedule lengths set to the run's update count."""
    from pscnn.cli import resolve_auto_schedule  # noqa: PLC0415  (argparse only; no import cycle at load)

    if opt_cfg.get("schedule") is not None:
        # Only then: resolve_auto_schedule turns a missing schedule into {},
        # which build_schedule rejects, while a missing one means constant.
        opt_cfg = resolve_auto_schedule(opt_cfg, planned_updates)
    return build_optimizer(opt_cfg)


def _non_finite_part(model) -> str | None:
    """What holds a NaN or Inf: "weights", "BatchNorm statistics", or None for neither.

    The statistics too: activations whose variance overflows still give a
    finite loss, but a model that cannot be saved or evaluated.
    """
    if not all_finite(model.params.flat):
        return "weights"
    if not all(all_finite(arr.ravel()) for arr in model.state.values()):
        return "BatchNorm statistics"
    return None


class _LastGood:
    """The weights and state (BatchNorm statistics) before the current batch, to go back to on divergence.

    One copy of the flat weight buffer per update: a small fraction of a
    forward and backward pass, and the only way to undo an in-place update.
    """

    def __init__(self, model):
        self.model = model
        self.flat = model.xp.empty_like(model.params.flat)
        self.state = {name: arr.copy() for name, arr in model.state.items()}
        self.step = None        # the update count the copy was taken at, once it is complete
        self.optimizer_at = None    # the update count when the optimizer began its step (changing its state)

    def save(self, step: int) -> None:
        """Copy the weights and state of update ``step``; until the next update is counted, ``step``
        equal to the run's says the model may be part-way through that update."""
        self.step = None
        self.flat[...] = self.model.params.flat
        for name, arr in self.model.state.items():
            self.state[name][...] = arr
        self.step = step

    def restore(self) -> None:
        self.model.params.flat[...] = self.flat
        for name, arr in self.model.state.items():
            arr[...] = self.state[name]


def _advice(optimizer, lr: float | None = None) -> str:
    """What to change after a divergence (AdamW's lr * weight_decay >= 1 is refused when it is built)."""
    lr = optimizer.current_lr() if lr is None else lr
    return f"lower the learning rate (it was {lr:g})"


def _train_epoch(model, optimizer, writer: RunWriter, x, y, cfg: dict, epoch: int, prog: _Progress,
                 progress: bool, last_good: _LastGood) -> dict:
    """One pass over ``(x, y)``; "step" records on the way; returns the epoch's training statistics.

    Raises DivergenceError, with the model back at its last finite weights,
    when a loss or an update is not finite.
    """
    from pscnn.cli import raise_lost_stop  # noqa: PLC0415  (argparse only; no import cycle at load)
    xp = model.xp
    bar = tqdm(total=len(x), desc=f"epoch {epoch}/{cfg['epochs']}", unit="img", file=sys.stderr,
               disable=None if progress else True, dynamic_ncols=True, leave=True)
    loss_sum, correct, seen = 0.0, 0, 0
    smoothed = None
    lr = optimizer.current_lr()
    prog.reset_window()                   # the window must not include the last evaluation
    start = time.perf_counter()
    try:
        for batch, (xb, yb) in enumerate(iterate_batches(x, y, cfg["batch_size"], cfg["seed"], epoch - 1)):
            # A Ctrl-C or stop signal whose KeyboardInterrupt was lost (pscnn.cli.stop_raised) as the run
            # set up: pscnn train trained to its end (1 of 25 Ctrl-Cs 0-2 s in), deaf to later stop signals
            raise_lost_stop("train")
            xb, yb = xp.asarray(xb), xp.asarray(yb)
            model.reseed((cfg["seed"], epoch - 1, batch))     # dropout masks as a pscnn trainer draws them
            last_good.save(prog.step)
            # Overflow on the way to a divergence is detected below and reported in
            # one line: NumPy's warnings would only clutter it.
            with np.errstate(over="ignore", invalid="ignore"):
                loss, logits, grads = model.loss_and_grads(xb, yb)
            if not math.isfinite(loss):
                # NaN or infinite weights never recover: stop instead of wasting the rest of the run.
                last_good.restore()       # the BatchNorm statistics this forward pass updated
                _log_window(writer, prog, xp, epoch, prog.lr, bar.disable)    # the curve up to here
                lr = optimizer.current_lr()
                writer.log("diverged", step=prog.step + 1, epoch=epoch, loss=loss, lr=lr, reason="loss")
                raise DivergenceError(f"training diverged at update {prog.step + 1} (epoch {epoch}): "
                                      f"the loss is {loss}; {_advice(optimizer, lr)}")
            # Accuracy on the batches as trained (dropout active): a cheap running
            # signal, not a substitute for the test evaluation.
            correct += int((logits.argmax(axis=1) == yb).sum())
            last_good.optimizer_at = prog.step
            with np.errstate(over="ignore", invalid="ignore"):
                lr = optimizer.step(model.params, grads)
            broken = _non_finite_part(model)
            if broken:
                # A finite loss and gradient, but a step too large for the weights
                # (or a weight decay that blows them up): keep the last finite ones.
                last_good.restore()
                _log_window(writer, prog, xp, epoch, prog.lr, bar.disable)
                writer.log("diverged", step=prog.step + 1, epoch=epoch, loss=loss, lr=lr, reason=broken)
                raise DivergenceError(f"training diverged at update {prog.step + 1} (epoch {epoch}): "
                                      f"the {broken} became non-finite (loss {loss:.4g}); model.npz keeps "
                                      f"those of update {prog.step}; {_advice(optimizer, lr)}")
            count = len(yb)
            prog.lr = lr
            prog.step += 1
            prog.samples += count
            loss_sum += loss * count
            seen += count
            prog.window_loss += loss * count
            prog.window_samples += count
            # The bar's loss is smoothed: single batches jump around too much to read.
            smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
            bar.set_postfix(loss=f"{smoothed:.4f}", refresh=False)
            bar.update(count)
            if prog.step % cfg["log_every"] == 0:
                _log_window(writer, prog, xp, epoch, lr, bar.disable)
        _log_window(writer, prog, xp, epoch, lr, bar.disable)     # the epoch's tail, so the curve covers all of it
        _sync(xp)
        seconds = max(time.perf_counter() - start, 1e-9)     # never 0 on a coarse clock
    except (DivergenceError, KeyboardInterrupt):
        prog.train_seconds += time.perf_counter() - start    # the summary's throughput counts these updates
        raise
    finally:
        bar.close()
    prog.train_seconds += seconds
    return {"train_loss": loss_sum / seen, "train_accuracy": correct / seen,
            "epoch_seconds": round(seconds, 3), "images_per_second": seen / seconds}


def _log_window(writer: RunWriter, prog: _Progress, xp, epoch: int, lr: float, echo: bool) -> None:
    """Write one "step" record for the updates since the last one, if any (and log it when ``echo``)."""
    if not prog.window_samples:
        return
    _sync(xp)
    elapsed = time.perf_counter() - prog.window_start
    loss = prog.window_loss / prog.window_samples
    ips = prog.window_samples / elapsed if elapsed > 0 else None
    writer.log("step", step=prog.step, epoch=epoch, loss=loss, lr=lr, images_per_second=ips)
    if echo:
        log.info("update %d (epoch %d): loss %.4f, lr %.4g, %s img/s", prog.step, epoch, loss, lr,
                 f"{ips:.0f}" if ips is not None else "?")
    prog.reset_window()


def _model_name(model) -> str:
    return model if isinstance(model, str) and not model.lstrip().startswith("{") else "custom"


def _platform(xp) -> dict:
    """What the throughput numbers were measured on."""
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count()}
    if xp is not np:
        info["cupy"] = xp.__version__
        try:
            info["gpu"] = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"].decode()
        except Exception:  # noqa: BLE001  (informational only)
            pass
    return info


# --------------------------------------------------------------------------- command line
def train_from_args(args) -> int:
    """``pscnn train``: the config from the parsed flags, :func:`train`, then the report on stdout."""
    config = config_from_args(args, threads=args.threads)
    summary = train(config, progress=not args.no_progress, check_memory=not args.no_memory_check)
    print(format_report(summary), flush=True)
    return 0


def classes_scored(per_class: list, confusion_matrix) -> list[bool]:
    """Whether each class of ``per_class`` had test images, by the confusion matrix's rows (true
    classes); every class when there is no matrix of that size.  A class without test images
    scores 0 (cnn_core.metrics), which is no accuracy: reports say "n/a" instead."""
    test_images = np.asarray(confusion_matrix, dtype=np.int64).sum(axis=1) if confusion_matrix else None
    return [test_images is None or len(test_images) != len(per_class) or bool(test_images[i] > 0)
            for i in range(len(per_class))]


def per_class_text(per_class: list, scored: list[bool]) -> str:
    """``0: 98.1%  1: n/a  ...``: the per-class accuracies of a report (pscnn train's, pscnn run's)."""
    return "  ".join(f"{i}: {100 * a:.1f}%" if scored[i] else f"{i}: n/a" for i, a in enumerate(per_class))


def format_report(summary: dict) -> str:
    """The human-readable end-of-run report of a summary dict (as :func:`train` returns).

    Any field may be missing or null (a diverged run has no test scores, a NaN
    loss is stored as null): it reads "n/a" and its section is left out.
    """
    get = summary.get
    lines = []
    opt = get("optimizer") or {}
    epochs = get("epochs")
    model = _model_name(get("model")) if get("model") is not None else "?"
    updates, train_samples, test_samples, seen = (get(key) for key in ("updates", "train_samples", "test_samples",
                                                                       "samples_seen"))
    lines.append(f"{model} model, {opt.get('name', '?')} lr {opt.get('lr', '?')}, "
                 f"batch {get('batch_size', '?')}, {format_number(epochs, 'd')} {for_count(epochs, 'epoch')} "
                 f"({format_number(updates, ',')} {for_count(updates, 'update')}) on "
                 f"{format_number(train_samples, ',')} training {for_count(train_samples, 'image')}, "
                 f"{get('device', '?')}")
    if get("status") == "diverged":
        lines.append(f"DIVERGED: {get('error') or 'training diverged'}")
    lines.append(f"test accuracy {format_number(get('test_accuracy'), '.2f', 100)}%, "
                 f"loss {format_number(get('test_loss'), '.4f')} "
                 f"({format_number(test_samples, ',')} test {for_count(test_samples, 'image')})")
    lines.append(f"training {format_number(get('train_images_per_second'), ',.0f')} img/s "
                 f"({format_number(seen, ',')} {for_count(seen, 'image')} in "
                 f"{format_number(get('train_seconds'), '.1f')} s; "
                 f"{format_number(get('wall_seconds'), '.1f')} s in all)")

    cm = get("confusion_matrix")
    if cm:
        cm = np.asarray(cm, dtype=np.int64)
        k = cm.shape[0]
        width = max(4, len(str(int(cm.max(initial=0)))) + 1)
        lines.append("")
        lines.append("confusion matrix (rows: true class, columns: predicted)")
        lines.append("      " + "".join(f"{j:>{width}}" for j in range(k)))
        for i in range(k):
            lines.append(f"  {i:>2}  " + "".join(f"{int(v):>{width}}" for v in cm[i]))
    per_class = get("per_class_accuracy")
    if per_class and all(is_number(a) for a in per_class):
        scored = classes_scored(per_class, get("confusion_matrix"))
        lines.append("")
        lines.append("per-class accuracy: " + per_class_text(per_class, scored))
        if any(scored):
            worst = min((i for i in range(len(per_class)) if scored[i]), key=per_class.__getitem__)
            lines.append(f"weakest class: {worst} ({100 * per_class[worst]:.1f}%)")

    if get("out"):
        out = Path(get("out"))
        present = [name for name in (CHECKPOINT_FILE, SUMMARY_FILE, METRICS_FILE, CONFIG_FILE,
                                     "learning_curves.png", "confusion_matrix.png") if (out / name).exists()]
        lines.append("")
        lines.append(f"files in {out}: {', '.join(present)}")
    return "\n".join(lines)


def format_number(value, spec: str, scale: float = 1) -> str:
    """``value * scale`` formatted with ``spec``, or "n/a" for a missing or non-finite value
    (a report's figure from a summary.json that may lack it or hold null, true or NaN)."""
    return format(value * scale if scale != 1 else value, spec) if is_number(value) else "n/a"
