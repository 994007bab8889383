"""The run folder: ``config.json``, ``metrics.jsonl``, ``summary.json`` and plots.

Shared by ``pscnn train`` and the parameter server, so it knows nothing about
either: a run is a folder holding

    config.json      the run's configuration, written when the run starts
    metrics.jsonl    one JSON object per line, appended as the run goes
    summary.json     the final results, written once at the end
    *.png            plots drawn from the two files above (:func:`make_plots`)

Every metrics line is ``{"kind": ..., "seconds": ..., **fields}``: ``kind``
says what the record is, ``seconds`` is the time since the run started.  The
kinds the plots understand are

    "step"           ``step`` (else ``version``, the parameter server's
                     update count), ``loss``: training loss vs updates
    "epoch", "eval"  ``test_accuracy`` (else ``accuracy``), optionally
                     ``step``/``version``: test accuracy vs updates and vs time
    "step" with ``timeline`` (distributed runs): per push ``[worker id,
                     answered_s, arrived_s, compute_s]``: what each worker
                     did, when (:func:`time_split`, ``timeline.png``; the
                     "join" records name each id)

and any other kind is stored and ignored by the plots.

The files are strict JSON: NumPy/CuPy scalars and arrays become Python
numbers and lists, and NaN or infinity become ``null`` (what JavaScript's
``JSON.stringify`` does), so ``jq`` and other strict readers accept them.
JSON files are replaced atomically, so a reader never sees half of one.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

from . import backend
from .config import finite_or_none, is_number
from .fileio import atomic_write, remove_stale_temporaries
from .errors import PscnnError
from .text import for_count

__all__ = ["RunWriter", "RunLogError", "check_folder_free", "iter_metrics", "read_metrics", "make_plots", "to_jsonable",
           "write_json_atomic", "CONFIG_FILE", "METRICS_FILE", "SUMMARY_FILE"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LEARNING_CURVES_FILE = "learning_curves.png"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
TIMELINE_FILE = "timeline.png"


class RunLogError(PscnnError, OSError):
    """A run folder file cannot be written (permissions, a full disk, a file where a folder should be)."""


def _io_error(path, exc: OSError) -> RunLogError:
    return RunLogError(f"{path}: cannot write: {exc.strerror or exc}")


LOCK_FILE = ".pscnn.lock"


def lock_folder(folder: Path):
    """Hold an exclusive lock on ``folder`` for this process (released by close, or by the
    kernel when the process dies); RunLogError naming the holder if another process has it.

    Two processes writing one run folder would interleave metrics.jsonl and
    overwrite each other's checkpoint and summary without a word.
    """
    try:
        import fcntl  # noqa: PLC0415  (POSIX; elsewhere the folder goes unlocked)
    except ImportError:
        return None
    path = folder / LOCK_FILE
    try:
        fh = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise _io_error(path, exc) from exc
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise RunLogError(f"{folder}: another pscnn process (pid {holder}) is writing this run folder; "
                          "choose another --out, or stop that process first") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def check_folder_free(folder) -> None:
    """RunLogError, as :class:`RunWriter` would raise it, if another process writes run folder
    ``folder`` now; nothing is held afterwards (a check before starting processes that will write it)."""
    folder = Path(folder)
    if folder.is_dir():
        lock = lock_folder(folder)
        if lock is not None:
            lock.close()


def make_folder(path) -> Path:
    """Create the folder ``path`` (and its parents) if needed; RunLogError, one line, if it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:             # mkdir says no more than "File exists"
        raise RunLogError(f"{path}: is a file, not a folder") from None
    except OSError as exc:
        raise _io_error(path, exc) from None
    return path


def new_run_id() -> str:
    """A new random id of 12 hex digits: a run's (its ``start`` records' ``run_id``, which a
    server's --resume matches against its checkpoint's), or a server start's."""
    return uuid.uuid4().hex[:12]


# --------------------------------------------------------------------------- JSON
def to_jsonable(obj):
    """``obj`` with everything turned into types :func:`json.dumps` writes as strict JSON.

    NumPy and CuPy scalars become Python scalars, arrays become (nested)
    lists, tuples and sets become lists, paths become strings, dict keys
    become strings, and non-finite floats (NaN, +-inf) become ``None``.
    Anything else that JSON cannot hold raises TypeError naming its type:
    silently writing ``str(obj)`` would hide a bug in the caller.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)                       # also flattens int subclasses (IntEnum)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.generic):           # np.float32(1.5), np.int64(3), np.bool_ ...
        return to_jsonable(obj.item())
    if isinstance(obj, dict):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        with contextlib.suppress(TypeError):  # a stable order when the items allow one
            items.sort()
        return items
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.ndarray) or backend.get_array_module(obj) is not np:
        # tolist() gives Python scalars; the recursion then maps NaN to None.
        return to_jsonable(np.asarray(backend.to_numpy(obj)).tolist())
    raise TypeError(f"cannot store a {type(obj).__module__}.{type(obj).__qualname__} in JSON: {obj!r:.80}")


def _json_key(key) -> str:
    if isinstance(key, str):
        return key
    value = to_jsonable(key)
    if isinstance(value, (list, dict)):
        raise TypeError(f"cannot use a {type(key).__name__} as a JSON object key")
    return json.dumps(value) if not isinstance(value, str) else value


def _pretty(value, indent: str = "") -> str:
    """Indented JSON that keeps lists of numbers on one line.

    ``json.dumps(indent=2)`` puts every number of a 10x10 confusion matrix on
    its own line (over 100 lines); here a matrix reads as one row per line.
    """
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_pretty(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (list, dict)) and v for v in value):
        items = [inner + _pretty(v, inner) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(value, allow_nan=False)


def write_json_atomic(path, obj) -> Path:
    """Write ``obj`` (made JSON-able) to ``path`` atomically; returns ``path`` as a Path.

    The text goes to a temporary file in the same folder, is fsync-ed, and is
    then renamed over ``path`` (``os.replace`` is atomic within a file
    system), so readers see the old file or the new one, never a mix, and a
    crash leaves the previous version intact.
    """
    path = Path(path)
    text = _pretty(to_jsonable(obj)) + "\n"   # serialize first: a TypeError leaves no temp file
    try:
        with atomic_write(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        if isinstance(exc, PscnnError):
            raise
        raise _io_error(path, exc) from exc
    return path


# --------------------------------------------------------------------------- writing
class RunWriter:
    """Writes one run folder: ``config.json`` now, metrics lines as they come, the summary at the end.

    Args:
        out_dir: the run folder; created with its parents if missing.
        config: the run's configuration, written to ``config.json`` at once
            (atomically, replacing any previous one).
        resume: append to an existing ``metrics.jsonl`` instead of starting
            it afresh, and continue its clock: ``seconds`` goes on from the
            last record's value, so curves against time stay continuous
            across restarts.  A torn last line (the previous process died
            mid-write) is cut off first, so it cannot swallow the next record.
        keep_earlier: a run started over in a folder whose earlier run can still
            be continued (its checkpoint is there): that run's ``config.json``
            and ``metrics.jsonl`` stay as they are, and this run's records wait
            in memory, until :meth:`replace_earlier` (the run's first update,
            checkpoint or summary).  Closed before, it leaves the folder as it was.

    ``log`` may be called from several threads (a server's handlers); each
    record is one ``write`` of one line under a lock, unbuffered, so that
    ``tail -f`` and a crash both see every record logged so far.  Records made
    at every training step go through :meth:`log_deferred` instead: they wait
    in memory for the next :meth:`flush` (a parameter server calls it every
    50 ms), ``log`` or ``close``, so that writing them costs no system call
    per step.  Usable as a context manager, which closes it.

    A write that fails (a full disk, a file system gone read-only) does not
    stop the run: the bytes not written wait in memory, up to HELD_MAX_BYTES
    (records beyond are counted and dropped), and go out with the next write
    that succeeds; a warning says so once, and an info line when the file is
    written again.  The file never holds a record twice or out of order.
    Only :meth:`close` raises :class:`RunLogError` if they still cannot be
    written: the run's last chance to keep them.
    """

    # Deferred records written at once when this many are waiting.
    DEFERRED_MAX = 256
    # What may wait in memory while metrics.jsonl cannot be written (~300,000 step records).
    HELD_MAX_BYTES = 64 << 20
    # Records a run started over holds (keep_earlier) before its first update: a start barrier
    # that clients join and leave for days must not grow the server without bound.
    KEPT_MAX = 10_000

    def __init__(self, out_dir, config: dict, resume: bool = False, keep_earlier: bool = False):
        self.out_dir = make_folder(out_dir)
        self._folder_lock = lock_folder(self.out_dir)        # before anything in it is written
        stale = remove_stale_temporaries(self.out_dir)        # ours alone now: a killed writer's leftovers
        if stale:
            log.info("%s: removed %s, left by a process killed mid-write", self.out_dir, ", ".join(stale))
        self.config_path = self.out_dir / CONFIG_FILE
        self.metrics_path = self.out_dir / METRICS_FILE
        self.summary_path = self.out_dir / SUMMARY_FILE
        self._config = config
        self._keeping_earlier = keep_earlier and not resume
        try:
            if not self._keeping_earlier:
                write_json_atomic(self.config_path, config)
            offset = 0.0
            if resume and self.metrics_path.exists():
                offset = _repair_and_last_seconds(self.metrics_path)
            # opened now all the same: a file that cannot be written is said at the start
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if resume or self._keeping_earlier else os.O_TRUNC)
            self._fd: int | None = os.open(self.metrics_path, flags, 0o644)
        except BaseException as exc:
            if self._folder_lock is not None:     # no writer: nobody holds the folder
                self._folder_lock.close()
            if isinstance(exc, OSError) and not isinstance(exc, RunLogError):    # config.json's names itself
                raise _io_error(self.metrics_path, exc) from exc
            raise
        self._offset = offset
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._deferred: list[str] = []        # lines logged with log_deferred, not yet written
        self._unwritten = bytearray()         # what a failed or partial write left behind
        self._failing: str | None = None      # why the last write failed (None: it did not)
        self._dropped = 0                     # records dropped while too much waited

    @property
    def seconds(self) -> float:
        """Seconds since the run started (including earlier runs when resumed)."""
        return self._offset + (time.monotonic() - self._start)

    def log(self, kind: str, **fields) -> dict:
        """Append ``{"kind": kind, "seconds": <since start>, **fields}`` to metrics.jsonl, flushed.

        Values JSON cannot write as they are (NumPy scalars and arrays, NaN,
        sets, paths) are converted with :func:`to_jsonable`.  A ``seconds``
        field given by the caller replaces the clock's.  Returns the record
        as written.  Deferred records are written first, in order.
        """
        record, line = self._line(kind, fields)
        self._write(line, flush=True)
        return record

    def log_deferred(self, kind: str, **fields) -> dict:
        """:meth:`log` for frequent records: written by the next flush, log or close."""
        record, line = self._line(kind, fields)
        self._write(line, flush=False)
        return record

    def flush(self) -> None:
        """Write the deferred records now."""
        self._write("", flush=True)

    def _line(self, kind: str, fields: dict) -> tuple[dict, str]:
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"RunWriter.log: kind must be a non-empty string, got {kind!r}")
        record = {"kind": kind, "seconds": round(self.seconds, 3), **fields}
        try:        # the usual record holds only JSON's own types: no conversion pass
            line = json.dumps(record, allow_nan=False)
        except (TypeError, ValueError):
            record = to_jsonable(record)
            line = json.dumps(record, allow_nan=False)
        return record, line + "\n"

    def _write(self, line: str, flush: bool) -> None:
        with self._lock:
            if self._fd is None:
                raise ValueError(f"RunWriter.log: {self.metrics_path} is closed")
            if line:
                if self._failing and len(self._unwritten) + len(line) > self.HELD_MAX_BYTES \
                        and self._write_deferred() is not None:         # still failing: no room left
                    self._dropped += 1
                else:
                    self._deferred.append(line)
            if self._keeping_earlier and len(self._deferred) >= self.KEPT_MAX:
                # held in memory before the first update (clients joining and leaving, evaluations): a
                # bound, past which this run's records are its own and the earlier run's files go
                log.warning("%s: %d records logged before this run's first update; the earlier run's "
                            "metrics.jsonl and config.json are replaced now", self.out_dir, len(self._deferred))
                self._replace_earlier_locked()
            elif flush or len(self._deferred) >= self.DEFERRED_MAX:
                self._write_deferred()

    def replace_earlier(self) -> None:
        """The run has an output of its own now (``keep_earlier``): write its config.json and start
        metrics.jsonl afresh with the records held so far.  Once; later calls do nothing."""
        if not self._keeping_earlier:   # every update asks: no lock taken once replaced
            return
        with self._lock:
            self._replace_earlier_locked()

    def _replace_earlier_locked(self) -> None:
        """:meth:`replace_earlier`, the lock held."""
        if not self._keeping_earlier or self._fd is None:
            return
        self._keeping_earlier = False
        try:
            os.ftruncate(self._fd, 0)
            write_json_atomic(self.config_path, self._config)
        except OSError as exc:      # the run goes on: its records are written as they can be
            log.warning("%s: cannot replace the earlier run's files: %s", self.out_dir, exc)
        self._write_deferred()

    def _write_bytes(self, data: bytes) -> int:
        """One ``write`` system call; returns how much of ``data`` it wrote."""
        return os.write(self._fd, data)

    def _write_deferred(self) -> OSError | None:
        """Write the waiting lines (the caller holds the lock); the error if they could not all be."""
        if self._keeping_earlier:       # they wait for replace_earlier: few, those before the first update
            return None
        if self._deferred:
            self._unwritten += "".join(self._deferred).encode("utf-8")      # in place: no copy of what waits
            self._deferred = []
        try:
            while self._unwritten:      # whole lines, in one write unless the disk fills up midway
                written = self._write_bytes(self._unwritten)
                del self._unwritten[:written]
        except OSError as exc:
            if self._failing is None:
                log.warning("%s: cannot write (%s); the run goes on, and its records wait in memory (up to "
                            "%d MB) until the file can be written", self.metrics_path, exc.strerror or exc,
                            self.HELD_MAX_BYTES >> 20)
            self._failing = exc.strerror or str(exc)
            return exc
        if self._failing is not None:
            dropped = self._dropped
            log.info("%s: written again%s", self.metrics_path,
                     f"; {dropped} {for_count(dropped, 'record was', 'records were')} dropped while it could not be"
                     if dropped else "")
            self._failing, self._dropped = None, 0
        return None

    def write_summary(self, summary: dict, path=None) -> Path:
        """Write ``summary.json`` atomically (JSON-able conversion as in :meth:`log`); returns its path.

        ``path``: where instead (pscnn train's results, when the run folder cannot take them)."""
        self.replace_earlier()      # a summary is this run's own: the earlier run's files go with it
        return write_json_atomic(self.summary_path if path is None else path, summary)

    def close(self) -> None:
        """Write the waiting records and close metrics.jsonl; calling it again does nothing.

        RunLogError if some records still cannot be written (it closes all the same).
        """
        with self._lock:
            if self._fd is not None:
                try:
                    failed = self._write_deferred()
                finally:                # closed even when the last write fails
                    os.close(self._fd)
                    self._fd = None
                    if self._folder_lock is not None:
                        self._folder_lock.close()       # releases the lock
                        self._folder_lock = None
                if failed is not None:
                    raise _io_error(self.metrics_path, failed) from failed

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunWriter({str(self.out_dir)!r})"


def _repair_and_last_seconds(path: Path) -> float:
    """Cut a torn last line off ``path``; return the largest ``seconds`` recorded (0 if none).

    Read a line at a time: a week-long run's step records outgrow the memory, and read whole
    (as bytes, text and a list of lines: three times the file) they made it impossible to resume.
    """
    end = 0                                   # where the last complete line ends

    def complete_lines():
        nonlocal end
        for line in _complete_lines(fh, b"\n"):    # not the torn last line, if any
            end += len(line)
            yield line.decode("utf-8", errors="replace")

    last = 0.0
    with open(path, "rb+") as fh:
        for record in _parse_lines(complete_lines(), path):
            # not Infinity (or 1e999), which json reads: every record after it said "seconds": null
            seconds = finite_or_none(record.get("seconds"))
            if seconds is not None:
                last = max(last, seconds)
        size = fh.seek(0, os.SEEK_END)
        if end < size:
            log.warning("%s: dropping an incomplete last line (%d %s) left by an interrupted run",
                        path, size - end, for_count(size - end, "byte"))
            fh.truncate(end)
    return last


# --------------------------------------------------------------------------- reading
def _complete_lines(lines, newline="\n"):
    """``lines`` up to the first that does not end with ``newline``: one still being written, or
    torn.  Not past it: read on, a line completed meanwhile would come as its missing end alone."""
    for line in lines:
        if not line.endswith(newline):
            return
        yield line


def iter_metrics(path, kinds=None, *, quiet: bool = False, growing: bool = False):
    """The records of a ``metrics.jsonl`` file (or of the one in a run folder ``path``), one at a
    time; ``kinds``: only the records of these kinds.  A week-long server's file holds gigabytes
    of step records: read whole, as dicts, it takes about 7.5 times its size in memory.

    Blank lines are skipped; a line that is not a JSON object (typically the
    torn last line of a run that was killed) is skipped with a warning rather
    than making the whole history unreadable (``quiet``: without, for a file read again).
    With ``kinds``, a line that cannot hold a record of those kinds is not parsed (nor warned of).
    ``growing``: the file may be appended to meanwhile (the server's plot thread reads it while the
    server logs its clients' goodbyes): reading stops before a last line without its newline,
    half written, without a warning.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    spelled = None
    if kinds is not None and not isinstance(kinds, str) and all(isinstance(kind, str) for kind in kinds):
        spelled = tuple(json.dumps(kind, ensure_ascii=False) for kind in kinds)
    with open(path, encoding="utf-8", errors="replace") as fh:
        for record in _parse_lines(_complete_lines(fh) if growing else fh, path, quiet, spelled):
            if kinds is None or record.get("kind") in kinds:
                yield record


def read_metrics(path, kinds=None) -> list[dict]:
    """:func:`iter_metrics`'s records in a list (``kinds``: of these kinds only: a long run's
    step records need not all be held at once)."""
    return list(iter_metrics(path, kinds))


def _parse_lines(lines, path, quiet: bool = False, spelled: tuple[str, ...] | None = None):
    """``spelled``: the JSON strings (quotes included) one of which a line must hold to be parsed.
    A line without a backslash can spell a string only one way: those of other kinds (a long run's
    step records, when its few "start" records are asked for) cost a substring search, not a parse
    (latest_run_id took 7.5 s over a million step records at every --resume)."""
    warn = log.debug if quiet else log.warning
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or spelled is not None and "\\" not in line and not any(s in line for s in spelled):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            warn("%s:%d: skipping a malformed line (%s)", path, number, exc)
            continue
        if isinstance(record, dict):
            yield record
        else:
            warn("%s:%d: skipping a line that is not a JSON object", path, number)


# --------------------------------------------------------------------------- plots
def make_plots(out_dir) -> list[Path]:
    """Draw the run folder's plots from its metrics.jsonl and summary.json.

    * ``learning_curves.png``: training loss vs update (``"step"`` records),
      test accuracy vs update and vs seconds (``"epoch"``/``"eval"`` records);
    * ``confusion_matrix.png``: summary.json's ``confusion_matrix`` with the
      counts written in the cells;
    * ``timeline.png`` (distributed runs): each worker's computing, network
      and waiting on the server over a stretch of the run (:func:`time_split`).

    A plot whose data is missing is skipped, and one of that name already in
    the folder removed: it was drawn for an earlier run there, and would pass
    for this one's.  Returns the paths written; ``[]`` when matplotlib is not
    installed.  Never raises: plots are a by-product,
    so any error is logged as a warning and the run goes on.

    metrics.jsonl is read as a file still growing (``iter_metrics``'s ``growing``): the server
    draws them in a thread while it logs its clients' goodbyes, and a line half written then is
    no malformed record to warn of.
    """
    mpl_log = logging.getLogger("matplotlib")
    if mpl_log.level == logging.NOTSET:
        # Its INFO chatter ("generated new fontManager" on a fresh machine)
        # would appear in the run's log as if it were ours.
        mpl_log.setLevel(logging.WARNING)
    try:
        # The object-oriented API (Figure + its own Agg canvas) needs no pyplot:
        # no global backend switch, no GUI, and safe in a process that uses
        # matplotlib interactively elsewhere.
        from matplotlib.figure import Figure  # noqa: PLC0415  (optional dependency)
    except ImportError:
        # one line, or a run folder short of the plots the README lists would leave the user guessing why
        log.info("no plots: matplotlib is not installed (pip install matplotlib, pscnn's plot extra)")
        return []
    except Exception as exc:  # noqa: BLE001  (a broken install must not fail the run)
        log.warning("matplotlib cannot be imported (%s: %s); no plots", type(exc).__name__, exc)
        return []

    out_dir = Path(out_dir)
    written = []
    for name, draw in ((LEARNING_CURVES_FILE, _draw_learning_curves),
                       (CONFUSION_MATRIX_FILE, _draw_confusion_matrix), (TIMELINE_FILE, _draw_timeline)):
        path = out_dir / name
        try:
            fig = draw(Figure, out_dir)
            if fig is not None:
                written.append(_save_figure(fig, path))
                continue
        except Exception as exc:  # noqa: BLE001
            log.warning("could not draw %s: %s: %s", path, type(exc).__name__, exc)
        try:        # not drawn from this run's files: an earlier run's plot must not stand in for it
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s, drawn for an earlier run: %s", path, exc.strerror or exc)
    return written


def _save_figure(fig, path: Path) -> Path:
    """Save as PNG via a temporary file and a rename, so a viewer never loads half an image."""
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    return path


def _updates(record: dict) -> float | None:
    """A record's update count: ``step`` (pscnn train), else ``version`` (the parameter server)."""
    return finite_or_none(record.get("step", record.get("version")))


def _resumed_at(record: dict) -> float | None:
    """The version a ``"start"`` record's server resumed from (None for any other record): the
    step and evaluation records of the updates above it, logged before, were lost and redone."""
    return finite_or_none(record.get("version")) if record.get("kind") == "start" else None


def without_lost_updates(records: list) -> list:
    """``records`` less the step and evaluation records of updates a resumed server did again.

    A server killed after its last checkpoint logged updates its checkpoint
    does not hold; resumed (a ``"start"`` record at the checkpoint's
    ``version``), it redoes them, and the curves drew both runs' values
    at the same updates, interleaved.  Only the history the model
    descends from is kept.
    """
    kept = []
    for r in records:
        resumed_at = _resumed_at(r)
        if resumed_at is not None:
            kept = [k for k in kept if k.get("kind") not in ("step", "epoch", "eval")
                    or (_updates(k) or 0.0) <= resumed_at]
        kept.append(r)
    return kept


# Points kept per learning curve.  A curve is about 500 pixels wide in the 15-inch figure, so more
# show nothing more; a week-long server logs millions of steps, too many to hold.
CURVE_POINTS = 10_000


class _ThinnedCurve:
    """A curve's points as they stream in, at most ``cap`` of them, thinned evenly over the run.

    The points whose place in the stream is a multiple of ``stride`` are kept; at the cap the
    stride doubles, and half of them go.  Kept points rather than bucket means: what is drawn are
    values the run had (a mean would smooth the loss's noise away), a curve under the cap is drawn
    as logged, and a resumed server's lost updates drop out point by point (:meth:`drop_above`),
    as :func:`without_lost_updates` does.
    """

    def __init__(self, cap: int):
        self.cap = cap
        self.stride = 1
        self.seen = 0
        self.kept: list[tuple] = []      # (place in the stream, x, y, the record's update count or 0)

    def add(self, x: float, y: float, updates: float) -> None:
        if self.seen % self.stride == 0:
            self.kept.append((self.seen, x, y, updates))
            if len(self.kept) >= self.cap:
                self.stride *= 2
                self.kept = [point for point in self.kept if point[0] % self.stride == 0]
        self.seen += 1

    def drop_above(self, version: float) -> None:
        self.kept = [point for point in self.kept if point[3] <= version]

    def points(self) -> list[tuple]:
        return [(x, y) for _, x, y, _ in self.kept]


def _learning_curves(metrics_path: Path) -> tuple[list, list, list, bool]:
    """The (x, y) points of training loss vs updates, test accuracy (%) vs updates and vs
    seconds, read a record at a time: at most CURVE_POINTS each, whatever the file's length.
    The points of updates a resumed server lost and redid are left out (:func:`without_lost_updates`).
    The last item says whether the seconds are the training clock (a distributed run's ``eval``
    records' ``train_seconds``), else the run clock (``seconds``)."""
    curves = loss, acc_by_step, acc_by_time = tuple(_ThinnedCurve(CURVE_POINTS) for _ in range(3))
    training_clock = False
    for r in iter_metrics(metrics_path, growing=True):
        kind = r.get("kind")
        updates = _updates(r)
        resumed_at = _resumed_at(r)
        if resumed_at is not None:
            for curve in curves:
                curve.drop_above(resumed_at)
        elif kind == "step":
            value = finite_or_none(r.get("loss"))
            if updates is not None and value is not None:
                loss.add(updates, value, updates)
        elif kind in ("epoch", "eval"):
            acc = finite_or_none(r.get("test_accuracy", r.get("accuracy")))
            if acc is None:
                continue
            if updates is not None:
                acc_by_step.add(updates, 100 * acc, updates)
            # The training clock where there is one: the report's time to accuracy and summary.json's
            # evaluations count from the first batch, the run clock from the server's start (the
            # workers' loading included), so the plot put 95% seconds later than the report said.
            seconds = finite_or_none(r.get("train_seconds"))
            if seconds is not None:
                training_clock = True
            else:
                seconds = finite_or_none(r.get("seconds"))
            if seconds is not None:
                acc_by_time.add(seconds, 100 * acc, updates or 0.0)
    return loss.points(), acc_by_step.points(), acc_by_time.points(), training_clock


def _draw_learning_curves(Figure, out_dir: Path):
    metrics_path = out_dir / METRICS_FILE
    if not metrics_path.exists():
        return None
    loss, acc_by_step, acc_by_time, training_clock = _learning_curves(metrics_path)
    if not loss and not acc_by_step and not acc_by_time:
        return None

    # Fixed margins instead of a layout engine: constrained layout costs more
    # than the drawing itself, and these figures have a known shape.
    title = run_title(out_dir)
    fig = Figure(figsize=(15, 4.6 if title else 4.2))
    ax_loss, ax_step, ax_time = fig.subplots(1, 3)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13 * 4.2 / 4.6 if title else 0.13,
                        top=0.85 if title else 0.92, wspace=0.22)
    if title:
        fig.suptitle(title, fontsize=11)
    _curve(ax_loss, loss, "update", "training loss", "Training loss", log_y=True)
    _curve(ax_step, acc_by_step, "update", "test accuracy (%)", "Test accuracy vs updates", marker="o",
           percent=True)
    _curve(ax_time, acc_by_time, "seconds of training (from the first batch)" if training_clock
           else "seconds since start", "test accuracy (%)", "Test accuracy vs time", marker="o", percent=True)
    return fig


def _curve(ax, points, xlabel, ylabel, title, marker=None, log_y=False, percent=False):
    """``points`` (x, y) as a line; ``percent``: y is a test accuracy in %, x counts from the
    run's start (a single evaluation, one epoch, would otherwise get axes centred on it, reaching
    past 100% and, over a fraction of a second, with tick labels running into each other)."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not points:
        # why: an interrupted pscnn train's first epoch, scored only at its end, said just "no data"
        ax.text(0.5, 0.5, "no test evaluation in this run" if percent else "no training loss logged in this run",
                ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    xs, ys = zip(*sorted(points))
    if len(points) == 1:
        marker = marker or "o"                # a line through one point draws nothing: an empty panel
    ax.plot(xs, ys, marker=marker, markersize=4 if marker else None)
    if log_y and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")                  # a loss falling over decades: linear would hide the tail
    if percent:
        ax.set_xlim(left=0)
        ax.set_ylim(top=min(ax.get_ylim()[1], 100.5))
    if marker and len(points) <= 20:          # few evaluations: print the value at each
        (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
        for x, y in _spaced(xs, ys, (right - left) * LABEL_SPACING):
            # Kept inside the axes: centred above a point on an edge, a value was cut in half
            # or written over the tick labels ("13.80" read "3.80" at update 0).
            across = (x - left) / (right - left)
            below = (y - bottom) / (top - bottom) > 0.85
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, -6 if below else 6),
                        ha="left" if across < 0.15 else "right" if across > 0.85 else "center",
                        va="top" if below else "bottom", fontsize=8)


# Values printed on a curve at least this fraction of its x range apart: closer ones ran into each
# other ("99.1799.1699.16" over a run's last evaluations).
LABEL_SPACING = 0.12


def _spaced(xs, ys, gap: float) -> list[tuple]:
    """The points (x, y) to print a value at: the last one, and going back from it, each at least
    ``gap`` before the one printed after it."""
    kept = []
    for x, y in reversed(list(zip(xs, ys))):
        if not kept or kept[-1][0] - x >= gap:
            kept.append((x, y))
    return kept[::-1]


def _draw_confusion_matrix(Figure, out_dir: Path):
    summary_path = out_dir / SUMMARY_FILE
    if not summary_path.exists():
        return None
    with open(summary_path, encoding="utf-8") as fh:
        summary = json.load(fh)
    cm = summary.get("confusion_matrix") if isinstance(summary, dict) else None
    if not cm:
        return None
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion_matrix in {summary_path} is not square: shape {cm.shape}")
    k = cm.shape[0]
    title = run_title(out_dir)
    height = 0.9 + 0.62 * k + (0.3 if title else 0.0)
    fig = Figure(figsize=(1.6 + 0.62 * k, height))
    ax = fig.subplots()
    top = 1 - (0.75 if title else 0.45) / height          # inches above the matrix: its title, the run's
    fig.subplots_adjust(left=0.09, right=0.8, bottom=0.09, top=top)
    if title:
        fig.suptitle(title, fontsize=10)
    # Colour by row fraction, not raw count: classes differ in size, and the
    # question a confusion matrix answers is "where do class i's samples go".
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows != 0)
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    cax = fig.add_axes((0.83, 0.09, 0.025, top - 0.09))
    fig.colorbar(image, cax=cax, label="fraction of the true class")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    acc = finite_or_none(summary.get("test_accuracy"))
    ax.set_title("Confusion matrix" + (f" (test accuracy {100 * acc:.2f}%)" if acc is not None else ""))
    return fig


# ---------------------------------------------------------------- the workers' timeline
TIMELINE_PARTS = ("compute", "network", "server")
_TIMELINE_COLOURS = {"compute": "tab:blue", "network": "tab:orange", "server": "0.75"}
_TIMELINE_LABELS = {"compute": "computing (the worker's own measure)",
                    "network": "network and (de)serialization (the rest of the way)",
                    "server": "waiting on the server (a sync round, the ssp bound, no batch free yet, the update)"}


def _natural_order(name: str) -> list:
    """A sort key that puts worker-2 before worker-10 (digits compare as numbers)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


# A worker's pushes the server logged out of its answers' order by at most this many are still laid
# out in time order.  It logs them in the order they arrived, which is that order: the buffer is
# for a hand-made or merged file, and bounds what is held per worker.
PUSHES_REORDERED = 16


def _pushes(records):
    """The step records' ``timeline`` entries, one push at a time: ``(worker, answered, arrived,
    compute, session, order)``, each worker's in the order the server answered them (within
    PUSHES_REORDERED); ``session`` changes with a server's restart or the worker's rejoining,
    ``order`` is the push's place in the file."""
    servers = 0                         # "start" records so far: the server's incarnations
    joins: dict[str, int] = {}          # each worker's "join" records so far, by its id and by its name
    waiting: dict[str, list] = {}       # worker -> heap of (answered, order, arrived, compute, session)
    order = 0
    for r in records:
        kind = r.get("kind")
        if kind == "start":
            servers += 1
        elif kind == "join":
            # a timeline names the worker's id; one logged before 2026-11-29 named the worker
            for key in {r.get("id"), r.get("worker")}:
                if isinstance(key, str):
                    joins[key] = joins.get(key, 0) + 1
        if kind != "step":
            continue
        for entry in r.get("timeline") or ():
            if isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str) \
                    and all(is_number(v) for v in entry[1:]) and entry[1] <= entry[2]:
                worker, (answered, arrived, compute) = entry[0], (float(v) for v in entry[1:])
                heap = waiting.setdefault(worker, [])
                heapq.heappush(heap, (answered, order, arrived, compute, (servers, joins.get(worker, 0))))
                order += 1
                if len(heap) > PUSHES_REORDERED:
                    answered, place, arrived, compute, session = heapq.heappop(heap)
                    yield worker, answered, arrived, compute, session, place
    for worker, heap in waiting.items():
        while heap:
            answered, place, arrived, compute, session = heapq.heappop(heap)
            yield worker, answered, arrived, compute, session, place


def push_spans(answered: float, arrived: float, compute: float, previous_arrived: float | None) -> list:
    """One push's :func:`time_split` spans, those longer than 0: the wait on the server since
    ``previous_arrived`` (the worker's previous push's arrival; None where it has none since the
    server or the worker last started), then network, computation, network.  The server counts
    summary.json's ``worker_seconds`` with it as it applies each push, as timeline.png's title
    counts them from the step records."""
    spans = []
    if previous_arrived is not None and answered >= previous_arrived:
        spans.append((previous_arrived, answered, "server"))
    compute = min(compute, arrived - answered)
    travel = (arrived - answered - compute) / 2
    spans += [(answered, answered + travel, "network"), (answered + travel, arrived - travel, "compute"),
              (arrived - travel, arrived, "network")]
    return [span for span in spans if span[1] > span[0]]


def _worker_spans(records):
    """:func:`time_split`'s spans, one push at a time: ``(worker, spans, order)``, ``spans``
    :func:`push_spans`'; ``order`` the push's place in the file."""
    previous: dict[str, tuple] = {}     # worker -> (its last push's arrival, session)
    for worker, answered, arrived, compute, session, order in _pushes(records):
        # The answer to the previous push, unless the server restarted or the worker joined anew
        # in between: then the worker was gone (dead, restarting), not waiting on the server.
        last_arrived, last_session = previous.get(worker, (None, None))
        previous[worker] = (arrived, session)
        yield worker, push_spans(answered, arrived, compute, last_arrived if last_session == session else None), order


def time_split(records) -> dict:
    """Each worker's cycles from the step records' ``timeline`` entries, split in three.

    A worker's cycle runs from one answer of the server to the next, by the
    server's clock.  From the answer to its push's arrival the worker computed
    (``compute_s``, its own measure) and its messages travelled (the rest,
    ``network``); from the arrival to the next answer it waited on the server
    (``server``: a sync round, ssp's bound, no batch free yet, the update).  Returns
    ``{worker: [(start, end, part), ...]}`` in time order, parts in
    TIMELINE_PARTS; the network time is drawn half before the computation and
    half after.  The server stamps an answer before sending it and a push when
    it reads it, so each window holds the computation (one clock on one
    machine; the tests check it).  With ``--overlap`` a worker computes while
    a push travels: there the computation fills its window, and the split is
    approximate.  A server's restart (a ``"start"`` record) or the worker's
    rejoining (its ``"join"``) ends a worker's chain of cycles: the time
    between is left blank, not counted as waiting.  Every push is held: the
    plots read a long run's file with :class:`_TimelineTally` instead.
    """
    split: dict[str, list] = {}
    for worker, spans, _ in _worker_spans(records):
        split.setdefault(worker, []).extend(spans)
    return split


def time_shares(split: dict) -> dict:
    """``{part: fraction}`` of all the workers' time in :func:`time_split`'s spans."""
    totals = dict.fromkeys(TIMELINE_PARTS, 0.0)
    for spans in split.values():
        for start, end, part in spans:
            totals[part] += end - start
    return _shares(totals)


def _shares(totals: dict) -> dict:
    whole = sum(totals.values())
    return {part: (t / whole if whole else 0.0) for part, t in totals.items()}


class _TimelineTally:
    """What the timeline's title and rows need of every worker's spans, counted in one pass over
    metrics.jsonl: the whole run's time per part, and per worker (by id) its spans' and computations'
    count, first start, last end and first push's place in the file, and its row's label.  A few
    numbers a worker, whatever the run's length (:func:`time_split` holds every span)."""

    def __init__(self, metrics_path: Path):
        self.totals = dict.fromkeys(TIMELINE_PARTS, 0.0)
        self.workers: dict[str, dict] = {}
        names: dict[str, str] = {}      # worker id -> name, from the "join" records

        def noting_names(records):
            for r in records:
                if r.get("kind") == "join" and isinstance(r.get("id"), str) and isinstance(r.get("worker"), str):
                    names[r["id"]] = r["worker"]
                yield r
        for worker, spans, order in _worker_spans(noting_names(iter_metrics(metrics_path, growing=True))):
            tally = self.workers.setdefault(worker, {"spans": 0, "computes": 0, "order": order})
            tally["order"] = min(tally["order"], order)
            if spans:
                tally.setdefault("first", spans[0][0])
                tally["last"] = spans[-1][1]
            tally["spans"] += len(spans)
            tally["computes"] += sum(part == "compute" for _, _, part in spans)
            for start, end, part in spans:
                self.totals[part] += end - start
        # A worker whose pushes all took no time (as stamped) has nothing to draw.
        self.workers = {worker: tally for worker, tally in self.workers.items() if tally["spans"]}
        # Each row by the worker's name; by its id (NAME-xxxxxxxx) where workers share the name
        # (two started with the same --name, or one restarted): they were one row, their pushes mixed.
        shared = Counter(names.get(worker, worker) for worker in self.workers)
        self.labels = {worker: worker if shared[names.get(worker, worker)] > 1 else names.get(worker, worker)
                       for worker in self.workers}


def worker_time_shares(worker_seconds) -> dict | None:
    """The whole run's split of its workers' time, as timeline.png's title gives it: ``{part:
    fraction}`` over TIMELINE_PARTS, from summary.json's ``worker_seconds`` (the server's running
    totals: reading metrics.jsonl took 31 s for a million step records).  None where there is
    nothing to split: no such totals (a summary from before them, or of a run resumed from a
    checkpoint from before them), no push counted."""
    if not isinstance(worker_seconds, dict):
        return None
    totals = {part: finite_or_none(worker_seconds.get(part)) for part in TIMELINE_PARTS}
    if any(t is None or t < 0 for t in totals.values()) or not sum(totals.values()):
        return None
    return _shares(totals)


def time_shares_text(shares: dict) -> str:
    """``81% computing, 9% network, 10% waiting on the server``: :func:`worker_time_shares` in words."""
    return (f"{100 * shares['compute']:.0f}% computing, {100 * shares['network']:.0f}% network, "
            f"{100 * shares['server']:.0f}% waiting on the server")


def _draw_timeline(Figure, out_dir: Path, max_workers: int = 16, cycles_shown: int = 12):
    metrics_path = out_dir / METRICS_FILE
    if not metrics_path.exists():
        return None
    # Three passes over the file, each holding a few numbers a worker: the whole run's counts,
    # the busiest worker's computations in the stretch shown, and the spans in that stretch.
    tally = _TimelineTally(metrics_path)
    if not tally.workers:
        return None
    # A stretch from the middle of the run, about cycles_shown of the busiest worker's cycles long
    # (the first of the most: the order the file names them in).
    busiest = max(tally.workers, key=lambda w: (tally.workers[w]["spans"], -tally.workers[w]["order"]))
    first, last, computes = (tally.workers[busiest][key] for key in ("first", "last", "computes"))
    shown = [first]
    if computes:
        pushes = _worker_spans(iter_metrics(metrics_path, quiet=True, growing=True))
        busiest_computes = (start for worker, spans, _ in pushes if worker == busiest
                            for start, _, part in spans if part == "compute")
        shown = list(itertools.islice(busiest_computes, computes // 2, computes // 2 + cycles_shown + 1))
    # The typical cycle there, not the run's mean: a server's restart or a worker's absence
    # would stretch the mean, and a slower start of the run the median over all of it, to far
    # more cycles than make readable bars.
    cycle = float(np.median(np.diff(shown))) if len(shown) > 1 else last - first
    t0 = max(first, shown[0] - 0.1 * cycle)
    t1 = min(last, t0 + cycles_shown * cycle)
    if t1 <= t0:
        t0, t1 = first, last
    workers = sorted(tally.workers, key=lambda worker: _natural_order(tally.labels[worker]))[:max_workers]
    bars = {(worker, part): [] for worker in workers for part in TIMELINE_PARTS}
    for worker, spans, _ in _worker_spans(iter_metrics(metrics_path, quiet=True, growing=True)):
        for s, e, p in spans:
            if e > t0 and s < t1 and (worker, p) in bars:
                bars[worker, p].append((max(s, t0), min(e, t1) - max(s, t0)))
    height = 1.8 + 0.4 * len(workers)                    # inches: 1.0 below the bars, 0.8 above
    fig = Figure(figsize=(12, height))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.1, right=0.98, bottom=1.0 / height, top=1 - 0.8 / height)
    for row, worker in enumerate(workers):
        drawn = 0
        for part in TIMELINE_PARTS:
            drawn += len(bars[worker, part])
            ax.broken_barh(bars[worker, part], (row - 0.35, 0.7), color=_TIMELINE_COLOURS[part],
                           label=_TIMELINE_LABELS[part] if row == 0 else None)
        if not drawn:       # one that joined later, or had left (killed): an empty row would not say so
            ax.text(t0 + 0.01 * (t1 - t0), row, f"no push in this stretch; its pushes span "
                    f"{tally.workers[worker]['first']:.2f}-{tally.workers[worker]['last']:.2f} s",
                    va="center", fontsize=8, color="0.4")
    ax.set_yticks(range(len(workers)))
    ax.set_yticklabels([tally.labels[worker] for worker in workers])
    ax.set_ylim(len(workers) - 0.5, -0.5)
    ax.set_xlim(t0, t1)
    ax.set_xlabel("seconds since the run started (the server's clock)")
    shares = _shares(tally.totals)
    mode = _summary_field(out_dir, "mode")
    more = f"; {len(tally.workers) - len(workers)} more workers not shown" if len(tally.workers) > len(workers) else ""
    ax.set_title(f"What each worker did, {t0:.2f}-{t1:.2f} s" + (f" (mode {mode})" if mode else "") +
                 f"\nthe whole run: {time_shares_text(shares)}{more}", fontsize=10)
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def _summary(out_dir: Path) -> dict | None:
    try:
        with open(out_dir / SUMMARY_FILE, encoding="utf-8") as fh:
            summary = json.load(fh)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _summary_field(out_dir: Path, key: str):
    summary = _summary(out_dir)
    return summary.get(key) if summary is not None else None


def run_title(out_dir: Path) -> str | None:
    """Which run a plot is of, from its summary.json: ``async-run: mode async, 2 workers, model
    light``, ``train2: pscnn train, model light``, then the status of a run that did not complete
    (``diverged``, ``interrupted``).  Without it a sync and an async run's curves, shown side by
    side, looked alike.  None where there is no summary.json to read."""
    summary = _summary(out_dir)
    if summary is None:
        return None
    mode, workers, model, status = (summary.get(key) for key in ("mode", "workers", "model", "status"))
    if isinstance(mode, str):
        bound = summary.get("staleness_bound")
        parts = [f"mode {mode}" + (f" (staleness bound {bound})" if mode == "ssp" and is_number(bound) else "")]
        if isinstance(workers, int):
            parts.append(f"{workers} {for_count(workers, 'worker')}")
    else:
        parts = ["pscnn train"]
    if isinstance(model, str):
        parts.append(f"model {model}")
    if isinstance(status, str) and status != "complete":
        parts.append(status)
    return f"{Path(out_dir).resolve().name}: " + ", ".join(parts)
