"""Single-process training: ``pscnn train``, the baseline the parameter server is measured against.

:func:`train` runs mini-batch training on MNIST and writes a run folder
(:mod:`cnn_core.runlog`)::

    config.json          the resolved configuration (optimizer defaults and
                         "auto" schedule lengths filled in)
    metrics.jsonl        "start"; "step" every ``log_every`` updates and at the
                         end of each epoch; "epoch" after each test evaluation
    model.npz            final weights and optimizer state (load_model_checkpoint)
    summary.json         final test metrics, throughput, configuration
    learning_curves.png, confusion_matrix.png   when matplotlib is installed

Epochs are numbered from 1 in records and messages; the shuffling of epoch
``e`` is :func:`cnn_core.data.batch_index` with ``epoch = e - 1``, the same
order the parameter server hands out, so both runs see the same batches.

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
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .checkpoint import save_model_checkpoint
from .data import iterate_batches, load_mnist
from .errors import ConfigError, PscnnError
from .losses import softmax_cross_entropy
from .metrics import evaluate
from .model import build_model
from .optim import build_optimizer
from .runlog import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, RunWriter, make_plots, to_jsonable

__all__ = ["train", "train_from_args", "default_config", "resolve_config", "format_report", "DivergenceError"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.npz"
EVAL_BATCH = 1000            # test images per forward pass: big enough to amortize, small in memory
_INT_KEYS = {"seed": 0, "batch_size": 1, "epochs": 1, "train_limit": 0, "test_limit": 0, "log_every": 1}


class DivergenceError(PscnnError):
    """The training loss became NaN or infinite: the run cannot recover, so it stops."""


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
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
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
        self.reset_window()

    def reset_window(self) -> None:
        self.window_loss = 0.0
        self.window_samples = 0
        self.window_start = time.perf_counter()


def _sync(xp) -> None:
    """Wait for queued GPU work, so that a clock read after it measures finished computation."""
    if xp is not np:
        xp.cuda.Device().synchronize()


def train(config: dict, progress: bool = True) -> dict:
    """Train a model on MNIST as ``config`` says; write the run folder; return the summary.

    ``config`` keys (missing ones take :func:`default_config`'s values):
    ``model`` (preset, JSON spec or dict), ``seed``, ``optimizer`` (a
    :func:`pscnn.cli.optimizer_config` dict; ``"auto"`` schedule lengths are
    resolved from ``epochs`` x batches per epoch), ``batch_size``, ``epochs``,
    ``train_limit`` / ``test_limit`` (first N images, 0 = all), ``mnist_dir``,
    ``device`` ("cpu"/"gpu"), ``out`` (run folder), ``log_every`` (updates
    between "step" records), ``threads`` (recorded only).

    ``progress`` shows a tqdm bar per epoch when stderr is a terminal; without
    a bar, each "step" record is also logged at INFO level, so container logs
    still show the run advancing.

    Returns the summary exactly as written to summary.json (plain JSON types).

    Raises a :class:`~cnn_core.errors.PscnnError` subclass for bad input
    (config, spec, missing or corrupt data, an unwritable run folder) and
    :class:`DivergenceError` when the loss stops being finite.  Nothing is
    written before the model is built and the data is loaded, so such errors
    leave no half-made run folder behind.
    """
    wall_start = time.perf_counter()
    cfg = resolve_config(config)
    # Build the model before reading 47 MB of data: a bad spec or a missing GPU fails at once.
    model = build_model(cfg["model"], seed=cfg["seed"], device=cfg["device"])
    x_train, y_train = load_mnist("train", cfg["mnist_dir"], limit=cfg["train_limit"] or None)
    x_test, y_test = load_mnist("test", cfg["mnist_dir"], limit=cfg["test_limit"] or None)
    # iterate_batches keeps the short last batch, hence ceil.
    planned_updates = cfg["epochs"] * math.ceil(len(x_train) / cfg["batch_size"])
    optimizer = _build_optimizer(cfg["optimizer"], planned_updates)
    cfg["optimizer"] = optimizer.config()    # every hyperparameter, defaults and schedule lengths filled in

    out_dir = Path(cfg["out"])
    writer = RunWriter(out_dir, cfg)
    log.info("%s model (%s parameters) on %s; %s training images x %d epoch%s = %d updates of %d; "
             "%s test images; run folder %s", _model_name(cfg["model"]), f"{model.num_parameters():,}",
             cfg["device"], f"{len(x_train):,}", cfg["epochs"], "" if cfg["epochs"] == 1 else "s",
             planned_updates, cfg["batch_size"], f"{len(x_test):,}", out_dir)
    writer.log("start", model=_model_name(cfg["model"]), parameters=model.num_parameters(),
               train_samples=len(x_train), test_samples=len(x_test), batch_size=cfg["batch_size"],
               epochs=cfg["epochs"], planned_updates=planned_updates, device=cfg["device"])

    # On a GPU the test set is copied over once, not at every evaluation (a no-op on the CPU).
    x_test_dev = model.xp.asarray(x_test)
    prog = _Progress()
    try:
        for epoch in range(1, cfg["epochs"] + 1):
            epoch_stats = _train_epoch(model, optimizer, writer, x_train, y_train, cfg, epoch, prog, progress)
            eval_start = time.perf_counter()
            result = evaluate(model, x_test_dev, y_test, batch_size=EVAL_BATCH)
            eval_seconds = time.perf_counter() - eval_start
            prog.eval_seconds += eval_seconds
            last = writer.log("epoch", epoch=epoch, step=prog.step, **epoch_stats,
                              test_loss=result["loss"], test_accuracy=result["accuracy"],
                              eval_seconds=round(eval_seconds, 3))
            log.info("epoch %d/%d: train loss %.4f, accuracy %.2f%% | test loss %.4f, accuracy %.2f%% | "
                     "%.0f img/s", epoch, cfg["epochs"], last["train_loss"], 100 * last["train_accuracy"],
                     result["loss"], 100 * result["accuracy"], last["images_per_second"])

        metrics = {"test_accuracy": result["accuracy"], "test_loss": result["loss"],
                   "train_loss": last["train_loss"], "train_accuracy": last["train_accuracy"]}
        save_model_checkpoint(out_dir / CHECKPOINT_FILE, model, optimizer, step=prog.step, metrics=metrics,
                              extra={"config": cfg, "epochs": cfg["epochs"], "samples_seen": prog.samples})
        summary = to_jsonable({
            "test_accuracy": result["accuracy"],
            "test_loss": result["loss"],
            "test_samples": result["count"],
            "per_class_accuracy": result["per_class_accuracy"],
            "confusion_matrix": result["confusion_matrix"],
            "precision": result["precision"],
            "recall": result["recall"],
            "train_loss": last["train_loss"],
            "train_accuracy": last["train_accuracy"],
            "train_samples": len(x_train),
            "epochs": cfg["epochs"],
            "updates": prog.step,
            "samples_seen": prog.samples,
            "wall_seconds": time.perf_counter() - wall_start,
            "train_seconds": prog.train_seconds,
            "eval_seconds": prog.eval_seconds,
            "train_images_per_second": prog.samples / prog.train_seconds,
            "model": cfg["model"],
            "parameters": model.num_parameters(),
            "optimizer": cfg["optimizer"],
            "batch_size": cfg["batch_size"],
            "device": cfg["device"],
            "seed": cfg["seed"],
            "threads": cfg["threads"],
            "checkpoint": CHECKPOINT_FILE,
            "out": str(out_dir.resolve()),
            "platform": _platform(model.xp),
            "config": cfg,
        })
        writer.write_summary(summary)
    except KeyboardInterrupt:
        # Say in the log why it ends here; the records so far stay valid.
        writer.log("interrupted", step=prog.step, samples_seen=prog.samples)
        raise
    finally:
        writer.close()
    make_plots(out_dir)                     # last: it reads the files just written
    return summary                          # exactly what summary.json holds


def _build_optimizer(opt_cfg: dict, planned_updates: int):
    """The optimizer, with "auto" schedule lengths set to the run's update count."""
    from pscnn.cli import resolve_auto_schedule  # noqa: PLC0415  (argparse only; no import cycle at load)

    if opt_cfg.get("schedule") is not None:
        # Only then: resolve_auto_schedule turns a missing schedule into {},
        # which build_schedule rejects, while a missing one means constant.
        opt_cfg = resolve_auto_schedule(opt_cfg, planned_updates)
    return build_optimizer(opt_cfg)


def _train_epoch(model, optimizer, writer: RunWriter, x, y, cfg: dict, epoch: int, prog: _Progress,
                 progress: bool) -> dict:
    """One pass over ``(x, y)``; "step" records on the way; returns the epoch's training statistics."""
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
            xb, yb = xp.asarray(xb), xp.asarray(yb)
            model.reseed((cfg["seed"], epoch - 1, batch))     # dropout masks as a pscnn trainer draws them
            logits = model.forward(xb, train=True)
            loss, dlogits = softmax_cross_entropy(logits, yb)
            if not math.isfinite(loss):
                # NaN or infinite weights never recover: stop instead of wasting the rest of the run.
                lr = optimizer.current_lr()
                writer.log("diverged", step=prog.step + 1, epoch=epoch, loss=loss, lr=lr)
                raise DivergenceError(f"training diverged at update {prog.step + 1} (epoch {epoch}): "
                                      f"the loss is {loss}; lower the learning rate (it was {lr:g})")
            # Accuracy on the batches as trained (dropout active): a cheap running
            # signal, not a substitute for the test evaluation.
            correct += int((logits.argmax(axis=1) == yb).sum())
            lr = optimizer.step(model.params, model.backward(dlogits))
            count = len(yb)
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
        if prog.window_samples:           # the epoch's tail, so the curve covers all of it
            _log_window(writer, prog, xp, epoch, lr, bar.disable)
        _sync(xp)
        seconds = max(time.perf_counter() - start, 1e-9)     # never 0 on a coarse clock
    finally:
        bar.close()
    prog.train_seconds += seconds
    return {"train_loss": loss_sum / seen, "train_accuracy": correct / seen,
            "epoch_seconds": round(seconds, 3), "images_per_second": seen / seconds}


def _log_window(writer: RunWriter, prog: _Progress, xp, epoch: int, lr: float, echo: bool) -> None:
    """Write one "step" record for the updates since the last one (and log it when ``echo``)."""
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
    summary = train(config, progress=not args.no_progress)
    print(format_report(summary), flush=True)
    return 0


def format_report(summary: dict) -> str:
    """The human-readable end-of-run report of a summary dict (as :func:`train` returns)."""
    lines = []
    opt = summary.get("optimizer") or {}
    epochs = summary["epochs"]
    lines.append(f"{_model_name(summary['model'])} model, {opt.get('name', '?')} lr {opt.get('lr', '?')}, "
                 f"batch {summary['batch_size']}, {epochs} epoch{'' if epochs == 1 else 's'} "
                 f"({summary['updates']:,} updates) on {summary['train_samples']:,} training images, "
                 f"{summary['device']}")
    lines.append(f"test accuracy {100 * summary['test_accuracy']:.2f}%, loss {summary['test_loss']:.4f} "
                 f"({summary['test_samples']:,} test images)")
    lines.append(f"training {summary['train_images_per_second']:,.0f} img/s "
                 f"({summary['samples_seen']:,} images in {summary['train_seconds']:.1f} s; "
                 f"{summary['wall_seconds']:.1f} s in all)")

    cm = np.asarray(summary["confusion_matrix"], dtype=np.int64)
    k = cm.shape[0]
    width = max(4, len(str(int(cm.max(initial=0)))) + 1)
    lines.append("")
    lines.append("confusion matrix (rows: true class, columns: predicted)")
    lines.append("      " + "".join(f"{j:>{width}}" for j in range(k)))
    for i in range(k):
        lines.append(f"  {i:>2}  " + "".join(f"{int(v):>{width}}" for v in cm[i]))
    lines.append("")
    per_class = summary["per_class_accuracy"]
    lines.append("per-class accuracy: " + "  ".join(f"{i}: {100 * a:.1f}%" for i, a in enumerate(per_class)))
    worst = int(np.argmin(per_class))
    lines.append(f"weakest class: {worst} ({100 * per_class[worst]:.1f}%)")

    out = Path(summary["out"])
    present = [name for name in (CHECKPOINT_FILE, SUMMARY_FILE, METRICS_FILE, CONFIG_FILE,
                                 "learning_curves.png", "confusion_matrix.png") if (out / name).exists()]
    lines.append("")
    lines.append(f"files in {out}: {', '.join(present)}")
    return "\n".join(lines)
