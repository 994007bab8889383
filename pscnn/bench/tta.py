"""``pscnn bench time-to-accuracy``: wall time and images seen to reach a test accuracy.

For every mode and worker count, a real run on this machine: ``pscnn server``,
N ``pscnn worker`` processes and an evaluator that scores the newest weights
every ``--eval-every`` seconds.  The run is stopped as soon as a score reaches
``--target`` (or the epochs end, or ``--max-seconds`` pass).  From the
server's ``metrics.jsonl``:

* the first evaluated version whose test accuracy reaches the target, v*;
* its time: when the server produced v* (its step record), counted from the
  first update applied, so worker start-up (loading MNIST) is not included;
* images seen: the samples applied up to v*.

The evaluator samples versions every few seconds, so times are upper bounds
by up to ``--eval-every`` plus one evaluation; it runs at nice +10, as in
``pscnn run``, but on a 2-core machine it still takes some CPU from workers.
"""
from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

from cnn_core.text import for_count
from pscnn.cli import (DEFAULT_LR, DEFAULT_STALENESS, MEMORY_CHECK_HELP, MODES, _path, add_switch, fraction, given_flag,
                       non_negative_float, non_negative_int, positive_float, positive_int)

from .common import (BenchError, Interruption, OptionError, add_output_flags, check_mnist, check_out,
                     check_server_flags, checking_options, cores, data_files, description, eval_records, fmt, fresh_output_folder,
                     interrupted_status, machine_info, measurement_failures, median, one_line,
                     parse_list, print_table, print_written, process_failed, progress, pyplot, remove_if_empty,
                     save_figure, step_records, write_outputs)

NAME = "time_to_accuracy"
# What a run writes into --out (the plot with matplotlib, without --no-plots), and the folder of each
# run under RUNS (--keep-logs, a failed run): an earlier run's go at the start.
PLOT = f"{NAME}.png"
OUTPUTS = (*data_files(NAME), PLOT)
RUNS = "runs"
RUN_FOLDER = re.compile(rf"({'|'.join(MODES)})-n\d+-t\d+")       # see run()


def add_parser(sub) -> None:
    p = sub.add_parser("time-to-accuracy", help="wall time and images to reach a test accuracy",
                       description=description(__doc__))
    p.add_argument("--target", type=fraction, default=0.99, help="test accuracy to reach (default: 0.99)")
    p.add_argument("--workers", default="1,2,4", help="worker counts (default: 1,2,4)")
    p.add_argument("--mode", default="sync,async", help="modes (default: sync,async)")
    p.add_argument("--staleness", type=non_negative_int, default=None,
                   help=f"ssp runs: pushes a worker may run ahead of the slowest (default: {DEFAULT_STALENESS})")
    p.add_argument("--batch", type=positive_int, default=64, help="batch size per worker step (default: 64)")
    p.add_argument("--epochs", type=positive_int, default=5, help="most epochs per run (default: 5)")
    p.add_argument("--max-seconds", type=positive_float, default=600.0, help="most seconds per run (default: 600)")
    p.add_argument("--eval-every", type=positive_float, default=3.0, help="seconds between evaluations (default: 3)")
    p.add_argument("--test-limit", type=non_negative_int, default=0, help="score the first N test images (0: all 10,000)")
    p.add_argument("--train-limit", type=non_negative_int, default=0, help="train on the first N images (0: all)")
    p.add_argument("--trials", type=positive_int, default=1, help="runs per configuration (default: 1)")
    p.add_argument("--threads", type=positive_int, default=1, help="BLAS threads per worker (default: 1)")
    p.add_argument("--model", default="seed",
                   help="a preset (seed, light), a JSON spec or a spec file, as pscnn run's (default: seed)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the server's for the optimizer)")
    p.add_argument("--optimizer", default="auto", choices=["auto", *DEFAULT_LR],
                   help="optimizer (default: auto, as pscnn server: sgd for sync, adam for async and ssp)")
    p.add_argument("--momentum", type=non_negative_float, default=None, help="SGD momentum (default: the server's, 0.9)")
    p.add_argument("--schedule", default=None,
                   help="learning-rate schedule passed to the server: a name, JSON or a JSON file, as pscnn run's "
                        "(default: the server's own default)")
    p.add_argument("--mnist-dir", type=_path, default=None, help="MNIST folder (default: $MNIST_DIR or the cache)")
    add_switch(p, "--no-memory-check", help=MEMORY_CHECK_HELP + " (its workers' checks: pscnn worker --no-memory-check)")
    add_output_flags(p, "tta", keep_logs=True)


def run(args) -> int:
    import os  # noqa: PLC0415

    from cnn_core.data import training_set_size  # noqa: PLC0415
    from pscnn.launcher import check_workers_have_batches  # noqa: PLC0415
    workers = parse_list(args.workers, int, given_flag("workers"), low=1)
    modes = parse_list(args.mode, str, given_flag("mode"), choices=MODES)
    if args.staleness is not None and "ssp" not in modes:
        raise OptionError(f"{given_flag('staleness')} bounds --mode ssp runs only, not --mode {args.mode}")
    mnist_dir = args.mnist_dir or os.environ.get("MNIST_DIR")
    with checking_options():            # what the server, the workers and the evaluator would refuse
        check_out(args.out)
        # before the server's check, which names pscnn run's --batch-size
        check_workers_have_batches(max(workers), training_set_size(args.train_limit), args.batch,
                                   given_flag("workers"), given_flag("batch"))
        for mode in modes:
            check_server_flags(server_flags(mode, args, Path(args.out) / "unused", mnist_dir), workers=max(workers))
        check_mnist(mnist_dir, ["train", "test"])       # the workers train, the evaluator scores
    out = fresh_output_folder(args.out, "time-to-accuracy", OUTPUTS, RUNS, RUN_FOLDER)
    machine = machine_info(args.keep_openblas_env)
    rows, curves = [], {}
    configs = [(t, m, n) for t in range(args.trials) for m in modes for n in workers]
    bar = progress(len(configs), "bench time-to-accuracy", args.no_progress)
    stop = Interruption()
    failures = measurement_failures()
    with stop, bar:
        for trial, mode, n in configs:
            bar.set_postfix_str(f"trial {trial + 1}: {mode} N={n}")
            label = f"{mode} N={n}" + (f" t{trial}" if args.trials > 1 else "")
            try:
                row, curve = run_one(out / RUNS / f"{mode}-n{n}-t{trial}", mode, n, args, mnist_dir, bar)
            except failures as exc:     # a failed run must not lose the others; the exit status says it
                row, curve = {"reached": False, "best_accuracy": None, "error": one_line(exc)}, []
                print(f"\npscnn bench time-to-accuracy: {label}: {row['error']}", file=sys.stderr)
            rows.append({"trial": trial, "mode": mode, "workers": n, **row})
            curves[label] = curve
            bar.update()
    remove_if_empty(out / RUNS)
    if stop.happened and not rows:      # no run finished: nothing to write
        raise KeyboardInterrupt
    summary = summarize(rows, modes, workers)
    bound = ssp_bound(args)
    for s in summary:                   # ssp's bound, which was the server's default, said nowhere
        s["staleness_bound"] = bound if s["mode"] == "ssp" else None
    meta = {"bench": NAME, "machine": machine, "cores": cores(), "config": vars(args), "summary": summary,
            "curves": curves, "interrupted": stop.happened}
    csv_path, json_path = write_outputs(out, NAME, rows, meta)
    report(summary, args, machine)
    if stop.happened:
        return interrupted_status("time-to-accuracy", len(rows), len(configs), csv_path, json_path)
    failed = [r for r in rows if "error" in r]
    if failed:                          # a run whose processes failed measured nothing
        raise BenchError(f"{len(failed)} of {len(rows)} {for_count(len(rows), 'run')} failed (rows in {csv_path}); "
                         f"the first, {failed[0]['mode']} N={failed[0]['workers']}: {failed[0]['error']}")
    print_written(csv_path, json_path,
                  [] if args.no_plots else plot(summary, curves, out, args.target, setting(args, modes)))
    return 0


def ssp_bound(args) -> int:
    """The staleness bound of the ssp runs: --staleness, else the server's default (what their servers
    are given and what the table and JSON say, from this one place)."""
    return DEFAULT_STALENESS if args.staleness is None else args.staleness


def server_flags(mode: str, args, server_out: Path, mnist_dir: str | None) -> list[str]:
    """The flags of one run's ``pscnn server`` (bar --bind): the run the user asked for.  Paths and
    the model as --flag=VALUE (:func:`pscnn.launcher.flag_with`): ``--out -b`` was refused."""
    from pscnn.launcher import flag_with  # noqa: PLC0415
    flags = ["--mode", mode, "--batch-size", str(args.batch), "--epochs", str(args.epochs),
             "--train-limit", str(args.train_limit), "--test-limit", str(args.test_limit),
             flag_with("--model", args.model), "--optimizer", args.optimizer, "--checkpoint-every", "0",
             "--peer-timeout", "60", "--final-eval-timeout", "30", flag_with("--out", server_out),
             "--log-level", "WARNING"]
    if args.lr is not None:
        flags += ["--lr", str(args.lr)]
    if args.momentum is not None:
        flags += ["--momentum", str(args.momentum)]
    if args.schedule:
        flags += ["--schedule", args.schedule]
    if mode == "ssp":
        flags += ["--staleness", str(ssp_bound(args))]
    if mnist_dir:
        flags.append(flag_with("--mnist-dir", mnist_dir))
    return flags


def evaluator_flags(args, mnist_dir: str | None) -> list[str]:
    """The flags of one run's ``pscnn evaluator`` (bar --server); the data folder as --flag=VALUE, as
    in :func:`server_flags`."""
    from pscnn.launcher import flag_with  # noqa: PLC0415
    flags = ["--every", str(args.eval_every), "--test-limit", str(args.test_limit), "--log-level", "WARNING",
             "--threads", str(args.threads)]
    if mnist_dir:
        flags.append(flag_with("--mnist-dir", mnist_dir))
    return flags


def _failure(cluster, server, n: int) -> BenchError | None:
    """The error of a run that cannot measure what it stands for: its server exited with an error,
    or a worker or the evaluator did (they retry a lost server themselves, so an exit is not a
    hiccup; with a worker gone, the run is no longer one of ``n`` workers).  None while it can;
    a server that exited with 0 finished."""
    if server.poll() not in (None, 0):
        return process_failed("the server", server.returncode, cluster.log_tail("server"), cluster.logs)
    failed = [name for name in cluster.procs
              if name.startswith("worker") and cluster.procs[name].poll() not in (None, 0)]
    if failed:
        name = failed[0]
        head = f"every worker ({n}) failed" if len(failed) == n else f"{len(failed)} of {n} workers failed"
        return process_failed(f"{head}; {name}", cluster.procs[name].returncode, cluster.log_tail(name), cluster.logs)
    ev = cluster.procs.get("evaluator")
    if ev is not None and ev.poll() not in (None, 0):
        return process_failed("the evaluator", ev.returncode, cluster.log_tail("evaluator"), cluster.logs)
    return None


def run_one(folder: Path, mode: str, n: int, args, mnist_dir, bar) -> tuple[dict, list]:
    from pscnn.launcher import LocalCluster, query_status  # noqa: PLC0415

    from .cluster import worker_flags  # noqa: PLC0415
    from pscnn.launcher import wait_for  # noqa: PLC0415

    from .common import bench_env  # noqa: PLC0415
    if folder.exists():
        shutil.rmtree(folder)
    cluster = LocalCluster(folder, threads=args.threads)
    cluster.env = bench_env(args.threads, args.keep_openblas_env, base=cluster.env)
    server_out = folder / "server"
    flags = server_flags(mode, args, server_out, mnist_dir)
    stopped_by = "server exited"
    t_begin = time.monotonic()
    best = None
    try:
        server = cluster.start_server(flags)
        wait_for(lambda: server.poll() is not None or query_status(cluster.endpoint, 0.5), 120,
                 what="the server", on_fail=lambda: cluster.log_tail("server"))
        if server.poll() is not None:           # exited before it answered: nothing to measure
            raise process_failed("the server", server.returncode, cluster.log_tail("server"), cluster.logs)
        wflags = worker_flags(args.threads, None, mnist_dir, check_memory=not args.no_memory_check)
        for i in range(n):
            cluster.start_worker(f"worker-{i}", wflags)
        cluster.start_evaluator(evaluator_flags(args, mnist_dir))
        while server.poll() is None:
            failure = _failure(cluster, server, n)
            if failure is not None:
                raise failure
            st = query_status(cluster.endpoint, 2.0)
            if st:
                acc = st.get("test_accuracy")
                if acc is not None:
                    best = acc if best is None else max(best, acc)
                bar.set_postfix_str(f"{mode} N={n}: epoch {min(st['epoch'] + 1, st['epochs'])}/{st['epochs']}, "
                                    f"v{st['version']}, acc {fmt(acc, '.4f')} (best {fmt(best, '.4f')})")
                if acc is not None and acc >= args.target:
                    stopped_by = "target"
                    break
                if st.get("done"):
                    stopped_by = "epochs"
                    if st.get("finished"):       # the final evaluation follows the last epoch
                        break
            if time.monotonic() - t_begin > args.max_seconds:
                stopped_by = "max-seconds"
                break
            time.sleep(0.5)
        failure = _failure(cluster, server, n)      # the server may have exited with an error
        if failure is not None:
            raise failure
    finally:
        cluster.stop_all(grace=10.0)
        cluster.close()
    steps = step_records(server_out / "metrics.jsonl")
    evals = eval_records(server_out / "metrics.jsonl")
    row, curve = analyse(steps, evals, args.target, args.batch)
    row["stopped_by"] = stopped_by
    row["run_wall_s"] = time.monotonic() - t_begin
    if not args.keep_logs:
        shutil.rmtree(folder, ignore_errors=True)
    return row, curve


def analyse(steps: list[dict], evals: list[dict], target: float, batch: int) -> tuple[dict, list]:
    """Time and images to the first evaluated version reaching ``target``; the accuracy curve."""
    steps = sorted(steps, key=lambda r: int(r.get("version", 0)))
    has_time = bool(steps) and all("seconds" in r for r in steps)
    t0 = float(steps[0]["seconds"]) if has_time else 0.0
    cum, by_version = 0, {}
    for r in steps:
        cum += int(r.get("samples", batch))
        by_version[int(r["version"])] = (float(r["seconds"]) if has_time else None, cum)

    def at(version):
        """(seconds since the first update, samples) when ``version`` was produced."""
        if version in by_version:
            t, s = by_version[version]
            return (t - t0 if t is not None else None), s
        earlier = [v for v in by_version if v <= version]
        if earlier:
            t, s = by_version[max(earlier)]
            return (t - t0 if t is not None else None), s
        return 0.0, 0

    curve = []
    reached = None
    for e in sorted(evals, key=lambda r: (float(r.get("seconds", 0)), int(r.get("version", 0)))):
        v = int(e["version"])
        t, s = at(v)
        if t is None:
            t = float(e.get("seconds", 0.0))
        acc = float(e["test_accuracy"])
        curve.append([round(t, 3), s, v, acc])
        if reached is None and acc >= target:
            # eval and step records share the run log's clock: when the score was recorded, counted
            # from the first update as seconds_to_target is
            reached = (t, s, v, acc, float(e.get("seconds", 0.0)) - t0)
    last = steps[-1] if steps else {}
    row = {"reached": reached is not None,
           "seconds_to_target": reached[0] if reached else None,
           "images_to_target": reached[1] if reached else None,
           "version_at_target": reached[2] if reached else None,
           "accuracy_at_target": reached[3] if reached else None,
           "eval_seconds_to_target": reached[4] if reached else None,
           "best_accuracy": max((c[3] for c in curve), default=None),
           "evaluations": len(curve), "updates": int(last.get("version", 0)),
           "images_seen": cum, "train_seconds": (float(last["seconds"]) - t0) if has_time and steps else None,
           "epochs_run": (int(last.get("epoch", 0)) + 1) if last else 0}
    return row, curve


def summarize(rows, modes, workers) -> list[dict]:
    out = []
    for m in modes:
        for n in workers:
            rs = [r for r in rows if r["mode"] == m and r["workers"] == n]
            hit = [r for r in rs if r["reached"]]
            out.append({"mode": m, "workers": n, "runs": len(rs), "reached": len(hit),
                        "seconds_to_target": median([r["seconds_to_target"] for r in hit]),
                        "images_to_target": median([r["images_to_target"] for r in hit]),
                        "best_accuracy": median([r["best_accuracy"] for r in rs]),
                        "updates_to_target": median([r["version_at_target"] for r in hit])})
    # a ratio column is the median of the per-trial ratios (the runs of one trial ran side by side),
    # not the ratio of the medians
    one = {(r["trial"], r["mode"]): r["seconds_to_target"] for r in rows if r["workers"] == 1 and r["reached"]}
    for s in out:
        s["speedup_vs_1"] = median([one[(r["trial"], r["mode"])] / r["seconds_to_target"] for r in rows
                                    if (r["mode"], r["workers"]) == (s["mode"], s["workers"]) and r["reached"]
                                    and r["seconds_to_target"] and one.get((r["trial"], r["mode"]))])
    return out


def _optimizer_text(args, modes) -> str:
    """``--optimizer`` as each mode's server resolves it: "auto" alone says nothing in a sync,async run."""
    from argparse import Namespace  # noqa: PLC0415

    from pscnn.cli import resolve_optimizer  # noqa: PLC0415
    if args.optimizer != "auto":
        return f"optimizer {args.optimizer}"
    return "optimizer auto: " + ", ".join(
        f"{resolve_optimizer(Namespace(optimizer='auto', momentum=args.momentum, nesterov=False, mode=m))} for {m}"
        for m in modes)


def report(summary, args, machine) -> None:
    from cnn_core.data import MNIST_FILES  # noqa: PLC0415
    test_images = MNIST_FILES["test-images"]["count"]       # a larger --test-limit scores them all
    print(f"\nmachine: {machine.get('cpu_model') or '?'}, {cores()} usable cores; target test accuracy "
          f"{args.target} on {min(args.test_limit or test_images, test_images)} test images; batch {args.batch}, "
          + _optimizer_text(args, dict.fromkeys(s["mode"] for s in summary))
          + (f" lr {args.lr}" if args.lr is not None else " (default lr)")
          + (f" momentum {args.momentum}" if args.momentum is not None else "")
          + (f", schedule {args.schedule}" if args.schedule else ", the server's default schedule")
          + f"; medians of {args.trials} {for_count(args.trials, 'trial')} "
          "(seconds, images, updates: of the runs that reached the target)")
    headers = ["mode", "workers", "reached", "seconds", "images", "updates", "speed-up vs 1", "best acc"]
    rows = [[s["mode"], s["workers"], f"{s['reached']}/{s['runs']}", fmt(s["seconds_to_target"], ".1f"),
             fmt(s["images_to_target"]), fmt(s["updates_to_target"]), fmt(s["speedup_vs_1"], ".2f"),
             fmt(s["best_accuracy"], ".4f")] for s in summary]
    print_table(headers, rows)
    bound = next((s["staleness_bound"] for s in summary if s["mode"] == "ssp"), None)
    if bound is not None:
        print(f"ssp: a worker may run {bound} {for_count(bound, 'push', 'pushes')} ahead of the slowest (--staleness)")
    if args.trials > 1 and any(s["speedup_vs_1"] is not None for s in summary):
        # 10 s / 20 s in the seconds column beside a speed-up of 2.00 read as a wrong division
        print("speed-up vs 1: the median over trials of (1 worker's seconds / N workers' seconds) within each "
              "trial, not the ratio of the seconds column's medians")


def setting(args, modes) -> str:
    """What the plot measured, above it: shown alone, it said nothing of the model, data or optimizer."""
    from cnn_core.data import MNIST_FILES  # noqa: PLC0415
    test_images = MNIST_FILES["test-images"]["count"]
    return (f"model {args.model}, batch {args.batch}, {min(args.test_limit or test_images, test_images):,} test images, "
            f"{_optimizer_text(args, modes)}; {args.trials} {for_count(args.trials, 'trial')}")


def plot(summary, curves, out: Path, target: float, title: str = "") -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.9), dpi=90)
    if title:
        fig.suptitle(title, fontsize=9)
    # One colour per configuration, the same in both panels: the bars were blue for sync and orange
    # for every other mode, while the curves took the colours in turn, so orange was "sync N=2"
    # on the left and "async" on the right, and async and ssp bars looked alike.
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {f"{s['mode']} N={s['workers']}": cycle[i % len(cycle)] for i, s in enumerate(summary)}

    def colour(label: str):
        """The colour of a curve's configuration: its label is "MODE N=n", then " tT" with --trials."""
        return colours.get(label) or colours.get(label.rsplit(" t", 1)[0])
    ax = axes[0]
    for label, curve in curves.items():
        if curve:
            ax.plot([c[0] for c in curve], [c[3] for c in curve], ".-", label=label, color=colour(label))
    ax.axhline(target, color="0.3", ls="--", lw=1, label=f"target {target}")
    # The range of the evaluations after each run's first: that one scores the untrained model (~0.1),
    # and took the axis down to it, squeezing runs at 0.97-0.99 against a 0.99 target into a
    # few pixels at the top. Its segment comes in from below the axis.
    accs = [c[3] for cv in curves.values() for c in cv[1:]] or [c[3] for cv in curves.values() for c in cv]
    if accs:
        ax.set_ylim(max(0.0, min(min(accs), target) - 0.01), min(1.0, max(max(accs), target) + 0.003))
    ax.set_xlabel("seconds since the first update")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy vs wall time")
    ax.grid(alpha=0.3)
    # beside the axes: zoomed on the approach to the target, the curves fill every corner
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax = axes[1]
    labels = [f"{s['mode']}\nN={s['workers']}" for s in summary]
    vals = [s["seconds_to_target"] or 0.0 for s in summary]
    bars = ax.bar(range(len(summary)), vals, color=[colours[f"{s['mode']} N={s['workers']}"] for s in summary])
    for b, s in zip(bars, summary):
        if s["seconds_to_target"] is None:
            ax.text(b.get_x() + b.get_width() / 2, 0, "not\nreached", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels(labels, fontsize=7)
    if not any(vals):                   # no run reached it: matplotlib centred the axis on 0, from -0.05 s
        ax.set_ylim(0, 1)
    ax.set_ylabel(f"seconds to {target} test accuracy")
    ax.set_title("Time to accuracy")
    ax.grid(alpha=0.3, axis="y")
    return [save_figure(fig, out / PLOT)]
