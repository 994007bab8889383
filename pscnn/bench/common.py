"""Shared pieces of the benchmarks: environment, machine facts, statistics, outputs.

Nothing here imports numpy at module load, so ``pscnn --help`` stays fast.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager, redirect_stderr
from io import StringIO
from pathlib import Path

from cnn_core.text import for_count
from pscnn.cli import MAX_FLOAT, MAX_INT, _int_in, _path, add_switch, cap_text, check_run_folder

# Set on the build machines; they halve numpy's sgemm speed.  A user's machine has neither,
# so benchmarks drop them for every process they start unless --keep-openblas-env.
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# The update every throughput benchmark makes, in the single-process baseline and on the
# server alike: momentum SGD at a constant rate (its cost does not depend on the values).
# Gentle, because async points run stale: with --overlap, 3-4 versions at 2 workers and
# 7-10 at 4. At lr 0.05 / momentum 0.9 one 2-worker trial in four diverged, and at 0.01 /
# 0.9 a 4-worker one did; the server then stops training and the point is lost.
THROUGHPUT_LR = 0.01
THROUGHPUT_MOMENTUM = 0.5


def add_output_flags(p, name: str, keep_logs: bool = False) -> None:
    """The flags every bench shares: where results go, plots, progress, the OPENBLAS_* overrides.

    ``--out`` takes the main CLI's path type: an empty value would silently mean the current folder.
    """
    p.add_argument("--out", type=_path, default=f"runs/bench-{name}",
                   help=f"output folder; what an earlier run of this bench left there is replaced, nothing else "
                        f"(default: runs/bench-{name})")
    if keep_logs:
        add_switch(p, "--keep-logs", help="keep every point's run folder and logs")
    add_switch(p, "--no-plots", help="write no PNG plots (the tables alone)")
    add_switch(p, "--no-progress", help="show no progress bar")
    add_switch(p, "--keep-openblas-env",
               help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE for the processes started")


# Most synthetic clients (sockets) one `pscnn bench server` point opens: the server's default
# --max-workers, which caps the other benchmarks' workers.  99,999,999 of them hung the bench.
MAX_BENCH_PEERS = 1024


def description(doc: str) -> str:
    """A bench module's ``--help`` description: its docstring's first paragraph, without reST markup."""
    return doc.split("\n\n")[0].replace("``", "")


def bench_peers(text: str) -> int:
    """A flag's count of synthetic clients (argparse type): 1 to :data:`MAX_BENCH_PEERS`."""
    return _int_in(text, 1, MAX_BENCH_PEERS)


def parse_list(text: str, kind=int, what: str = "value", low=None, choices=None, high=None) -> list:
    """``"1,2,4"`` -> [1, 2, 4]; a clear error on garbage, a number under ``low`` or
    over ``high`` (by default the cap of a flag of its kind, ``pscnn.cli.MAX_INT`` /
    ``MAX_FLOAT``; NaN and inf too), a value not in ``choices``, or one given twice (its
    point measured twice a trial, listed twice in the tables)."""
    high = {int: MAX_INT, float: MAX_FLOAT}.get(kind) if high is None else high
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = kind(part)
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not a valid {kind.__name__}") from None
        if low is not None and not value >= low:
            raise ValueError(f"{what}: every value must be >= {low}, got {part}")
        if high is not None and not value <= high:
            raise ValueError(f"{what}: every value must be at most {cap_text(high)}, got {part}")
        if choices is not None and value not in choices:
            raise ValueError(f"{what}: {part!r} is not one of {', '.join(choices)}")
        if value in out:
            raise ValueError(f"{what}: {part} is given twice")
        out.append(value)
    if not out:
        raise ValueError(f"{what}: empty list")
    return out


def bench_env(threads: int = 1, keep_openblas: bool = False, base: dict | None = None) -> dict:
    """Environment for a process a benchmark starts: BLAS threads pinned, OPENBLAS_* overrides dropped."""
    env = dict(os.environ if base is None else base)
    for var in BLAS_THREAD_VARS:
        env[var] = str(threads)
    if not keep_openblas:
        for var in OPENBLAS_VARS:
            env.pop(var, None)
    env["PYTHONUNBUFFERED"] = "1"
    # the children must import this checkout's packages whatever their working folder
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def machine_info(keep_openblas: bool = False) -> dict:
    """What the numbers were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    info = {"cpu_count": os.cpu_count(), "usable_cores": usable, "cpu_model": model,
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average_at_start": [round(v, 2) for v in load] if load else None,
            "openblas_env_dropped": not keep_openblas and any(v in os.environ for v in OPENBLAS_VARS),
            "openblas_env_present": {v: os.environ[v] for v in OPENBLAS_VARS if v in os.environ},
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import numpy  # noqa: PLC0415
        import zmq  # noqa: PLC0415
        info.update(numpy=numpy.__version__, pyzmq=zmq.__version__, libzmq=zmq.zmq_version())
    except ImportError:
        pass
    return info


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def median(values) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(statistics.median(vals)) if vals else None


def percentile(values, q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]."""
    vals = sorted(values)
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(vals) - 1)
    return float(vals[lo] + (vals[hi] - vals[lo]) * (pos - lo))


def proc_cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """user + system CPU seconds of a process (all its threads), or of its thread ``tid``
    (a process's main thread has ``tid == pid``), from /proc; None elsewhere."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of the whole machine since boot, summed over cores, from
    /proc/stat (idle and iowait count as not busy); None elsewhere.  Two samples tell how
    busy the machine was in between (:func:`busy_fraction`): whether a benchmark ran out
    of cores."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
        total = sum(ticks[:8])                 # user nice system idle iowait irq softirq steal
        return total - ticks[3] - ticks[4], total
    except (OSError, IndexError, ValueError):
        return None


def busy_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU time busy between two :func:`machine_cpu_ticks` samples,
    in [0, 1] (the kernel's iowait count can step back); None without both or with no tick between."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return min(1.0, max(0.0, (after[0] - before[0]) / (after[1] - before[1])))


# --------------------------------------------------------------------------- checks and failures

def reference_limit(seconds: float) -> float:
    """Wall seconds a reference run (the baseline, DDP) measuring ``seconds`` may take, its start-up
    (imports, MNIST) and a loaded machine included, before it counts as failed."""
    return 4 * seconds + 120


class OptionError(ValueError):
    """A bad option, found before a benchmark starts anything: one line, exit status 2."""


class BenchError(RuntimeError):
    """A process a benchmark started failed: one line naming it and its last log line, exit status 1."""


@contextmanager
def checking_options():
    """Every error raised inside is a bad option value (exit 2), whichever check found it: the main
    CLI's (CliError), the engine's (SpecError, ConfigError, DataError) or a run folder's (RunLogError)."""
    from cnn_core.errors import PscnnError  # noqa: PLC0415  (numpy loads after the flags)
    from pscnn.cli import CliError  # noqa: PLC0415
    try:
        yield
    except (CliError, PscnnError) as exc:
        raise OptionError(one_line(exc)) from None


def check_out(path) -> None:
    """The main CLI's check of a run folder flag: ``--out`` must not be a file (mkdir would only say
    "File exists").  RunLogError; inside :func:`checking_options` an OptionError."""
    check_run_folder("--out", str(path))


def check_server_flags(flags: list[str], workers: int | None = None) -> None:
    """What ``pscnn server`` would refuse in ``flags`` (and with ``workers`` trainers), found before
    anything starts.

    The flags go through the main CLI's own parser (no PSCNN_<FLAG> variables:
    the servers a benchmark starts do not see them either); then ``pscnn run``'s
    own checks (:func:`pscnn.launcher.check_run_args`: the trainers against
    ``--max-workers``, the optimizer, the model), and a
    :class:`server.server.ParameterServer` is constructed, which checks the
    mode, the model spec (and that it fits MNIST), the optimizer and its
    schedule exactly as the real server does, without binding a socket or
    writing anything.  CliError, SpecError or ConfigError.
    """
    from pscnn.cli import CliError, parse_args  # noqa: PLC0415
    from pscnn.launcher import check_run_args  # noqa: PLC0415
    from server.config import config_from_args  # noqa: PLC0415
    from server.server import ParameterServer  # noqa: PLC0415
    err = StringIO()
    try:
        with redirect_stderr(err):              # argparse prints a usage block, then exits
            args = parse_args(["server", *flags], environ={})
    except SystemExit:
        raise CliError(last_line(err.getvalue()) or f"pscnn server refuses the flags {flags}") from None
    if workers is not None:
        args.workers = workers
        # its config: resolved twice, a schedule's warning came twice; the model is built by the server below
        cfg, _ = check_run_args(args, server_follows=True)
    else:
        cfg = config_from_args(args)
    ParameterServer(cfg)


def check_mnist(mnist_dir: str | None, splits) -> None:
    """The MNIST ``splits`` (``"train"``, ``"test"``) are there, checked as a worker and the evaluator
    check them before they connect (:func:`worker.trainer.check_local_setup`): a missing folder or
    file is one line (DataError) here, not a run whose workers all die.  Downloads into the cache
    when no folder is given and the cache lacks them, as the workers would."""
    from worker.trainer import check_local_setup  # noqa: PLC0415
    for split in splits:
        check_local_setup("cpu", mnist_dir, split)


def last_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of a log (what a failed process said last), at most ``limit`` characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def one_line(exc) -> str:
    """An error's message as one line: a multi-line one (a heading, then a log tail) becomes
    its first line and the log's last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    head = lines[0].rstrip(":")
    return f"{head}: {last_line(lines[-1])}"


def measurement_failures() -> tuple[type[Exception], ...]:
    """What fails one measurement (a point, a baseline, a run), to be kept as a failed row while the
    others go on: a process it started failed or timed out (RuntimeError: BenchError, wait_for's),
    pscnn refused something on the way (PscnnError: a foreign service answering the status request,
    a point's folder that cannot be written), or writing its files failed (OSError: a full disk)."""
    from cnn_core.errors import PscnnError  # noqa: PLC0415  (numpy loads after the flags)
    return RuntimeError, PscnnError, OSError


def point_failed(bench: str, what: str, exc: Exception) -> dict:
    """The row of a failed measurement (a point, a baseline, a reference run): said on stderr in one
    line, kept with its error, so that the others are not lost."""
    print(f"\npscnn bench {bench}: {what}: {one_line(exc)}", file=sys.stderr)
    return {"error": one_line(exc)}


def check_measured(rows: list[dict], csv_path: Path, what: str = "point") -> None:
    """BenchError if every ``what`` (the rows of what the benchmark measures, not its references)
    failed: nothing was measured, not a result (the rows, with their errors, are in ``csv_path``)."""
    failed = [r for r in rows if "error" in r]
    if rows and len(failed) == len(rows):
        raise BenchError(f"every {what} failed ({len(rows)} of {len(rows)}; rows in {csv_path}); "
                         f"the first: {failed[0]['error']}")


def process_failed(what: str, code, log_text: str, logs: Path | None = None) -> BenchError:
    """The one-line error for a process that exited with ``code``: ``what``, the code, its last log
    line, and where its whole log is (when it is kept)."""
    from pscnn.launcher import exit_text  # noqa: PLC0415  (loads the server's modules)
    said = last_line(log_text)
    return BenchError(exit_text(what, code) + (f": {said}" if said else " and logged nothing")
                      + (f" (logs in {logs})" if logs is not None else ""))


# Ports a measurement that picks its port tries (pscnn bench server's servers, torch DDP's rank 0):
# pscnn.launcher.free_port() finds one free, but another process may take it before the measurement's
# server binds it; the measurement then runs again on another.  A LocalCluster's server binds a free
# port itself (LocalCluster.start_server), so scaling's and time-to-accuracy's runs need no retry.
PORT_ATTEMPTS = 3


class PortTaken(BenchError):
    """A server a benchmark started could not bind the port found free for it: another process took
    it in between.  Not the measurement's failure: :func:`on_a_free_port` runs it again."""


def server_failed(what: str, code, log_text: str, endpoint: str, logs: Path | None = None) -> BenchError:
    """:func:`process_failed` for a server started on ``endpoint``; a :class:`PortTaken` when its log
    says that port was in use (as :func:`pscnn.protocol.bind` words it)."""
    import errno  # noqa: PLC0415

    import zmq  # noqa: PLC0415
    if f"cannot bind {endpoint}: {zmq.strerror(errno.EADDRINUSE)}" in log_text:    # its logs go with the retry
        return PortTaken(str(process_failed(what, code, log_text)))
    return process_failed(what, code, log_text, logs)


def on_a_free_port(measure, bench: str, what: str):
    """``measure()``, run again (on the new port it picks) each time its server found its port taken
    (:class:`PortTaken`), at most :data:`PORT_ATTEMPTS` times in all; each retry is said in one line
    on stderr.  When every port was taken, a BenchError: the measurement failed."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        try:
            return measure()
        except PortTaken as exc:
            if attempt == PORT_ATTEMPTS:
                raise BenchError(f"{one_line(exc)} (the port of each of {PORT_ATTEMPTS} tries was taken "
                                 "before its server bound it)") from None
            print(f"\npscnn bench {bench}: {what}: {one_line(exc)}; measuring it again on another port "
                  f"(try {attempt + 1} of {PORT_ATTEMPTS})", file=sys.stderr)


class Interruption:
    """Ctrl-C (or SIGTERM) while a benchmark measures, caught by ``with``: the measurement under way
    is lost (its own ``finally`` stops its processes), while those done before are still written and
    reported instead of being thrown away with it.  ``happened`` says whether it came."""

    def __init__(self):
        self.happened = False

    def __enter__(self) -> Interruption:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        self.happened = kind is not None and issubclass(kind, KeyboardInterrupt)
        return self.happened


def interrupted_status(bench: str, done: int, total: int, csv_path: Path, json_path: Path) -> int:
    """The last line of a benchmark interrupted (:class:`Interruption`) after ``done`` of its ``total``
    measurements, written; its exit status, 130 as pscnn's commands."""
    print(f"pscnn bench {bench}: interrupted after {done} of {total} {for_count(total, 'measurement')}, "
          f"written to {csv_path} and {json_path} (no plots)", file=sys.stderr)
    return 130


# --------------------------------------------------------------------------- outputs

def check_writable(parser, flag: str, path: str) -> None:
    """A usage error (exit 2) from ``parser`` unless a file can be written at ``path``: a script's
    output file (--json) is checked before it measures, not after, its results lost."""
    folder = os.path.dirname(os.path.abspath(path))
    if not path.strip():
        parser.error(f"argument {flag}: must name a file, got an empty string")
    if os.path.isdir(path):
        parser.error(f"argument {flag}: {path} is a folder, not a file")
    if not os.path.isdir(folder):
        parser.error(f"argument {flag}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        parser.error(f"argument {flag}: {path} cannot be written")


def output_folder(path) -> Path:
    """A benchmark's ``--out`` folder, made if needed; one line (RunLogError) if it cannot be."""
    from cnn_core.runlog import make_folder  # noqa: PLC0415  (numpy loads after the flags)
    check_out(path)
    return make_folder(path)


def data_files(name: str) -> tuple[str, str]:
    """The names of a benchmark's table (one row per measurement) and JSON (meta + rows)."""
    return f"{name}.csv", f"{name}.json"


# The lock of the --out folder a benchmark writes (pscnn run's and train's, cnn_core.runlog's), from
# fresh_output_folder until the benchmark ends (release_output_folder, in run_bench_from_args).
_held_locks: list = []


def fresh_output_folder(path, bench: str, files: Sequence[str], logs: str | None = None,
                        log_folder: re.Pattern | None = None) -> Path:
    """:func:`output_folder`, locked for this benchmark as pscnn run and train lock theirs (another
    process writing it: RunLogError, one line), and without what an earlier run of this benchmark
    left there: its ``files``, and under ``logs`` the folders whose whole names ``log_folder``
    matches (a point's or run's logs, kept by --keep-logs or by a failure).  A plot, profile or
    log this run does not make again (--no-plots, no --profile, other points, a failed or
    interrupted run) would pass for this run's.  Said in one line on stderr; nothing else in the
    folder is touched.  RunLogError (one line) if one cannot be removed."""
    import shutil  # noqa: PLC0415

    from cnn_core.runlog import RunLogError, lock_folder  # noqa: PLC0415
    out = output_folder(path)
    lock = lock_folder(out)            # before anything in it is removed or written
    if lock is not None:
        _held_locks.append(lock)
    earlier = [out / name for name in files if (out / name).is_file()]
    folders = []
    if logs is not None and (out / logs).is_dir():
        folders = sorted(p for p in (out / logs).iterdir() if p.is_dir() and log_folder.fullmatch(p.name))
    try:
        for p in earlier:
            p.unlink()
        for p in folders:
            shutil.rmtree(p)
    except OSError as exc:
        raise RunLogError(f"{exc.filename}: cannot remove what an earlier run of pscnn bench {bench} left there: "
                          f"{exc.strerror or exc}") from None
    if earlier or folders:
        print(f"pscnn bench {bench}: removed what an earlier run of it left in {out}: "
              + ", ".join([p.name for p in earlier]
                          + ([f"{len(folders)} {for_count(len(folders), 'folder')} of logs in {logs}/"]
                             if folders else [])), file=sys.stderr)
    return out


def remove_if_empty(folder: Path) -> None:
    """Remove a benchmark's folder of logs (points/, runs/) once the run is over, if nothing in it
    was kept (--keep-logs, a failed point's logs): an empty one was left in --out."""
    try:
        folder.rmdir()
    except OSError:             # logs kept there, or no point ever made it
        pass


def release_output_folder() -> None:
    """Let go of the --out folder :func:`fresh_output_folder` locked: the benchmark has ended."""
    while _held_locks:
        _held_locks.pop().close()


def write_outputs(out: Path, name: str, rows: list[dict], meta: dict) -> tuple[Path, Path]:
    """``out/<name>.csv`` (one row per measurement) and ``out/<name>.json`` (meta + rows)."""
    output_folder(out)
    csv_path, json_path = (out / file for file in data_files(name))
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _csv_value(row.get(k)) for k in columns})
    with open(json_path, "w") as fh:
        json.dump({**meta, "rows": rows}, fh, indent=2, default=_json_default)
        fh.write("\n")
    return csv_path, json_path


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return "" if v is None else v


def _json_default(obj):
    try:
        return float(obj)
    except (TypeError, ValueError):
        return str(obj)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (plots skipped with a notice)."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
        return plt
    except ImportError:
        print("pscnn bench: matplotlib is not installed; no plots (pip install matplotlib, pscnn's plot extra)",
              file=sys.stderr)
        return None


def plain_log_ticks(axis) -> None:
    """Label a log ``axis`` (set to log first) as plain numbers: 0.6, 2, 1,000, not 6x10^-1.

    The ticks matplotlib labels stay its own (a minor tick only over less than a decade), so a
    range of decades is not crowded; only the wording changes: over less than a decade it wrote
    every tick as a power of ten, "3x10^0, 4x10^0", hard to read across a room.
    """
    from matplotlib.ticker import LogFormatterSciNotation  # noqa: PLC0415  (only reached when pyplot() succeeded)

    class PlainLogFormatter(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            if not super().__call__(x, pos):      # a tick matplotlib leaves unlabelled
                return ""
            return f"{x:,.0f}" if x >= 1 and x == round(x) else f"{x:g}"
    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def save_figure(fig, path: Path) -> Path:
    """Lay out, write and close a matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt  # noqa: PLC0415  (only reached when pyplot() succeeded)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def print_written(csv_path: Path, json_path: Path, plots: list[Path], others: list[Path] = ()) -> None:
    """A benchmark's last line: the files it wrote, ``others`` (a summary, a profile) beside its
    tables, its plots named only when it made some (not with --no-plots or without matplotlib: an
    older run's PNGs in --out are not this run's)."""
    print(f"\nwrote {', '.join([str(csv_path), str(json_path), *(p.name for p in others)])}"
          + (f" and {', '.join(p.name for p in plots)}" if plots else ""))


def progress(total: int | None, desc: str, disable: bool = False):
    from tqdm import tqdm  # noqa: PLC0415
    # disable=None: drawn only when stderr is a terminal (as pscnn train's), not into a pipe or log file
    return tqdm(total=total, desc=desc, disable=True if disable else None, dynamic_ncols=True, file=sys.stderr,
                leave=True)


def fmt(v, spec: str = ",.0f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def print_table(headers: list[str], rows: list[list]) -> None:
    """A plain aligned text table, on stdout."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(widths[i]) if i else c.ljust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


# --------------------------------------------------------------------------- server logs

def _records(metrics_path: Path, kind: str) -> list[dict]:
    """The server's records of ``kind`` in its metrics.jsonl; none if there is no file.  A torn
    last line (a killed server) is skipped without a word."""
    from cnn_core.runlog import iter_metrics  # noqa: PLC0415  (imports numpy: not at module load)
    try:
        return list(iter_metrics(metrics_path, kinds=(kind,), quiet=True))
    except OSError:
        return []


def step_records(metrics_path: Path) -> list[dict]:
    return _records(metrics_path, "step")


def eval_records(metrics_path: Path) -> list[dict]:
    return _records(metrics_path, "eval")

