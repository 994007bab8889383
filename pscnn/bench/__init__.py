"""``pscnn bench``: benchmarks of scaling with workers, server capacity and time to accuracy.

    pscnn bench scaling           throughput / efficiency vs workers (real or --compute-ms synthetic),
                                  with the single-process baseline and PyTorch DDP in the same run
    pscnn bench server            server capacity under synthetic no-compute clients, vs a raw
                                  pyzmq zero-copy echo of the same payload
    pscnn bench time-to-accuracy  wall time and images to reach a test accuracy, 1/2/4 workers

Every benchmark writes ``<name>.csv``, ``<name>.json`` and PNG plots into
``--out`` (refused in one line while another process writes that folder, as by
pscnn run and train), first removing what an earlier run of it left there (its files, and
its folders of kept logs; the folder's other files stay, and the removal is said
in one line: a plot or profile this run does not make again would pass for its
own).  It shows a progress bar, and runs for a bounded time (``--seconds`` per
point x points x ``--trials``; time-to-accuracy: ``--max-seconds`` per run).  Bad
options are found before anything starts (one line, exit 2); a server or worker
that fails anyway is reported in one line, with its last log line, never as a
traceback, and the other points are still measured and written (exit 1:
time-to-accuracy when a run failed, the others when every point of pscnn did,
whatever its references').  A server that finds its port taken (another process
took it after it was found free) is not a failed point: the point is measured
again on another port, said in one line, up to 3 tries in all.  Ctrl-C (or
SIGTERM) stops the measurement under way and its processes; those done before are
still written and reported (no plots), and the last line says so (exit 130).  The
processes a benchmark starts run without the OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE
overrides of the build machines (they halve numpy's sgemm speed) unless
``--keep-openblas-env``.

This module imports only argparse-level code: ``pscnn --help`` stays fast.
"""
from __future__ import annotations

import sys


def add_bench_parsers(parser) -> None:
    from . import scaling, server_bench, tta  # noqa: PLC0415  (argparse only)
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    scaling.add_parser(sub)
    server_bench.add_parser(sub)
    tta.add_parser(sub)


def run_bench_from_args(args) -> int:
    from . import scaling, server_bench, tta  # noqa: PLC0415
    runner = {"scaling": scaling.run, "server": server_bench.run, "time-to-accuracy": tta.run}.get(args.bench)
    if runner is None:
        print(f"pscnn bench: unknown benchmark {args.bench!r}", file=sys.stderr)
        return 2
    _terminate_cleanly()
    from cnn_core.errors import PscnnError  # noqa: PLC0415

    from pscnn.cli import inline_config_files  # noqa: PLC0415

    from .common import checking_options, one_line, release_output_folder  # noqa: PLC0415
    try:
        with checking_options():        # a bad --model or --schedule file is a bad option, as its JSON inline is
            inline_config_files(args)
        return int(runner(args) or 0)
    except ValueError as exc:           # a bad list or option value (OptionError: any check made up front)
        print(f"pscnn bench {args.bench}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (RuntimeError, PscnnError, OSError) as exc:     # a process it started failed, a timeout, a full disk
        print(f"pscnn bench {args.bench}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        release_output_folder()


def _terminate_cleanly() -> None:
    """SIGTERM (and SIGINT, even where a background shell ignores it) unwind through the ``finally``
    blocks, so the servers and workers a benchmark started are stopped, not orphaned."""
    import signal  # noqa: PLC0415

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, on_signal)
        except ValueError:              # not the main thread
            pass
