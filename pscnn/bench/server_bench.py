"""``pscnn bench server``: the parameter server's capacity as synthetic clients grow.

Synthetic clients (:mod:`pscnn.bench.synth`) do no compute: each keeps one
full-model push in flight and pushes again as soon as the reply (the next
task, with the newest weights) arrives, through the real server on loopback.
Measured per client count: cycles/s (push + reply), MB/s (both directions),
round-trip latency p50 / p99, and the server's CPU use.  Each point's window
opens ``--warmup`` seconds after every client has completed a cycle.

In the same run, interleaved trial by trial, the same clients run against a
raw pyzmq ROUTER that echoes the same frames back without copying: the
transport's limit on this machine.  ``server / echo`` is printed as a ratio.
With ``--curve`` the same server is measured a third way, interleaved too: with
CURVE authentication and encryption (keys made for the point, :mod:`pscnn.curve`),
and ``curve / plain`` is printed as a ratio.
``--profile`` runs the server under cProfile at one client count and writes
the top functions.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cnn_core.text import for_count
from pscnn.cli import (DEFAULT_LR, MODES, add_switch, given_flag, non_negative_float, non_negative_int, positive_float,
                       positive_int)

from .common import (MAX_BENCH_PEERS, BenchError, Interruption, OptionError, add_output_flags, bench_env,
                     bench_peers, busy_fraction, check_measured, check_out, check_server_flags, checking_options, cores,
                     data_files, description, fmt, fresh_output_folder, interrupted_status, last_line,
                     machine_cpu_ticks, machine_info, measurement_failures, median, on_a_free_port, parse_list,
                     percentile, plain_log_ticks, point_failed, print_table, print_written, proc_cpu_seconds,
                     process_failed, progress, pyplot, save_figure, server_failed, write_outputs)
from .synth import CLIENTS_CYCLING, ECHO_LISTENING

NAME = "server"
# What is measured: the server (plain, and with --curve its CURVE twin), and the raw echo.
KINDS = ("pscnn", "curve", "echo")
# What a run writes into --out (the plot with matplotlib, without --no-plots; the profile with
# --profile): an earlier run's go at the start.
CAPACITY_PLOT, PROFILE_DATA, PROFILE_TEXT = f"{NAME}_capacity.png", f"{NAME}.prof", f"{NAME}-profile.txt"
OUTPUTS = (*data_files(NAME), CAPACITY_PLOT, PROFILE_DATA, PROFILE_TEXT)
# How long a point's client processes may take to start and complete a cycle each, plus 0.1 s a
# client: past it the point failed (its clients' window would measure fewer clients than asked).
CLIENTS_CYCLING_TIMEOUT_S = 60.0


def add_parser(sub) -> None:
    p = sub.add_parser("server", help="server capacity under synthetic no-compute clients vs raw zmq echo",
                       description=description(__doc__))
    p.add_argument("--clients", default="1,4,16,64", help="synthetic client counts (default: 1,4,16,64)")
    p.add_argument("--mode", default="async", choices=MODES, help="server mode (default: async)")
    p.add_argument("--batch", type=positive_int, default=64, help="the run's batch size (samples per push; default 64)")
    p.add_argument("--model", default="seed",
                   help="a preset, a JSON spec or a spec file: sets the payload (default: seed, 1.7 MB)")
    p.add_argument("--optimizer", default="sgd", choices=list(DEFAULT_LR),
                   help="the server's update rule (default: sgd with momentum, the throughput benchmarks' "
                        "update; adam is what async runs use by default)")
    p.add_argument("--seconds", type=positive_float, default=5.0, help="measured window per point (default: 5)")
    p.add_argument("--warmup", type=non_negative_float, default=2.0,
                   help="seconds of cycling before the window, from when every client has completed a cycle "
                        "(default: 2)")
    p.add_argument("--trials", type=positive_int, default=3, help="trials; medians are reported (default: 3)")
    p.add_argument("--processes", type=non_negative_int, default=0,
                   help="client processes (0: min(clients, 4)); each runs clients/processes sockets, one at "
                        "least (a point of fewer clients runs one process per client)")
    add_switch(p, "--no-echo", help="skip the raw pyzmq echo reference")
    add_switch(p, "--curve", help="also measure the server with CURVE authentication and encryption (pscnn server "
                                  "--keys), interleaved trial by trial with the plain one: curve/plain is printed")
    p.add_argument("--profile", type=bench_peers, default=None, metavar="CLIENTS",
                   help="also profile the server (cProfile) with this many clients; top functions to "
                        + PROFILE_TEXT)
    add_output_flags(p, "server")


def run(args) -> int:
    clients = parse_list(args.clients, int, given_flag("clients"), low=1, high=MAX_BENCH_PEERS)
    _check_processes(args, clients)
    with checking_options():            # what the server would refuse, before anything starts
        check_out(args.out)
        check_server_flags(pscnn_server_flags(args, Path(args.out) / "unused", max([*clients, args.profile or 1])))
    out = fresh_output_folder(args.out, NAME, OUTPUTS)
    from pscnn.launcher import child_env  # noqa: PLC0415  (the children get every setting as a flag)
    env = bench_env(1, args.keep_openblas_env, base=child_env(1))
    # The server reads the test set at its start where MNIST_DIR is set, to score its final weights,
    # which a server measured here never does: a MNIST_DIR without the test set failed every point.
    env.pop("MNIST_DIR", None)
    machine = machine_info(args.keep_openblas_env)
    kinds = ["pscnn"] + (["curve"] if args.curve else []) + ([] if args.no_echo else ["echo"])
    rows = []
    total = len(clients) * len(kinds) * args.trials + (1 if args.profile else 0)
    bar = progress(total, "bench server", args.no_progress)
    stop = Interruption()
    failures = measurement_failures()
    profile_text = None
    with stop, bar:
        for trial in range(args.trials):
            for n in clients:
                for kind in kinds:
                    bar.set_postfix_str(f"trial {trial + 1}: {kind} x {n} {for_count(n, 'client')}")
                    what = f"trial {trial + 1}, {kind} x {n} {for_count(n, 'client')}"
                    try:
                        res = on_a_free_port(lambda: measure(kind, n, args, env), NAME, what)
                    except failures as exc:     # one failed point must not lose the others
                        res = point_failed(NAME, what, exc)
                    rows.append({"trial": trial, "kind": kind, "clients": n, **res})
                    bar.update()
        if args.profile:
            profiled = f"{args.profile} {for_count(args.profile, 'client')}"
            bar.set_postfix_str(f"profiling the server with {profiled}")
            try:
                res = on_a_free_port(lambda: measure("pscnn", args.profile, args, env,
                                                     profile=out / PROFILE_DATA),
                                     NAME, f"the profile with {profiled}")
                profile_text = _profile_report(out / PROFILE_DATA, out / PROFILE_TEXT, res)
            except failures as exc:
                point_failed(NAME, f"the profile with {profiled}", exc)
            bar.update()
    if stop.happened and not rows:      # no point measured: nothing to write
        raise KeyboardInterrupt
    summary = summarize(rows, clients)
    meta = {"bench": NAME, "machine": machine, "cores": cores(), "config": vars(args), "summary": summary,
            "interrupted": stop.happened,
            "payload_bytes": next((r["model_bytes"] for r in rows if r.get("model_bytes")), None)}
    csv_path, json_path = write_outputs(out, NAME, rows, meta)
    report(summary, machine, meta["payload_bytes"], args)
    if stop.happened:
        return interrupted_status(NAME, len(rows) + (profile_text is not None), total, csv_path, json_path)
    # the echo is the reference: with every server point failed, the server was not measured
    check_measured([r for r in rows if r["kind"] == "pscnn"], csv_path, "server point")
    if profile_text:
        print(f"\nserver profile ({args.profile} {for_count(args.profile, 'client')}, cProfile, top by own time):\n"
              f"{profile_text}")
    # (an earlier run's profile files were removed at the start: those there are this run's)
    print_written(csv_path, json_path, [] if args.no_plots else plot(summary, out, setting(meta["payload_bytes"], args)),
                  [path for path in (out / PROFILE_TEXT, out / PROFILE_DATA) if path.exists()])
    return 0


def _check_processes(args, clients: list[int]) -> None:
    """OptionError for a --processes above every point's client count (each process runs one client
    at least: it was cut down to the count without a word); a note when only some points have fewer."""
    if not args.processes:
        return
    counts = [*clients, *([args.profile] if args.profile else [])]
    if args.processes > max(counts):
        raise OptionError(f"{given_flag('processes')} {args.processes}: more client processes than clients "
                          f"(--clients {args.clients}{f', --profile {args.profile}' if args.profile else ''}); "
                          "each process runs one client at least")
    fewer = sorted({n for n in counts if n < args.processes})
    if fewer:
        print(f"pscnn bench server: --processes {args.processes}: the points of {', '.join(map(str, fewer))} "
              "clients run one process per client", file=sys.stderr)


def pscnn_server_flags(args, run_folder: Path, clients: int) -> list[str]:
    """The flags of the server measured with ``clients`` synthetic clients (bar --bind)."""
    from .cluster import server_flags  # noqa: PLC0415
    return [*server_flags(args.mode, args.batch, run_folder, model=args.model, optimizer=args.optimizer,
                          lr=DEFAULT_LR[args.optimizer]),      # the update's cost, not its size, matters
            "--max-workers", str(max(1024, clients))]


def clients_command(endpoint: str, kind: str, keys: Path | None, count: int, model: str, name: str,
                    result: Path) -> list[str]:
    """The command line of one process of ``count`` synthetic clients (:mod:`pscnn.bench.synth`).  Paths
    and the model as --flag=VALUE (:func:`pscnn.launcher.flag_with`): ``--model -m.json`` was refused."""
    from pscnn.launcher import flag_with  # noqa: PLC0415
    return [sys.executable, "-m", "pscnn.bench.synth", "clients", flag_with("--endpoint", endpoint), "--kind", kind,
            *([flag_with("--keys", keys)] if keys is not None else []), "--count", str(count),
            flag_with("--model", model), flag_with("--name", name), flag_with("--result", result)]


def measure(kind: str, n: int, args, env: dict, profile: Path | None = None) -> dict:
    """One point: a server (plain ``pscnn``, or ``curve``: with CURVE keys; or the echo) and ``n``
    synthetic clients; cycles in the window."""
    from pscnn.launcher import free_port, query_status  # noqa: PLC0415
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    nproc = args.processes or min(n, 4)
    nproc = max(1, min(nproc, n))
    server_kind = kind in ("pscnn", "curve")
    point = f"{kind}, {n} {for_count(n, 'client')}"    # what the failures name
    with tempfile.TemporaryDirectory(prefix="pscnn-bench-server-") as tmp:
        tmp = Path(tmp)
        client_keys_folder, status_keys = None, None    # the clients' --keys, and the status queries' keys
        if kind == "curve":
            from pscnn.curve import client_keys, make_keys  # noqa: PLC0415
            make_keys(tmp / "keys", ["clients"])
            client_keys_folder = tmp / "keys" / "clients"
            status_keys = client_keys(client_keys_folder)
        if server_kind:
            argv = ["-m", "pscnn", "server", "--bind", endpoint, *pscnn_server_flags(args, tmp / "run", n),
                    *(["--keys", str(tmp / "keys" / "server")] if kind == "curve" else [])]
            if profile is not None:
                argv = ["-m", "cProfile", "-o", str(profile), *argv]
        else:
            argv = ["-m", "pscnn.bench.synth", "echo", "--bind", endpoint]
        log = open(tmp / "server.log", "wb")
        server = subprocess.Popen([sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
        procs, client_logs = [], []
        try:
            from pscnn.launcher import wait_for  # noqa: PLC0415

            def server_log() -> str:
                return (tmp / "server.log").read_text(errors="replace")

            def server_exited() -> BenchError:  # its log goes with the temporary folder: its last line here
                return server_failed(f"the {kind} server ({n} {for_count(n, 'client')})", server.returncode,
                                     server_log(), endpoint)

            listening = ((lambda: query_status(endpoint, 0.5, status_keys)) if server_kind
                         else (lambda: ECHO_LISTENING in server_log()))
            wait_for(lambda: server.poll() is not None or listening(), 60, what=f"the {kind} server to listen")
            if server.poll() is not None:
                raise server_exited()
            for i in range(nproc):
                count = n // nproc + (1 if i < n % nproc else 0)
                cmd = clients_command(endpoint, "pscnn" if server_kind else kind, client_keys_folder, count,
                                      args.model, f"c{i}", tmp / f"clients-{i}.json")
                client_logs.append(open(tmp / f"clients-{i}.log", "wb"))
                procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=client_logs[-1],
                                              stderr=subprocess.STDOUT))

            def client_log(i: int) -> str:
                return (tmp / f"clients-{i}.log").read_text(errors="replace")

            def client_failed(i: int) -> BenchError:
                return process_failed(f"synthetic client process {i} ({point})", procs[i].returncode,
                                      client_log(i))

            def all_cycling() -> bool:
                if server.poll() is not None:
                    raise server_exited()
                for i, p in enumerate(procs):
                    if p.poll() is not None:
                        raise client_failed(i)
                return all(CLIENTS_CYCLING in client_log(i) for i in range(nproc))

            def not_cycling() -> str:
                i = next(i for i in range(nproc) if CLIENTS_CYCLING not in client_log(i))
                said = last_line(client_log(i))
                return (f"synthetic client process {i} of {nproc} had not completed one"
                        + (f": {said}" if said else ""))

            # the window opens once every client cycles (a process may take seconds to start on a loaded
            # machine: a fixed lead measured fewer clients than asked, or none), then --warmup later
            wait_for(all_cycling, CLIENTS_CYCLING_TIMEOUT_S + 0.1 * n, interval=0.05,
                     what=f"the synthetic clients ({point}) to complete a cycle each",
                     on_fail=not_cycling)
            t_start = time.monotonic() + args.warmup
            t_end = t_start + args.seconds
            for i, p in enumerate(procs):       # they count the cycles completed in the window, and stop at its end
                try:
                    p.stdin.write(f"{t_start!r} {t_end!r}\n".encode())
                    p.stdin.close()
                except BrokenPipeError:         # it exited since it said it cycles
                    p.wait(5)
                    raise client_failed(i) from None
            time.sleep(max(0.0, t_start - time.monotonic()))
            before = _server_sample(server.pid, endpoint if server_kind else None, status_keys)
            time.sleep(max(0.0, t_end - time.monotonic()))
            after = _server_sample(server.pid, endpoint if server_kind else None, status_keys)
            if server.poll() is not None:       # the clients' cycles (if any) were not with this server
                raise server_exited()
            results = []
            for i, p in enumerate(procs):
                try:
                    p.wait(timeout=30 + n)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                path = tmp / f"clients-{i}.json"
                if p.returncode != 0:
                    raise client_failed(i)
                if not path.exists():
                    said = last_line(client_log(i))
                    raise BenchError(f"synthetic client process {i} ({point}) wrote no result "
                                     f"{path.name}" + (f": {said}" if said else ""))
                results.append(json.loads(path.read_text()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
                if not p.stdin.closed:
                    p.stdin.close()
            for client_log_file in client_logs:
                client_log_file.close()
            if server.poll() is None:
                server.terminate()
                try:
                    server.wait(30 if profile else 10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait(5)
            log.close()
    window = args.seconds               # the clients count by their own clocks within [t_start, t_end]
    cycles = sum(r["cycles"] for r in results)
    lat = [v for r in results for v in r["latencies_ms"]]
    errors: dict = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    res = {"processes": nproc, "window_s": window, "cycles": cycles, "cycles_per_second": cycles / window,
           "mb_per_second": sum(r["bytes"] for r in results) / window / 1e6,
           "latency_p50_ms": percentile(lat, 50), "latency_p99_ms": percentile(lat, 99),
           "errors": errors,
           "model_bytes": results[0]["model_bytes"] if results else None}
    res.update(server_rates(before, after, cycles / window))
    return res


def _server_sample(pid: int, endpoint: str | None, status_keys) -> dict:
    """The server's counters now, each with when it was read (monotonic seconds): its process's and
    main thread's CPU seconds and the machine's (busy, total) ticks at ``cpu_at``; its version (None
    for the echo, ``endpoint`` None, or a server that does not answer within 2 s) at ``version_at``,
    the middle of the status request (a busy server's answer may take a while)."""
    from pscnn.launcher import query_status  # noqa: PLC0415
    sample = {"cpu_at": time.monotonic(), "process": proc_cpu_seconds(pid), "main_thread": proc_cpu_seconds(pid, pid),
              "machine": machine_cpu_ticks(), "version": None, "version_at": None}
    if endpoint is not None:
        asked = time.monotonic()
        st = query_status(endpoint, 2.0, status_keys)
        if st:
            sample["version"], sample["version_at"] = st["version"], (asked + time.monotonic()) / 2
    return sample


def server_rates(before: dict, after: dict, cycles_per_second: float) -> dict:
    """The server's figures between two :func:`_server_sample`: each count a difference of the two
    samples, over the time between them as measured (the samples are late by as much as the machine is
    loaded, and a status answer may take seconds: the nominal --seconds made its rates wrong).

    Where the window's CPU went.  The server's main thread runs the whole event loop
    (decode, validation, the update, replies), so at ~100% of a core it is the bottleneck;
    ZeroMQ's I/O threads make up the rest of the process.  The machine's busy share says
    whether the clients, the server and everything else ran out of cores.  ms per cycle:
    the CPU rate over the clients' cycle rate (each over its own window)."""
    out = {}
    cpu_elapsed = after["cpu_at"] - before["cpu_at"]
    for key in ("process", "main_thread"):
        if before[key] is not None and after[key] is not None and cpu_elapsed > 0:
            per_second = (after[key] - before[key]) / cpu_elapsed
            prefix = "server_cpu" if key == "process" else "server_main_thread"
            out[f"{prefix}_fraction"] = per_second
            out[f"{prefix}_ms_per_cycle"] = 1e3 * per_second / cycles_per_second if cycles_per_second else None
    if (busy := busy_fraction(before["machine"], after["machine"])) is not None:
        out["machine_busy_fraction"] = busy
    if before["version"] is not None and after["version"] is not None and after["version_at"] > before["version_at"]:
        out["server_updates_per_second"] = (after["version"] - before["version"]) / (after["version_at"]
                                                                                      - before["version_at"])
    return out


def _profile_report(prof: Path, text_path: Path, res: dict, top: int = 30) -> str:
    import io  # noqa: PLC0415
    import pstats  # noqa: PLC0415
    if not prof.exists():               # cProfile writes it at a clean exit only
        raise BenchError(f"the profiled server wrote no {prof.name}: it did not exit cleanly when stopped")
    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    buf.write("\n\n--- by cumulative time ---\n")
    stats.sort_stats("cumulative").print_stats(top)
    header = (f"cycles/s under the profiler: {res['cycles_per_second']:.0f} (profiling slows the server; "
              f"read the shares, not the rate)\n")
    text = header + buf.getvalue()
    text_path.write_text(text)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return header + "\n".join(lines[start:start + 16])


def summarize(rows, clients) -> list[dict]:
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]        # a failed point measured nothing
    out = []
    for n in clients:
        s = {"clients": n}
        for kind in KINDS:
            rs = [r for r in rows if r["clients"] == n and r["kind"] == kind]
            s[f"{kind}_failed"] = sum((r["clients"], r["kind"]) == (n, kind) for r in failed)
            if not rs:
                continue
            s[f"{kind}_trials"] = len(rs)
            for key in ("cycles_per_second", "mb_per_second", "latency_p50_ms", "latency_p99_ms",
                        "server_cpu_fraction", "server_cpu_ms_per_cycle", "server_main_thread_fraction",
                        "server_main_thread_ms_per_cycle", "machine_busy_fraction", "server_updates_per_second"):
                s[f"{kind}_{key}"] = median([r.get(key) for r in rs])
            errors: dict = {}
            for r in rs:
                for code, count in (r.get("errors") or {}).items():
                    errors[code] = errors.get(code, 0) + count
            s[f"{kind}_errors"] = errors
        s["server_over_echo"] = _trial_ratio(rows, n, "pscnn", "echo")
        if any(r["kind"] == "curve" for r in rows):
            s["curve_over_plain"] = _trial_ratio(rows, n, "curve", "pscnn")
        out.append(s)
    return out


def _trial_ratio(rows, n: int, kind: str, reference: str) -> float | None:
    """The median over trials of ``kind``'s cycles/s over ``reference``'s with ``n`` clients, each
    ratio of one trial's two points (measured one after the other: the machine's state alike)."""
    ratios = []
    for t in {r["trial"] for r in rows}:
        a = [r for r in rows if (r["trial"], r["clients"], r["kind"]) == (t, n, kind)]
        b = [r for r in rows if (r["trial"], r["clients"], r["kind"]) == (t, n, reference)]
        if a and b and b[0]["cycles_per_second"]:
            ratios.append(a[0]["cycles_per_second"] / b[0]["cycles_per_second"])
    return median(ratios)


def report(summary, machine, payload, args) -> None:
    mb = (payload or 0) / 1e6
    print(f"\nmachine: {machine.get('cpu_model') or '?'}, {cores()} usable cores; payload {mb:.2f} MB per "
          f"direction ({args.model} model), mode {args.mode}, optimizer {args.optimizer}; medians of {args.trials} "
          f"{for_count(args.trials, 'trial')}")
    headers = ["clients", "cycles/s", "MB/s", "p50 ms", "p99 ms", "server cpu", "srv ms/cycle", "main thread",
               "machine busy"]
    rows = [[s["clients"], fmt(s.get("pscnn_cycles_per_second")), fmt(s.get("pscnn_mb_per_second")),
             fmt(s.get("pscnn_latency_p50_ms"), ".2f"), fmt(s.get("pscnn_latency_p99_ms"), ".2f"),
             fmt(s.get("pscnn_server_cpu_fraction"), ".0%"), fmt(s.get("pscnn_server_cpu_ms_per_cycle"), ".2f"),
             fmt(s.get("pscnn_server_main_thread_fraction"), ".0%"), fmt(s.get("pscnn_machine_busy_fraction"), ".0%")]
            for s in summary]
    if not args.no_echo:                # with --no-echo its columns would be dashes only
        headers += ["echo rt/s", "echo MB/s", "echo p50 ms", "echo p99 ms", "echo busy", "server/echo"]
        for row, s in zip(rows, summary):
            row += [fmt(s.get("echo_cycles_per_second")), fmt(s.get("echo_mb_per_second")),
                    fmt(s.get("echo_latency_p50_ms"), ".2f"), fmt(s.get("echo_latency_p99_ms"), ".2f"),
                    fmt(s.get("echo_machine_busy_fraction"), ".0%"), fmt(s.get("server_over_echo"), ".2f")]
    print_table(headers, rows)
    print("server cpu: the server process, all threads, as a share of one core; main thread: its event loop "
          "(decode, checks, update, replies), the serial part; machine busy: every core, everything running")
    if args.curve:
        print("\nthe same server with CURVE (pscnn server --keys: every byte encrypted, every client's key checked):")
        print_table(["clients", "cycles/s", "MB/s", "p50 ms", "p99 ms", "server cpu", "srv ms/cycle", "curve/plain"],
                    [[s["clients"], fmt(s.get("curve_cycles_per_second")), fmt(s.get("curve_mb_per_second")),
                      fmt(s.get("curve_latency_p50_ms"), ".2f"), fmt(s.get("curve_latency_p99_ms"), ".2f"),
                      fmt(s.get("curve_server_cpu_fraction"), ".0%"),
                      fmt(s.get("curve_server_cpu_ms_per_cycle"), ".2f"), fmt(s.get("curve_over_plain"), ".2f")]
                     for s in summary])
    for s in summary:                   # refused requests are not cycles: a low rate with a reason
        if s.get("pscnn_errors"):
            errors = sum(s["pscnn_errors"].values())
            print(f"note: with {s['clients']} {for_count(s['clients'], 'client')} the server answered {errors} "
                  f"{for_count(errors, 'request')} with an error (not counted as cycles): "
                  + ", ".join(f"{code} x {count}" for code, count in sorted(s["pscnn_errors"].items())))
    for s in summary:                   # the medians above stand for fewer trials than asked
        clients = f"{s['clients']} {for_count(s['clients'], 'client')}"
        for kind, what in (("pscnn", "the server"), ("curve", "the server with CURVE"), ("echo", "the echo")):
            if s[f"{kind}_failed"]:
                trials = s.get(f"{kind}_trials", 0)
                print(f"note: {what} with {clients}: medians of {trials} {for_count(trials, 'trial')}; "
                      f"left out: {s[f'{kind}_failed']} failed")


def setting(payload, args) -> str:
    """What the plot measured, above it: a figure shown alone said "Server capacity" of what."""
    return (f"{args.model} model, {(payload or 0) / 1e6:.2f} MB each way; mode {args.mode}, optimizer {args.optimizer}; "
            f"medians of {args.trials} {for_count(args.trials, 'trial')}, {cores()} cores")


def plot(summary, out: Path, title: str = "") -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    xs = [s["clients"] for s in summary]
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), dpi=90)
    if title:
        fig.suptitle(title, fontsize=9)
    ax = axes[0]
    ax.plot(xs, [s.get("pscnn_cycles_per_second") for s in summary], "o-", label="pscnn server (push + pull)")
    if any(s.get("echo_cycles_per_second") for s in summary):
        ax.plot(xs, [s.get("echo_cycles_per_second") for s in summary], "s--", label="raw pyzmq echo (zero-copy)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("synthetic clients")
    ax.set_ylabel("cycles/s (full model each way)")
    ax.set_ylim(bottom=0)
    ax.set_title("Server capacity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    for kind, style, col in (("pscnn", "o-", "tab:blue"), ("echo", "s--", "tab:orange")):
        if any(s.get(f"{kind}_latency_p50_ms") for s in summary):
            ax.plot(xs, [s.get(f"{kind}_latency_p50_ms") for s in summary], style, color=col, label=f"{kind} p50")
            ax.plot(xs, [s.get(f"{kind}_latency_p99_ms") for s in summary], style, color=col, alpha=0.45,
                    label=f"{kind} p99")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.set_xticks(xs)
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("synthetic clients")
    ax.set_ylabel("round-trip latency, ms")
    ax.set_title("Latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return [save_figure(fig, out / CAPACITY_PLOT)]
