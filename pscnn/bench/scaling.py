"""``pscnn bench scaling``: training throughput against the number of workers, and why.

For every point (mode x workers x batch [x compute-ms]) a real server and N
real workers run on this machine (:mod:`pscnn.bench.cluster`).  In the same
run, interleaved trial by trial so that machine noise hits everything alike:

* the single-process baseline: ``pscnn train``'s step rate at the same batch
  size and thread count (:mod:`pscnn.bench.baseline`), so that
  efficiency = throughput(N) / (N x baseline);
* with torch installed, PyTorch DDP (gloo, CPU) with N processes on the same
  model and batch (:mod:`pscnn.bench.ddp`), for ``--mode sync`` points.

With ``--compute-ms X`` the workers sleep X ms instead of computing (and push
zero gradients), so scaling to dozens of workers can be studied on a small
machine; the ideal single worker then does 1000/X steps/s.

Every point is compared with a simple model (Amdahl-style)::

    async:  pushes/s = min( N / (c + r),              1 / s,  cores / (s + w) )
    sync:   pushes/s = min( N / (c + r + (N-1) s),    1 / s,  cores / (s + w) )

c: compute per step and r: the rest of one worker's cycle, both from the
N = 1 point of the same series; s: the server's CPU time per push and w: a
worker's CPU time per push, both measured from /proc over the windows.  The
first term is the workers' demand, the second the server's capacity (one
thread), the third the machine's cores.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from cnn_core.text import for_count
from pscnn.cli import (DEFAULT_STALENESS, MEMORY_CHECK_HELP, MODES, _path, add_switch, given_flag, non_negative_float,
                       non_negative_int, overlap_refused, positive_float, positive_int)

from .common import (THROUGHPUT_LR, THROUGHPUT_MOMENTUM, BenchError, Interruption, OptionError, add_output_flags,
                     check_measured, check_mnist, check_out, check_server_flags, checking_options, cores, data_files,
                     description, fmt, fresh_output_folder, interrupted_status, machine_info, measurement_failures,
                     median, on_a_free_port, parse_list, plain_log_ticks, point_failed, print_table, print_written,
                     process_failed, progress, pyplot, reference_limit, remove_if_empty, save_figure, write_outputs)

NAME = "scaling"
# What a run writes into --out (the plots with matplotlib, without --no-plots), and the folder of
# each point's logs under POINTS (--keep-logs, a failed point): an earlier run's go at the start.
SUMMARY_FILE = f"{NAME}-summary.json"
THROUGHPUT_PLOT, EFFICIENCY_PLOT, TIME_SPLIT_PLOT = (f"{NAME}_{what}.png"
                                                     for what in ("throughput", "efficiency", "time_split"))
OUTPUTS = (*data_files(NAME), SUMMARY_FILE, THROUGHPUT_PLOT, EFFICIENCY_PLOT, TIME_SPLIT_PLOT)
POINTS = "points"
POINT_FOLDER = re.compile(rf"({'|'.join(MODES)})-n\d+-b\d+(-c[0-9.e+-]+)?-t\d+")     # see point_folder()


def add_parser(sub) -> None:
    p = sub.add_parser("scaling", help="throughput and efficiency vs number of workers",
                       description=description(__doc__))
    p.add_argument("--workers", default="1,2,4", help="worker counts (default: 1,2,4)")
    p.add_argument("--mode", default="sync,async", help="consistency modes: sync, async, ssp (default: sync,async)")
    p.add_argument("--staleness", type=non_negative_int, default=None,
                   help=f"ssp points: pushes a worker may run ahead of the slowest (default: {DEFAULT_STALENESS})")
    p.add_argument("--batch", default="64", help="batch sizes (default: 64)")
    p.add_argument("--compute-ms", default=None,
                   help="synthetic workers: sleep X ms per step instead of computing, pushing zero gradients (a "
                        "list, e.g. 0,5,20; default: real workers training on MNIST)")
    p.add_argument("--seconds", type=positive_float, default=10.0, help="measured window per point (default: 10)")
    p.add_argument("--warmup", type=non_negative_float, default=3.0, help="seconds after every worker pushed (default: 3)")
    p.add_argument("--trials", type=positive_int, default=3, help="trials; medians are reported (default: 3)")
    p.add_argument("--threads", type=positive_int, default=1, help="BLAS threads per worker and baseline (default: 1; not with --compute-ms)")
    p.add_argument("--baseline-seconds", type=positive_float, default=None,
                   help="seconds per baseline measurement (default: --seconds)")
    p.add_argument("--ddp", default="auto", choices=["auto", "on", "off"],
                   help="PyTorch DDP reference for sync points (auto: when torch is installed)")
    p.add_argument("--model", default="seed",
                   help="a preset (seed, light), a JSON spec or a spec file, as pscnn run's (default: seed)")
    p.add_argument("--lr", type=positive_float, default=THROUGHPUT_LR,
                   help=f"learning rate of the servers' and the baseline's SGD, whose momentum is "
                        f"{THROUGHPUT_MOMENTUM} (default: {THROUGHPUT_LR})")
    p.add_argument("--mnist-dir", type=_path, default=None, help="MNIST folder (default: $MNIST_DIR or the cache)")
    add_switch(p, "--overlap",
               help="async points: workers compute the next batch while a push travels (pscnn worker --overlap)")
    add_switch(p, "--no-memory-check", help=MEMORY_CHECK_HELP + " (its workers' checks: pscnn worker --no-memory-check)")
    add_output_flags(p, "scaling", keep_logs=True)


def run(args) -> int:
    import os  # noqa: PLC0415

    from pscnn.launcher import check_workers_have_batches  # noqa: PLC0415

    from .cluster import measure_point, server_flags  # noqa: PLC0415
    from .common import bench_env  # noqa: PLC0415

    workers = parse_list(args.workers, int, given_flag("workers"), low=1)
    modes = parse_list(args.mode, str, given_flag("mode"), choices=MODES)
    from cnn_core.data import MNIST_FILES  # noqa: PLC0415  (numpy loads after the flags)
    # the baseline steps through whole batches of the training set: a larger batch has none
    batches = parse_list(args.batch, int, given_flag("batch"), low=1, high=MNIST_FILES["train-images"]["count"])
    compute = ([None] if args.compute_ms is None
               else parse_list(args.compute_ms, float, given_flag("compute_ms"), low=0))
    synthetic = compute != [None]
    if synthetic and max(compute) >= 1e3 * args.seconds:    # 1e9 waited out the 2-minute start-up per point
        raise OptionError(f"--compute-ms {max(compute):g}: a step that takes the whole --seconds "
                          f"{args.seconds:g} window or longer measures nothing")
    # flags that would do nothing in this run: refused, not silently dropped
    if args.overlap and "async" not in modes:
        raise OptionError(overlap_refused(args.mode))
    if args.staleness is not None and "ssp" not in modes:
        raise OptionError(f"{given_flag('staleness')} bounds --mode ssp points only, not --mode {args.mode}")
    # ssp's bound, recorded with its points: it used to be the server's default, said nowhere
    bound = DEFAULT_STALENESS if args.staleness is None else args.staleness
    if synthetic and args.baseline_seconds is not None:
        raise OptionError("--baseline-seconds: --compute-ms workers have no single-process baseline")
    if synthetic and args.threads != 1:
        raise OptionError(f"{given_flag('threads')} {args.threads}: --compute-ms workers sleep instead of computing, "
                          "with no BLAS to thread")
    if args.ddp == "on" and (synthetic or "sync" not in modes):
        raise OptionError("--ddp on: DDP is compared with --mode sync points of real workers, not with "
                          + ("--compute-ms" if synthetic else f"--mode {args.mode}"))
    use_ddp = not synthetic and "sync" in modes and args.ddp != "off"
    if use_ddp:
        from .ddp import torch_available  # noqa: PLC0415
        if not torch_available():
            if args.ddp == "on":
                raise OptionError("--ddp on: torch is not installed")
            print("pscnn bench scaling: torch not installed, no DDP reference", file=sys.stderr)
            use_ddp = False
    mnist_dir = args.mnist_dir or os.environ.get("MNIST_DIR")
    with checking_options():            # what the servers, workers and baseline would refuse
        check_out(args.out)
        for b in batches:               # before the server's check, which names pscnn run's --batch-size
            check_workers_have_batches(max(workers), MNIST_FILES["train-images"]["count"], b,
                                       given_flag("workers"), given_flag("batch"))
        for mode in modes:
            for b in batches:
                check_server_flags(server_flags(mode, b, Path(args.out) / "unused", model=args.model, lr=args.lr,
                                                mnist_dir=mnist_dir, extra=ssp_flags(mode, bound)),
                                   workers=max(workers))
        # the workers read the training set (sleeping ones no data); each server, given a folder (the
        # flag or MNIST_DIR), reads the test set at its start, as pscnn server does
        check_mnist(mnist_dir, [*([] if synthetic else ["train"]), *(["test"] if mnist_dir else [])])
    out = fresh_output_folder(args.out, NAME, OUTPUTS, POINTS, POINT_FOLDER)
    ncores = cores()
    machine = machine_info(args.keep_openblas_env)
    env = bench_env(args.threads, args.keep_openblas_env)
    ddp_worlds = sorted(set(workers)) if use_ddp else []
    base_s = args.baseline_seconds or args.seconds

    points = [dict(mode=m, workers=n, batch=b, compute_ms=c) for c in compute for b in batches
              for m in modes for n in workers]
    jobs_per_trial = len(points) + (0 if synthetic else len(batches)) + len(ddp_worlds) * len(batches)
    rows, baselines, ddp_rows = [], [], []
    bar = progress(jobs_per_trial * args.trials, "bench scaling", args.no_progress)
    stop = Interruption()
    failures = measurement_failures()
    with stop, bar:
        for trial in range(args.trials):
            if not synthetic:
                for b in batches:
                    bar.set_postfix_str(f"trial {trial + 1}: baseline b{b}")
                    try:
                        res = _baseline(args.model, b, base_s, mnist_dir, env, args.lr)
                    except failures as exc:     # that trial's ratios are lost, not the run
                        res = point_failed(NAME, f"baseline b{b}", exc)
                    baselines.append({"trial": trial, "batch": b, **res})
                    bar.update()
            for pt in points:
                label = (f"{pt['mode']} N={pt['workers']} b{pt['batch']}"
                         + (f" c={pt['compute_ms']:g}ms" if synthetic else ""))
                bar.set_postfix_str(f"trial {trial + 1}: {label}")
                try:
                    res = measure_point(
                        out / POINTS / point_folder(pt, trial, synthetic), seconds=args.seconds,
                        warmup=args.warmup, threads=args.threads, model=args.model, lr=args.lr, mnist_dir=mnist_dir,
                        keep_openblas=args.keep_openblas_env, keep_logs=args.keep_logs, overlap=args.overlap,
                        server_extra=ssp_flags(pt["mode"], bound), check_memory=not args.no_memory_check, **pt)
                except failures as exc:     # one failed point must not lose the others
                    res = point_failed(NAME, label, exc)
                rows.append({"trial": trial, **pt, "kind": "pscnn", **res})
                bar.update()
            for n in ddp_worlds:
                for b in batches:
                    bar.set_postfix_str(f"trial {trial + 1}: torch DDP N={n} b{b}")
                    from .ddp import measure_ddp  # noqa: PLC0415
                    try:
                        res = on_a_free_port(lambda: measure_ddp(n, b, args.seconds, args.threads, args.model,
                                                                 env=env), NAME, f"torch DDP N={n} b{b}")
                    except failures as exc:
                        res = point_failed(NAME, f"torch DDP N={n} b{b}", exc)
                    ddp_rows.append({"trial": trial, "workers": n, "batch": b, **res})
                    bar.update()
    remove_if_empty(out / POINTS)
    if stop.happened and not rows:      # no point measured: nothing to write
        raise KeyboardInterrupt

    summary = summarize(rows, baselines, ddp_rows, ncores, synthetic)
    for s in summary:                   # as a run's summary.json says it
        s["staleness_bound"] = bound if s["mode"] == "ssp" else None
        s["overlap"] = args.overlap and s["mode"] == "async"     # the table and plots said nothing of it
    meta = {"bench": NAME, "machine": machine, "cores": ncores, "synthetic": synthetic, "interrupted": stop.happened,
            "config": {k: v for k, v in vars(args).items() if k not in ("func",)},
            "baselines": baselines, "ddp": ddp_rows, "summary": summary,
            "model_note": __doc__[__doc__.index("Every point"):].strip()}
    csv_path, json_path = write_outputs(out, NAME, rows, meta)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    report(summary, ncores, synthetic, machine, args.trials)
    if stop.happened:
        return interrupted_status(NAME, len(rows), len(points) * args.trials, csv_path, json_path)
    check_measured(rows, csv_path)
    print_written(csv_path, json_path, [] if args.no_plots else plot(summary, out, ncores, synthetic, setting(args, ncores)),
                  [out / SUMMARY_FILE])
    return 0


def ssp_flags(mode: str, bound: int) -> list[str]:
    """The server flags that set an ssp point's staleness bound; none for the other modes."""
    return ["--staleness", str(bound)] if mode == "ssp" else []


def point_folder(pt: dict, trial: int, synthetic: bool) -> str:
    """The folder of a point's logs in a trial, under POINTS (POINT_FOLDER matches every one): one per
    point and trial, so that --keep-logs keeps them all, and a failed point's "logs in" still holds
    its logs after the next trial."""
    return (f"{pt['mode']}-n{pt['workers']}-b{pt['batch']}" + (f"-c{pt['compute_ms']:g}" if synthetic else "")
            + f"-t{trial}")


def baseline_command(model: str, batch: int, seconds: float, mnist_dir: str | None, lr: float) -> list[str]:
    """The single-process baseline, making the servers' update (momentum SGD at ``lr``)."""
    from pscnn.launcher import flag_with  # noqa: PLC0415  (a value that begins with -: one word)
    cmd = [sys.executable, "-m", "pscnn.bench.baseline", flag_with("--model", model), "--batch", str(batch),
           "--seconds", str(seconds), "--lr", repr(lr), "--momentum", repr(THROUGHPUT_MOMENTUM)]
    return cmd + ([flag_with("--mnist-dir", mnist_dir)] if mnist_dir else [])


def _baseline(model: str, batch: int, seconds: float, mnist_dir: str | None, env: dict, lr: float) -> dict:
    import subprocess  # noqa: PLC0415
    cmd = baseline_command(model, batch, seconds, mnist_dir, lr)
    limit = reference_limit(seconds)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the baseline (batch {batch}) did not finish within {limit:g} s") from None
    if proc.returncode != 0:
        raise process_failed(f"the baseline (batch {batch})", proc.returncode, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- summary

def summarize(rows, baselines, ddp_rows, ncores: int, synthetic: bool) -> list[dict]:
    """Medians per point, efficiencies, the model's predictions and the DDP ratios."""
    keys = []
    for r in rows:
        k = (r["mode"], r["workers"], r["batch"], r["compute_ms"])
        if k not in keys:
            keys.append(k)
    baselines = [b for b in baselines if "error" not in b]      # a failed one measured nothing
    ddp_rows = [d for d in ddp_rows if "error" not in d]
    base_by_trial = {(b["trial"], b["batch"]): b["images_per_second"] for b in baselines}
    base_med = {b: median([x["images_per_second"] for x in baselines if x["batch"] == b])
                for b in {x["batch"] for x in baselines}}
    ddp_by_trial = {(d["trial"], d["workers"], d["batch"]): d["images_per_second"] for d in ddp_rows}
    base_cpu_by_trial = {(b["trial"], b["batch"]): b.get("images_per_cpu_second") for b in baselines}
    ddp_cpu_by_trial = {(d["trial"], d["workers"], d["batch"]): d.get("images_per_cpu_second") for d in ddp_rows}
    out = []
    for mode, n, b, c in keys:
        rs = [r for r in rows if (r["mode"], r["workers"], r["batch"], r["compute_ms"]) == (mode, n, b, c)]
        # a window without a single update (every process descheduled: seen on a shared machine
        # under memory pressure) measures the machine, not pscnn: counted, left out of the medians
        stalled = [r for r in rs if not r.get("updates") and "error" not in r]
        failed = [r for r in rs if "error" in r]
        rs = [r for r in rs if r.get("updates")]
        if not rs:
            out.append({"mode": mode, "workers": n, "batch": b, "compute_ms": c, "trials": 0,
                        "stalled_windows": len(stalled), "failed": len(failed), "oversubscribed": n > ncores,
                        "images_per_second": None, "updates_per_second": None, "efficiency": None,
                        "step_compute_ms": None, "comm_ms": None, "wait_ms": None, "staleness_mean": None,
                        "staleness_p50": None, "staleness_p99": None, "staleness_max": None,
                        "baseline_images_per_second": None, "staleness_hist": {}})
            continue
        s = {"mode": mode, "workers": n, "batch": b, "compute_ms": c, "trials": len(rs),
             "stalled_windows": len(stalled), "failed": len(failed), "oversubscribed": n > ncores}
        for key in ("images_per_second", "updates_per_second", "step_compute_ms", "comm_ms", "wait_ms",
                    "staleness_mean", "staleness_p50", "staleness_p99", "staleness_max", "server_cpu_fraction",
                    "server_cpu_ms_per_push", "workers_cpu_fraction", "worker_cpu_ms_per_push",
                    "cpu_share_per_worker", "images_per_cpu_second"):
            s[key] = median([r.get(key) for r in rs])
        # a worker's cycle minus its compute, per trial: the non-compute part of one step
        s["rest_ms"] = median([1e3 * b * n / r["images_per_second"] - r["step_compute_ms"] for r in rs
                               if r.get("images_per_second") and r.get("step_compute_ms") is not None])
        hist: dict = {}
        for r in rs:
            for k, v in (r.get("staleness_hist") or {}).items():
                hist[k] = hist.get(k, 0) + v
        s["staleness_hist"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
        if synthetic:
            s["baseline_images_per_second"] = (b * 1000.0 / c) if c else None
            s["efficiency"] = (s["images_per_second"] / (n * s["baseline_images_per_second"])
                               if c and s["images_per_second"] is not None else None)
        else:
            s["baseline_images_per_second"] = base_med.get(b)
            effs = [r["images_per_second"] / (n * base_by_trial[(r["trial"], b)])
                    for r in rs if (r["trial"], b) in base_by_trial]
            s["efficiency"] = median(effs)          # per-trial ratios, measured side by side
            # per CPU-second instead of per wall second: immune to the share of the cores other
            # processes of a shared machine take (see docs/scaling.md)
            s["baseline_images_per_cpu_second"] = median([x.get("images_per_cpu_second") for x in baselines
                                                          if x["batch"] == b])
            s["baseline_cpu_fraction"] = median([x.get("cpu_fraction") for x in baselines if x["batch"] == b])
            cpu_effs = [r["images_per_cpu_second"] / base_cpu_by_trial[(r["trial"], b)] for r in rs
                        if r.get("images_per_cpu_second") and base_cpu_by_trial.get((r["trial"], b))]
            s["cpu_efficiency"] = median(cpu_effs)
            if ddp_rows:
                ratios = [r["images_per_second"] / ddp_by_trial[(r["trial"], n, b)]
                          for r in rs if (r["trial"], n, b) in ddp_by_trial]
                s["ddp_images_per_second"] = median([ddp_by_trial[k] for k in ddp_by_trial if k[1:] == (n, b)])
                s["pscnn_over_ddp"] = median(ratios)
                s["ddp_images_per_cpu_second"] = median([d.get("images_per_cpu_second") for d in ddp_rows
                                                         if (d["workers"], d["batch"]) == (n, b)])
                s["ddp_cpu_fraction"] = median([d.get("cpu_fraction") for d in ddp_rows
                                                if (d["workers"], d["batch"]) == (n, b)])
                cpu_ratios = [r["images_per_cpu_second"] / ddp_cpu_by_trial[(r["trial"], n, b)] for r in rs
                              if r.get("images_per_cpu_second") and ddp_cpu_by_trial.get((r["trial"], n, b))]
                s["pscnn_over_ddp_per_cpu"] = median(cpu_ratios)
        out.append(s)
    _add_model(out, ncores)
    return out


def _add_model(summary: list[dict], ncores: int) -> None:
    """The Amdahl-style prediction of each point (see the module docs)."""
    for s in summary:
        series = [x for x in summary if (x["mode"], x["batch"], x["compute_ms"]) ==
                  (s["mode"], s["batch"], s["compute_ms"])]
        one = next((x for x in series if x["workers"] == 1), None)
        srv = median([x.get("server_cpu_ms_per_push") for x in series])
        wrk = median([x.get("worker_cpu_ms_per_push") for x in series])
        if one is None or not one.get("images_per_second") or srv is None:
            continue
        b = s["batch"]
        c = one.get("step_compute_ms") or 0.0
        r = one.get("rest_ms")
        if r is None:
            r = 1e3 * b / one["images_per_second"] - c          # ms per step with one worker, minus compute
        r = max(0.0, r)
        n = s["workers"]
        demand = n / (c + r + ((n - 1) * srv if s["mode"] == "sync" else 0.0)) * 1e3   # pushes/s
        server_cap = 1e3 / srv if srv > 0 else float("inf")
        cpu_cap = ncores * 1e3 / (srv + (wrk or 0.0)) if srv + (wrk or 0.0) > 0 else float("inf")
        pred = min(demand, server_cap, cpu_cap)
        s["model_c_ms"], s["model_r_ms"], s["model_s_ms"], s["model_w_ms"] = c, r, srv, wrk
        s["model_images_per_second"] = pred * b
        s["model_bound"] = ("workers" if pred == demand else "server" if pred == server_cap else "cores")
        if s.get("images_per_second"):
            s["measured_over_model"] = s["images_per_second"] / s["model_images_per_second"]


# --------------------------------------------------------------------------- report

def report(summary, ncores: int, synthetic: bool, machine: dict, trials: int) -> None:
    print(f"\nmachine: {machine.get('cpu_model') or '?'}, {ncores} usable cores "
          f"(* = workers outnumber cores); medians of {trials} {for_count(trials, 'trial')}")
    headers = ["mode", "N", "batch"] + (["c ms"] if synthetic else []) + [
        "img/s", "upd/s", "ideal img/s", "efficiency", "compute ms", "comm ms", "wait ms", "stale p50/p99/max",
        "srv cpu", "model img/s", "meas/model", "bound"]
    if not synthetic:
        headers += ["cores/worker", "CPU eff"]
    if any("pscnn_over_ddp" in s for s in summary):
        headers += ["DDP img/s", "pscnn/DDP", "DDP cores", "pscnn/DDP per CPU"]
    rows = []
    for s in summary:
        base = s.get("baseline_images_per_second")
        row = [s["mode"], f"{s['workers']}{'*' if s['oversubscribed'] else ''}", s["batch"]]
        if synthetic:
            row.append(fmt(s["compute_ms"], "g"))
        row += [fmt(s["images_per_second"]), fmt(s["updates_per_second"], ",.1f"),
                fmt(base * s["workers"] if base else None), fmt(s["efficiency"], ".2f"),
                fmt(s["step_compute_ms"], ".1f"), fmt(s["comm_ms"], ".1f"), fmt(s["wait_ms"], ".1f"),
                f"{fmt(s['staleness_p50'], 'g')}/{fmt(s['staleness_p99'], 'g')}/{fmt(s['staleness_max'], 'g')}",
                fmt(s.get("server_cpu_fraction"), ".0%"), fmt(s.get("model_images_per_second")),
                fmt(s.get("measured_over_model"), ".2f"), s.get("model_bound", "-")]
        if not synthetic:
            row += [fmt(s.get("cpu_share_per_worker"), ".2f"), fmt(s.get("cpu_efficiency"), ".2f")]
        if "DDP img/s" in headers:
            row += [fmt(s.get("ddp_images_per_second")), fmt(s.get("pscnn_over_ddp"), ".2f"),
                    fmt(s.get("ddp_cpu_fraction"), ".2f"), fmt(s.get("pscnn_over_ddp_per_cpu"), ".2f")]
        rows.append(row)
    print_table(headers, rows)
    for s in summary:                   # the medians above stand for fewer trials than asked
        if s["stalled_windows"] or s["failed"]:
            print(f"note: {_label(s['mode'], s['batch'], s['compute_ms'], synthetic, 2)} N={s['workers']}: "
                  f"medians of {s['trials']} {for_count(s['trials'], 'trial')}; left out: {s['stalled_windows']} "
                  f"stalled {for_count(s['stalled_windows'], 'window')} "
                  f"(no update in the window), {s['failed']} failed")
    bound = next((s["staleness_bound"] for s in summary if s["mode"] == "ssp"), None)
    if bound is not None:
        print(f"ssp: a worker may run {bound} {for_count(bound, 'push', 'pushes')} ahead of the slowest (--staleness)")
    if any(s.get("overlap") for s in summary):
        print("async: each worker computes its next batch while its push travels (--overlap)")
    if not synthetic:
        base = {s["batch"]: s.get("baseline_cpu_fraction") for s in summary}
        # the ratio of two medians can differ from the median ratio on a noisy machine (9,293 img/s
        # against an ideal 8,894 read 0.66): said, or the table looks wrong
        print("efficiency: the median over trials of img/s / (N x the same trial's baseline), not img/s / "
              "ideal img/s (N x the median baseline)")
        print("cores/worker: the share of a core each worker process got (CPU s / wall s); "
              "CPU eff: images per CPU-second (workers + server) / the baseline's")
        print("baseline got " + ", ".join(f"{fmt(v, '.2f')} of a core (b{b})" for b, v in base.items()))
        for s in summary:
            if s["workers"] == 2 and s.get("efficiency") is not None:
                verdict = "meets" if s["efficiency"] >= 0.85 else "misses"
                print(f"{s['mode']} b{s['batch']}: 2 workers = {s['efficiency']:.2f} x (2 x single-process "
                      f"baseline at the same batch and threads); {verdict} the 0.85 target"
                      + (f" (per CPU-second: {s['cpu_efficiency']:.2f})" if s.get("cpu_efficiency") else ""))


# --------------------------------------------------------------------------- plots

def _series(summary):
    keys = []
    for s in summary:
        k = (s["mode"], s["batch"], s["compute_ms"])
        if k not in keys:
            keys.append(k)
    return [(k, sorted([s for s in summary if (s["mode"], s["batch"], s["compute_ms"]) == k],
                       key=lambda s: s["workers"])) for k in keys]


def _label(mode, batch, c, synthetic, nb: int, overlap: bool = False) -> str:
    text = mode + (" --overlap" if overlap else "")
    if nb > 1:
        text += f" b{batch}"
    if synthetic:
        text += f" c={c:g}ms"
    return text


# inches: the throughput and efficiency plots' axes (as wide as before their legends moved beside
# them) and the legend's column
LINE_PLOT_WIDTH = 9.5


def setting(args, ncores: int) -> str:
    """What the plots measured, above each: shown alone, a figure said nothing of the model or batch."""
    workers = f"synthetic workers (--compute-ms {args.compute_ms})" if args.compute_ms else f"model {args.model}"
    return (f"{workers}, batch {args.batch}; {args.seconds:g} s windows, medians of {args.trials} "
            f"{for_count(args.trials, 'trial')}; {ncores} cores")


def plot(summary, out: Path, ncores: int, synthetic: bool, title: str = "") -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []

    def save(fig, name: str) -> Path:
        if title:
            fig.suptitle(title, fontsize=9)
        return save_figure(fig, out / name)
    nb = len({s["batch"] for s in summary})
    maxn = max(s["workers"] for s in summary)
    logx = maxn >= 8
    paths = []
    series = _series(summary)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def shade(ax):
        minn = min(s["workers"] for s in summary)
        lo, hi = (minn / 1.25, maxn * 1.25) if logx else (minn - 0.3, maxn + 0.3)
        if maxn > ncores:
            ax.axvspan(ncores * 1.2 if logx else ncores + 0.5, hi, color="0.9", zorder=0,
                       label=f"workers > {ncores} cores")
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlim(lo, hi)
        ax.set_xticks(sorted({s["workers"] for s in summary}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())

    def legend_beside(ax):
        """The legend right of the axes, not in them: with several modes, batches or --compute-ms
        there is no free corner, and it was drawn over the lines (a synthetic run's ideal lines)."""
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)

    # ---- throughput vs workers, with the ideal linear line
    fig, ax = plt.subplots(figsize=(LINE_PLOT_WIDTH, 4.2), dpi=90)
    shade(ax)
    ideal_done = set()
    for i, ((mode, b, c), pts) in enumerate(series):
        col = colors[i % len(colors)]
        xs = [p["workers"] for p in pts]
        ys = [p["images_per_second"] for p in pts]
        ax.plot(xs, ys, "o-", color=col, label=_label(mode, b, c, synthetic, nb, pts[0].get("overlap")))
        model = [p.get("model_images_per_second") for p in pts]
        if all(m is not None for m in model):
            ax.plot(xs, model, ":", color=col, alpha=0.8)
        base = pts[0].get("baseline_images_per_second")
        if base and (b, c) not in ideal_done:
            ideal_done.add((b, c))
            ns = sorted({s["workers"] for s in summary})
            # synthetic workers have no single process to scale: their ideal is a worker that only
            # sleeps, one line per --compute-ms, each named (one unnamed grey line each, before)
            ideal = f"a worker that only sleeps {c:g} ms" if synthetic else "single process"
            ax.plot(ns, [n * base for n in ns], "--", color="0.4", lw=1,
                    # one worker count: a dashed line through one point draws nothing
                    marker="_" if len(ns) == 1 else None, markersize=16, markeredgewidth=2,
                    label=f"ideal: N x {ideal}" + (f" b{b}" if nb > 1 else ""))
        if pts[0].get("ddp_images_per_second") is not None and mode == "sync":
            ax.plot(xs, [p.get("ddp_images_per_second") for p in pts], "s-.", color="tab:purple",
                    label=f"PyTorch DDP (gloo){f' b{b}' if nb > 1 else ''}")
    ax.set_xlabel("workers")
    ax.set_ylabel("training images/s")
    ax.set_title("Throughput vs workers" + (" (synthetic compute; dotted: model)" if synthetic
                                             else " (dotted: model)"))
    if synthetic:                       # the ideal lines span orders of magnitude
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
    else:
        ax.set_ylim(bottom=0)
    legend_beside(ax)
    ax.grid(alpha=0.3)
    paths.append(save(fig, THROUGHPUT_PLOT))

    # ---- efficiency
    if any(s.get("efficiency") is not None for s in summary):
        fig, ax = plt.subplots(figsize=(LINE_PLOT_WIDTH, 4.2), dpi=90)
        shade(ax)
        for i, ((mode, b, c), pts) in enumerate(series):
            pts = [p for p in pts if p.get("efficiency") is not None]
            if not pts:
                continue
            ax.plot([p["workers"] for p in pts], [p["efficiency"] for p in pts], "o-",
                    color=colors[i % len(colors)], label=_label(mode, b, c, synthetic, nb, pts[0].get("overlap")))
            cpu = [p for p in pts if p.get("cpu_efficiency") is not None]
            if cpu:
                ax.plot([p["workers"] for p in cpu], [p["cpu_efficiency"] for p in cpu], "^--",
                        color=colors[i % len(colors)], alpha=0.7,
                        label=_label(mode, b, c, synthetic, nb, pts[0].get("overlap")) + " per CPU-second")
        ax.axhline(1.0, color="0.4", ls="--", lw=1)
        if not synthetic:
            ax.axhline(0.85, color="tab:red", ls=":", lw=1, label="0.85 target (2 workers)")
        ax.set_xlabel("workers")
        ax.set_ylabel("efficiency = throughput / (N x single)")
        # above 1 on a noisy machine (a baseline that got less of a core): shown, not cut off
        top = max(s.get(k) or 0.0 for s in summary for k in ("efficiency", "cpu_efficiency"))
        ax.set_ylim(0, max(1.15, 1.05 * top))
        ax.set_title("Scaling efficiency")
        legend_beside(ax)
        ax.grid(alpha=0.3)
        paths.append(save(fig, EFFICIENCY_PLOT))

    # ---- per-step time split, stacked bars
    pts = [s for s in summary if s.get("comm_ms") is not None]
    if pts:
        labels = [f"{_label(p['mode'], p['batch'], p['compute_ms'], synthetic, nb, p.get('overlap'))}\nN={p['workers']}"
                  f"{'*' if p['oversubscribed'] else ''}" for p in pts]
        # inches: room under each bar for its label (~0.08 in a character at 8 pt); upright past 16.
        # 8 pt, not 6: 6 pt labels (7 pixels high at 90 dpi) could not be read projected.
        width = len(pts) * (0.08 * max(len(line) for text in labels for line in text.split("\n")) + 0.15) + 1.5
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.4, width)), 4.2), dpi=90)
        xs = list(range(len(pts)))
        bottom = [0.0] * len(pts)
        for key, col, name in (("step_compute_ms", "tab:blue", "compute"), ("comm_ms", "tab:orange",
                                                                            "communication"),
                               ("wait_ms", "tab:gray", "waiting (barrier / bound)")):
            vals = [p.get(key) or 0.0 for p in pts]
            ax.bar(xs, vals, bottom=bottom, color=col, label=name, width=0.7)
            bottom = [a + v for a, v in zip(bottom, vals)]
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8, rotation=90 if width > 16.0 else 0)
        # a bar of several trials is the median of their windows' means, as the table's columns are
        several = any((p.get("trials") or 0) > 1 for p in pts)
        ax.set_ylabel("ms per step (window mean, median of trials)" if several
                      else "ms per step (mean over the window)")
        ax.set_title("Where a worker's step goes (* = workers > cores)")
        ax.set_ylim(0, max(bottom) * 1.25 if max(bottom) > 0 else 1)
        ax.legend(fontsize=7, ncol=3, loc="upper center")
        ax.grid(alpha=0.3, axis="y")
        paths.append(save(fig, TIME_SPLIT_PLOT))
    return paths
