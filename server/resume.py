"""Resuming a run from its checkpoint: where it is, whether the run it holds is unfinished, the
checks of every field a resumed server takes from it (see ParameterServer._resume, which adopts them),
and what it takes besides: a finished run's optimizer, and the clients that joined after the
checkpoint (from metrics.jsonl).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable

from cnn_core.checkpoint import load_checkpoint
from cnn_core.config import is_integer, is_number
from cnn_core.data import batches_per_epoch, training_set_size
from cnn_core.errors import CheckpointError, PscnnError
from cnn_core.model import PRESETS, build_model
from cnn_core.optim import build_optimizer
from cnn_core.runlog import METRICS_FILE, SUMMARY_FILE, TIMELINE_PARTS, iter_metrics
from cnn_core.text import for_count
from pscnn.cli import MAX_SEED, MODES
from pscnn.protocol import one_line

from .config import ServerConfig
from .eval_report import metrics_problem

# The server's logger: a resume's lines are the server's
log = logging.getLogger("pscnn.server")

# A run folder's checkpoint: the server writes it, --resume reads it back
CHECKPOINT_NAME = "checkpoint.npz"


def resume_checkpoint(out: str) -> str:
    """The checkpoint ``--resume`` continues from in run folder ``out``; CheckpointError if there is none."""
    path = os.path.join(out, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    return path


def checkpoint_version(out: str) -> int | None:
    """The version (updates applied) of run folder ``out``'s checkpoint; None when there is none
    or it cannot be read."""
    try:
        _, meta = load_checkpoint(os.path.join(out, CHECKPOINT_NAME))
    except CheckpointError:
        return None
    step = meta.get("step")
    return step if isinstance(step, int) else None


# A run's id: new when a run starts, kept by every --resume of it (in its checkpoints and in the
# "start" records of metrics.jsonl), so that a checkpoint is never taken for another run's.
RUN_ID = re.compile(r"[0-9a-f]{12}")


def latest_run_id(out: str) -> str | None:
    """The run id of the last ``start`` record in run folder ``out``'s metrics.jsonl; None when there is
    none (no file, no start record, or one an older pscnn wrote)."""
    run_id = None
    try:
        for record in iter_metrics(os.path.join(out, METRICS_FILE), kinds=("start",), quiet=True):
            run_id = record.get("run_id")
    except OSError:
        return None
    return run_id if isinstance(run_id, str) else None


def summary_after_checkpoint(out: str) -> bool:
    """Whether run folder ``out``'s summary.json is at least as new as its checkpoint (or there is
    no checkpoint): the run it holds is finished, since a server writes every checkpoint of a run
    before its summary.  False without a summary.json."""
    try:
        summary = os.stat(os.path.join(out, SUMMARY_FILE)).st_mtime_ns
    except OSError:
        return False
    try:
        return summary >= os.stat(os.path.join(out, CHECKPOINT_NAME)).st_mtime_ns
    except OSError:
        return True


# How a server's user continues an unfinished run instead of starting over (unfinished_run_warning).
SERVER_RESUME_ADVICE = "stop this server and start it again with --resume (PSCNN_RESUME=1 in Compose)"


def unfinished_run_warning(out: str, resume_advice: str | Callable[[], str] = SERVER_RESUME_ADVICE) -> str | None:
    """The warning for starting over in run folder ``out`` when it holds an unfinished run's checkpoint, else None.
    ``resume_advice``: how to continue that run instead, for the command that warns; a callable is asked
    only when there is a warning (the advice may read the checkpoint again, to compare its settings).

    A run is finished once its server wrote ``summary.json`` (complete or
    diverged), and every checkpoint of the run is written before that; so the
    checkpoint belongs to an unfinished run when there is no summary.json, or
    only one older than the checkpoint (left by an earlier run in the folder,
    which a new run started over does not remove).  A finished run's folder
    reused without --resume (``make run`` twice) gets no warning, nor does a checkpoint of
    version 0 (a run stopped before its first update: there is nothing to lose).
    """
    path = os.path.join(out, CHECKPOINT_NAME)
    if not os.path.exists(path) or summary_after_checkpoint(out):
        return None
    try:
        _, meta = load_checkpoint(path)
    except CheckpointError as exc:
        what = f"unreadable: {exc}"
    else:
        if meta.get("step") == 0:       # no update was applied: starting over loses nothing
            return None
        extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
        work = extra.get("work") if isinstance(extra.get("work"), dict) else {}
        what = f"version {meta.get('step', '?')}, epoch {work.get('epoch', '?')} of {work.get('epochs', '?')}"
    return (f"{out} holds the checkpoint of an unfinished run ({what}; no summary.json written after it): "
            "starting over replaces it and that run's metrics.jsonl; to continue that run instead, "
            + (resume_advice() if callable(resume_advice) else resume_advice))


class SettingsDiffer(CheckpointError):
    """--resume refused: run settings differ from those the checkpoint was written with."""


def settings_refused(cfg: ServerConfig, model, optimizer) -> str | None:
    """The run settings of ``cfg`` (with the ``model`` and ``optimizer`` built from it) that ``--resume``
    of the checkpoint in run folder ``cfg.out`` refuses, each with the one to resume with; None when it
    takes them (or refuses the checkpoint itself, which no setting mends)."""
    path = os.path.join(cfg.out, CHECKPOINT_NAME)
    try:
        _, meta = load_checkpoint(path)
        check_resume_meta(cfg, path, meta, model, optimizer)
    except SettingsDiffer as exc:
        return str(exc).removeprefix("--resume: ")
    except CheckpointError:         # the checkpoint itself is refused
        pass
    return None


def resume_advice(cfg: ServerConfig, model, optimizer, same: str, differing: str) -> str:
    """How to continue the unfinished run in ``cfg.out`` instead of starting it over with ``cfg`` (and the
    ``model`` and ``optimizer`` built from it): ``same`` when --resume takes these settings; else
    ``differing``, followed by each setting --resume refuses and the one to resume with (another
    --batch-size, say: "the same command plus --resume" then failed, and the user learnt only then that
    the run's settings were needed)."""
    refused = settings_refused(cfg, model, optimizer)
    return same if refused is None else f"{differing} ({refused})"


def server_resume_advice(cfg: ServerConfig, model, optimizer) -> str:
    """:func:`resume_advice` for a server (SERVER_RESUME_ADVICE)."""
    return resume_advice(cfg, model, optimizer, SERVER_RESUME_ADVICE,
                         "stop this server and start it again with --resume and that run's settings "
                         "(PSCNN_RESUME=1 in Compose); this server's differ")


# Run settings a checkpoint must share with the run that resumes it.  Workers compute
# each batch's images from (seed, epoch, batch) over the training set cut in batches of
# batch_size, so seed, training-set size and batch size fix what the rest of the epoch
# trains on (its applied batches are indices into that permutation); the weights and
# optimizer state fit one model; the mode decides what an update is (summary.json reports
# one mode for the run, and a sync run's continuation is exact only in sync).  Allowed to
# differ: --epochs (at least the epochs the checkpoint finished, and the one under way if
# any: more epochs train longer), the optimizer's hyperparameters (lr, schedule: a warning
# lists what changed; the optimizer kind must match, its state is the checkpoint's: SGD keeps a
# momentum > 0 when the checkpoint holds a velocity),
# --staleness, --test-limit and everything about timeouts and workers.
class _Bad(Exception):
    """A checkpoint field that is missing or wrong: (field, problem)."""


def _field(mapping: dict, key: str, where: str):
    if key not in mapping:
        raise _Bad(f"{where}{key}", "is missing (not a checkpoint of the pscnn server?)")
    return mapping[key]


# The largest count a checkpoint may hold: the version, the samples applied and the fault
# counters travel in replies (a task, status), whose msgpack integers are 64-bit, so a
# hand-edited 2**64 was taken, and every status and task request failed (OverflowError).
CHECKPOINT_COUNT_MAX = 2**62


def _int(value, field: str, lo: int = 0, hi: int = CHECKPOINT_COUNT_MAX) -> int:
    if not is_integer(value):
        raise _Bad(field, f"must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise _Bad(field, f"is {value}, outside {lo}..{hi}")
    return value


def _number(value, field: str, lo: float = 0.0, hi: float | None = None) -> float:
    if not is_number(value):
        raise _Bad(field, f"must be a finite number, got {_show(value)}")
    if value < lo or (hi is not None and value > hi):
        raise _Bad(field, f"is {value}, outside {lo}..{hi}" if hi is not None else f"is {value}, below {lo}")
    return float(value)


def _mapping(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise _Bad(field, f"must be a JSON object, got {_show(value)}")
    return value


def _show(value, limit: int = 60) -> str:
    text = " ".join(json.dumps(value).split()) if _jsonable(value) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _changes(saved: dict, ours: dict, prefix: str = "") -> list[str]:
    """``"key saved -> ours"`` for each key whose value differs, an object on both sides key by key: a
    schedule shown whole was cut at 60 characters, before its warmup_steps."""
    changed = []
    for key in sorted(set(saved) | set(ours)):
        theirs, mine = saved.get(key), ours.get(key)
        if theirs == mine:
            continue
        if isinstance(theirs, dict) and isinstance(mine, dict):
            changed += _changes(theirs, mine, f"{prefix}{key}.")
        else:
            changed.append(f"{prefix}{key} {_show(theirs)} -> {_show(mine)}")
    return changed


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _model_name(spec) -> str:
    """A preset's name for a (normalized) spec, else 'a custom spec'."""
    for name, preset in PRESETS.items():
        try:
            if build_model(preset, device="cpu").spec == spec:
                return f"--model {name}"
        except PscnnError:
            pass
    return "a custom --model spec"


def check_resume_meta(cfg: ServerConfig, path: str, meta: dict, model, optimizer) -> dict:
    """The values a server of ``cfg``, with the ``model`` and ``optimizer`` built from it, takes from
    checkpoint ``path``'s ``meta`` to continue its run, checked; CheckpointError (one line naming the
    file and the field or setting) otherwise."""
    try:
        return _checked_meta(cfg, path, meta, model, optimizer)
    except _Bad as exc:
        field, problem = exc.args
        raise CheckpointError(f"--resume: checkpoint {path}: field {field} {problem}") from None


def _checked_meta(cfg: ServerConfig, path: str, meta: dict, model, optimizer) -> dict:
    """check_resume_meta's values; _Bad or CheckpointError otherwise."""
    run_samples = training_set_size(cfg.train_limit)
    warnings = []

    # Every setting that must match and does not, each what the checkpoint holds against this run's:
    # one line names them all (they were refused one at a time, and a user who had changed two, or
    # a restarted container's .env, learnt of the second only after fixing the first).
    differences: list[str] = []

    def mismatch(setting: str, theirs, ours, advice: str) -> None:
        differences.append(f"was written with {setting} {theirs}, this run has {setting} {ours}: {advice}")

    step = _int(_field(meta, "step", ""), "step")
    extra = _mapping(_field(meta, "extra", ""), "extra")
    work = _mapping(_field(extra, "work", "extra."), "extra.work")
    num_samples = _int(_field(work, "num_samples", "extra.work."), "extra.work.num_samples", 1)
    batch_size = _int(_field(work, "batch_size", "extra.work."), "extra.work.batch_size", 1)
    run_epochs = _int(_field(work, "epochs", "extra.work."), "extra.work.epochs", 1)
    epoch = _int(_field(work, "epoch", "extra.work."), "extra.work.epoch", 0, run_epochs)
    mode = _field(extra, "mode", "extra.")
    if mode not in MODES:
        raise _Bad("extra.mode", f"must be one of {', '.join(MODES)}, got {_show(mode)}")
    seed = extra.get("seed")            # absent from checkpoints of earlier versions of the server
    if seed is not None:
        seed = _int(seed, "extra.seed", 0, MAX_SEED)

    # The run's settings: those a correct continuation needs are the checkpoint's.
    if seed is not None and seed != cfg.seed:
        rest = f"the rest of epoch {epoch + 1}" if epoch < run_epochs else "an epoch added to it"
        mismatch("--seed", seed, cfg.seed, f"workers derive each batch from the seed, so {rest} "
                 f"would train on another permutation; resume with --seed {seed}")
    if seed is None:
        warnings.append(f"--resume: checkpoint {path} does not record its seed (an older pscnn wrote it): "
                        f"make sure this run's --seed {cfg.seed} is the one it was written with")
    if num_samples != run_samples:
        differences.append(f"was written for a training set of {num_samples} images, this run has "
                           f"{run_samples} (--train-limit {cfg.train_limit}): the epoch's batches index that "
                           f"set; resume with --train-limit {num_samples}")
    if batch_size != cfg.batch_size:
        mismatch("--batch-size", batch_size, cfg.batch_size,
                 f"the epoch's applied batches are batches of {batch_size}; resume with --batch-size {batch_size}")
    if mode != cfg.mode:
        mismatch("--mode", mode, cfg.mode, f"resume with --mode {mode}, or start a new run in another "
                 f"--out to train in {cfg.mode} mode")
    spec = _field(meta, "model_spec", "")
    if spec != model.spec:
        try:
            same = build_model(spec, device="cpu").spec == model.spec
        except PscnnError as exc:
            raise _Bad("model_spec", f"cannot be built: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise _Bad("model_spec", f"cannot be built ({type(exc).__name__}: {exc})") from None
        if not same:
            theirs, ours = _model_name(spec), _model_name(model.spec)
            advice = f"resume with {theirs}" if theirs.startswith("--model ") else \
                "resume with the --model spec it was written with"
            differences.append(f"holds weights of {theirs}, this run has {ours}: {advice}")
    saved_opt = meta.get("optimizer")
    ours_opt = optimizer.config()
    if not isinstance(saved_opt, dict) or not isinstance(saved_opt.get("name"), str):
        raise _Bad("optimizer", f"must be the optimizer's config (an object with a 'name'), got "
                   f"{_show(saved_opt)}")
    if saved_opt["name"] != ours_opt["name"]:
        mismatch("--optimizer", saved_opt["name"], ours_opt["name"],
                 f"its state is {saved_opt['name']}'s; resume with --optimizer {saved_opt['name']}")
    saved_momentum = saved_opt.get("momentum")
    if (saved_opt["name"] == ours_opt["name"] == "sgd" and is_number(saved_momentum) and saved_momentum > 0
            and not ours_opt.get("momentum")):
        # plain SGD has no place for the checkpoint's velocity: loading it failed with "unexpected key
        # 'velocity/conv1.weight'", naming no setting, and dropping it would lose the run's state
        mismatch("--momentum", _show(saved_momentum), _show(ours_opt.get("momentum")),
                 f"its optimizer state holds momentum SGD's velocity; resume with --momentum {_show(saved_momentum)}")
    changed = _changes(saved_opt, ours_opt)
    if epoch > cfg.epochs:
        mismatch("--epochs", run_epochs, cfg.epochs, f"it has finished {epoch} epochs already; resume "
                 f"with --epochs {run_epochs} (or more, to train longer)")

    # The position in the epoch and the counters.
    batches = batches_per_epoch(num_samples, batch_size)
    applied = _field(work, "applied", "extra.work.")
    if not isinstance(applied, list):
        raise _Bad("extra.work.applied", f"must be a list of batch numbers, got {_show(applied)}")
    for b in applied:
        if not is_integer(b) or not 0 <= b < batches:
            raise _Bad("extra.work.applied", f"holds {_show(b)}, not a batch of the epoch (0..{batches - 1})")
    if len(set(applied)) != len(applied):
        raise _Bad("extra.work.applied", "lists a batch twice")
    if applied and epoch == run_epochs:
        raise _Bad("extra.work.applied", f"lists {len(applied)} applied batches after the run's last epoch "
                   f"(extra.work.epoch is {epoch} of {run_epochs}: none can be)")
    if len(applied) >= batches:
        raise _Bad("extra.work.applied", f"lists all {batches} {for_count(batches, 'batch', 'batches')} of epoch "
                   f"{epoch} (a finished epoch is recorded as the next one's start, with none applied)")
    if applied and epoch == cfg.epochs:     # its weights hold those batches: the run would end past its end
        mismatch("--epochs", run_epochs, cfg.epochs,
                 f"it is {len(applied)} {for_count(len(applied), 'batch', 'batches')} into epoch "
                 f"{epoch + 1} already; resume with --epochs {epoch + 1} (or more, to train longer)")
    if differences:
        raise SettingsDiffer(f"--resume: checkpoint {path} " + "; and it ".join(differences))
    finished = epoch == cfg.epochs          # (none applied after it: refused above)
    if changed:
        differ = f"--resume: this run's optimizer settings differ from the checkpoint's ({'; '.join(changed)})"
        warnings.append(f"{differ}: the run has trained its {cfg.epochs} {for_count(cfg.epochs, 'epoch')} already, "
                        "so nothing trains with them; its results keep the settings that trained it"
                        if finished else
                        f"{differ}: training continues with this run's")
    if run_epochs != cfg.epochs:
        log.info("--resume: training for %d %s; the checkpoint's run had %d", cfg.epochs,
                 for_count(cfg.epochs, "epoch"), run_epochs)
    run_id = extra.get("run_id")       # absent from checkpoints of earlier versions
    if run_id is not None:
        if not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
            raise _Bad("extra.run_id", f"must be 12 hex digits, got {_show(run_id)}")
        latest = latest_run_id(cfg.out)
        if latest is not None and latest != run_id:    # a run started over since, stopped before its checkpoint
            raise CheckpointError(f"--resume: checkpoint {path} is run {run_id}'s (version {step}), but "
                                  f"{METRICS_FILE} was last started by run {latest}, which started over in this "
                                  f"folder and wrote no checkpoint: nothing of run {latest} can be continued, "
                                  f"and run {run_id}'s records are gone; start the run again without --resume")
    samples_applied = _int(_field(extra, "samples_applied", "extra."), "extra.samples_applied")
    train_seconds = _number(_field(extra, "train_seconds", "extra."), "extra.train_seconds")
    # absent from checkpoints of earlier versions: their training seconds, as their summaries counted
    wall_seconds = (train_seconds if extra.get("wall_seconds") is None
                    else _number(extra["wall_seconds"], "extra.wall_seconds"))
    staleness = {}
    for k, v in _mapping(_field(extra, "staleness", "extra."), "extra.staleness").items():
        if not (k.isascii() and k.isdigit()):
            raise _Bad("extra.staleness", f"has key {_show(k)}: keys are staleness values (integers >= 0)")
        staleness[int(k)] = _int(v, f"extra.staleness[{k}]")
    contributors = _mapping(_field(extra, "contributors", "extra."), "extra.contributors")
    for k, v in contributors.items():
        if not isinstance(v, str):
            raise _Bad(f"extra.contributors[{_show(k)}]", f"must be a worker name (a string), got {_show(v)}")
    # absent from checkpoints of earlier versions, which kept every contributor
    contributors_count = _int(extra.get("contributors_count", len(contributors)), "extra.contributors_count",
                              len(contributors))
    workers_most = extra.get("workers_most")     # absent from checkpoints of earlier versions
    workers_most = len(contributors) if workers_most is None else _int(workers_most, "extra.workers_most")
    peer_ids = extra.get("peer_ids", [])         # absent from checkpoints of earlier versions
    if not isinstance(peer_ids, list) or not all(isinstance(wid, str) for wid in peer_ids):
        raise _Bad("extra.peer_ids", f"must be a list of worker ids (strings), got {_show(peer_ids)}")
    counts = {}         # the fault counters (absent from checkpoints of earlier versions)
    for key in ("peers_dropped", "rejected_messages"):
        counts[key] = {k: _int(v, f"extra.{key}[{_show(k)}]")
                       for k, v in _mapping(extra.get(key, {}), f"extra.{key}").items()}
    lease_requeues = _int(extra.get("lease_requeues", 0), "extra.lease_requeues")
    # absent from checkpoints of earlier versions, and null in those of runs resumed from one: the
    # workers' time before is not known, and summary.json says so (null) rather than count part of it
    worker_seconds = extra.get("worker_seconds")
    if worker_seconds is not None:
        worker_seconds = _mapping(worker_seconds, "extra.worker_seconds")
        if set(worker_seconds) != set(TIMELINE_PARTS):
            raise _Bad("extra.worker_seconds", f"must have the keys {', '.join(TIMELINE_PARTS)}, "
                       f"got {_show(sorted(worker_seconds))}")
        worker_seconds = {part: _number(worker_seconds[part], f"extra.worker_seconds.{part}")
                          for part in TIMELINE_PARTS}
    evaluations = []
    # absent from checkpoints of earlier versions, which kept every record
    thinned_through = _int(extra.get("evaluations_thinned_through", -1), "extra.evaluations_thinned_through",
                           -1, step)
    raw = _field(extra, "evaluations", "extra.")
    if not isinstance(raw, list):
        raise _Bad("extra.evaluations", f"must be a list, got {_show(raw)}")
    for i, e in enumerate(raw):
        where = f"extra.evaluations[{i}]"
        e = _mapping(e, where)
        loss = _field(e, "test_loss", where + ".")
        if not isinstance(e.get("final"), bool):
            raise _Bad(where + ".final", f"must be true or false, got {_show(e.get('final'))}")
        evaluations.append({
            "seconds": _number(_field(e, "seconds", where + "."), where + ".seconds"),
            "version": _int(_field(e, "version", where + "."), where + ".version", 0, step),
            "test_accuracy": _number(_field(e, "test_accuracy", where + "."), where + ".test_accuracy", 0, 1),
            "test_loss": None if loss is None else _number(loss, where + ".test_loss", -math.inf),
            "final": e["final"]})
    return {"step": step, "epoch": epoch, "applied": applied, "samples_applied": samples_applied,
            "train_seconds": train_seconds, "wall_seconds": wall_seconds, "staleness": staleness, "contributors": dict(contributors),
            "contributors_count": contributors_count, "peer_ids": peer_ids, "workers_most": workers_most,
            "evaluations": evaluations, "run_id": run_id,
            "evaluations_thinned_through": thinned_through, "warnings": warnings,
            "lease_requeues": lease_requeues, "worker_seconds": worker_seconds,
            "final_eval": _checked_final_eval(extra, model.num_classes),
            "optimizer": saved_opt if changed and finished else None, **counts}


def _checked_final_eval(extra: dict, classes: int) -> dict | None:
    """The checkpoint's final evaluation (metrics as an evaluator reports them), checked; None if it has
    none (checkpoints from before the run's end, and of earlier versions)."""
    final_eval = extra.get("final_eval")
    if final_eval is None:
        return None
    problem = metrics_problem(_mapping(final_eval, "extra.final_eval"), classes)
    if problem:
        raise _Bad("extra.final_eval", problem)
    return final_eval


def logged_evaluation(r: dict, newest_version: int) -> dict | None:
    """An ``eval`` record of metrics.jsonl as the evaluation history keeps it, checked as the checkpoint's
    own history is (check_resume_meta); None for one hand-edited, or of a version above ``newest_version``
    (the checkpoint's, which does not hold it): not this run's history."""
    try:
        loss = r.get("test_loss")
        if not isinstance(r.get("final"), bool):
            raise _Bad("final", "must be true or false")
        return {"seconds": _number(r.get("train_seconds"), "train_seconds"),
                "version": _int(r.get("version"), "version", 0, newest_version),
                "test_accuracy": _number(r.get("test_accuracy"), "test_accuracy", 0, 1),
                "test_loss": None if loss is None else _number(loss, "test_loss", -math.inf),
                "final": r["final"]}
    except _Bad:
        return None


def optimizer_trained_with(path: str, config: dict, loaded, params):
    """The optimizer of ``config``, the checkpoint's (at ``path``), holding the state that ``loaded``,
    this run's optimizer, took from it: a run trained to its end keeps the settings that trained it.
    CheckpointError naming the field if it cannot."""
    try:
        trained_with = build_optimizer(config)
        trained_with.load_state_dict(loaded.state_dict(), params=params)
    except PscnnError as exc:
        raise CheckpointError(f"--resume: checkpoint {path}: field optimizer {one_line(exc)}") from None
    return trained_with


def joined_since_checkpoint(logged: list) -> list[str]:
    """The ids of the clients that joined the server that wrote the checkpoint, or a later one, by
    metrics.jsonl's ``logged`` start, checkpoint and join records: clients of the run before.

    A client that joined after the checkpoint was written is in none of its peer_ids: a server
    killed then (SIGKILL, a crash) and resumed refused its messages as an unknown id's, a WARNING
    and a count in rejected_messages for a client that did nothing wrong.  The joins counted run
    from the "start" record before the last "checkpoint" record, not from the last "start": a
    resumed server killed in its turn, before the client came back and before a checkpoint of
    its own, left a start record after the client's join.  With no checkpoint record (lost with
    a SIGKILL before it reached the disk) every logged join counts."""
    last_start = checkpoint_server_start = 0
    for i, r in enumerate(logged):
        if r.get("kind") == "start":
            last_start = i
        elif r.get("kind") == "checkpoint":
            checkpoint_server_start = last_start
    return [r["id"] for r in logged[checkpoint_server_start:]
            if r.get("kind") == "join" and isinstance(r.get("id"), str)]
