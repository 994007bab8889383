"""One measured point: a real server and N real workers on this machine, steady state.

Start ``pscnn server`` (a run far too long to finish) and N ``pscnn worker``
processes, wait until every worker has pushed, let it warm up, then measure a
window between two ``status`` answers: images/s and updates/s from the
server's own counters, its CPU seconds from /proc.  Everything is stopped
afterwards and the server's ``metrics.jsonl`` step records of that window give
the staleness distribution and the per-step split into compute /
communication / waiting that the workers reported.
"""
from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

from cnn_core.text import for_count
from pscnn.launcher import LocalCluster, flag_with, query_status, wait_for

from .common import (THROUGHPUT_LR, THROUGHPUT_MOMENTUM, BenchError, bench_env, last_line, process_failed,
                     proc_cpu_seconds, step_records)

BIG_EPOCHS = 100_000            # a run that never ends within a benchmark window


def server_flags(mode: str, batch: int, out: Path, model: str = "seed", lr: float = THROUGHPUT_LR, epochs: int = BIG_EPOCHS,
                 train_limit: int = 0, mnist_dir: str | None = None, extra: list[str] = (),
                 optimizer: str = "sgd") -> list[str]:
    """Flags of a throughput benchmark's server: momentum SGD at a constant rate by default,
    the update the single-process baseline makes, whatever the mode's default optimizer.
    Paths and the model as --flag=VALUE (:func:`pscnn.launcher.flag_with`): ``--out -b`` was refused."""
    flags = ["--mode", mode, "--batch-size", str(batch), "--epochs", str(epochs), "--train-limit", str(train_limit),
             flag_with("--model", model), "--optimizer", optimizer, "--lr", str(lr), "--schedule", "constant",
             *(["--momentum", str(THROUGHPUT_MOMENTUM)] if optimizer == "sgd" else []),
             "--checkpoint-every", "0",
             "--peer-timeout", "60",
             "--lease-timeout", "120", "--final-eval-timeout", "0", flag_with("--out", out), "--log-level", "WARNING",
             *extra]
    if mnist_dir:
        flags.append(flag_with("--mnist-dir", mnist_dir))
    return flags


def worker_flags(threads: int, compute_ms: float | None, mnist_dir: str | None, overlap: bool = False,
                 check_memory: bool = True) -> list[str]:
    """``check_memory``: False (the bench's --no-memory-check) hands the workers --no-memory-check."""
    flags = ["--threads", str(threads), "--log-level", "WARNING", "--give-up-after", "60",
             *(["--overlap"] if overlap else []), *([] if check_memory else ["--no-memory-check"])]
    if compute_ms is not None:
        flags += ["--compute-ms", f"{compute_ms:g}"]
    if mnist_dir:
        flags.append(flag_with("--mnist-dir", mnist_dir))
    return flags


def _stamped_status(endpoint: str) -> tuple[float, dict | None, float | None]:
    t_a = time.monotonic()
    st = query_status(endpoint, timeout=5.0)
    t_b = time.monotonic()
    return (t_a + t_b) / 2, st, t_b - t_a


def measure_point(out: Path, *, mode: str, workers: int, batch: int, seconds: float, warmup: float,
                  threads: int = 1, compute_ms: float | None = None, model: str = "seed", lr: float = THROUGHPUT_LR,
                  mnist_dir: str | None = None, keep_openblas: bool = False, startup_timeout: float = 120.0,
                  keep_logs: bool = False, overlap: bool = False, server_extra: list[str] = (),
                  check_memory: bool = True) -> dict:
    """Run one configuration and return its measurements (a flat dict).  ``server_extra``: more
    flags for its server (an ssp point's --staleness).  ``check_memory``: see :func:`worker_flags`."""
    if out.exists():
        shutil.rmtree(out)
    cluster = LocalCluster(out, threads=threads)
    cluster.env = bench_env(threads, keep_openblas, base=cluster.env)
    # a worker loads only the slice of MNIST the server's run uses: the whole set, for honest batches
    try:
        server = cluster.start_server(server_flags(mode, batch, out / "server", model=model, lr=lr,
                                                   mnist_dir=mnist_dir, extra=server_extra))
        wait_for(lambda: server.poll() is not None or query_status(cluster.endpoint, 0.5), startup_timeout,
                 what="the server to answer", on_fail=lambda: cluster.log_tail("server"))
        if server.poll() is not None:
            raise process_failed("the server", server.returncode, cluster.log_tail("server"), cluster.logs)
        flags = worker_flags(threads, compute_ms, mnist_dir, overlap=overlap and mode == "async",
                             check_memory=check_memory)
        for i in range(workers):
            cluster.start_worker(f"worker-{i}", flags)

        def check_running():
            dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
            if "server" in dead:        # named first: the workers may have exited for its going
                raise process_failed("the server", server.returncode, cluster.log_tail("server"), cluster.logs)
            if dead:
                raise process_failed(dead[0], cluster.procs[dead[0]].returncode, cluster.log_tail(dead[0]),
                                     cluster.logs)

        def all_pushing():
            check_running()
            st = query_status(cluster.endpoint, 1.0)
            return st if st and st["contributors"] >= workers else None

        wait_for(all_pushing, startup_timeout + 5 * workers, interval=0.25,
                 what=f"{workers} {for_count(workers, 'worker')} to push",
                 on_fail=lambda: cluster.log_tail("worker-0"))
        time.sleep(warmup)
        worker_pids = [p.pid for n, p in cluster.procs.items() if n.startswith("worker")]
        cpu_s0 = proc_cpu_seconds(server.pid)
        cpu_w0 = [proc_cpu_seconds(pid) for pid in worker_pids]
        t0, st0, lat0 = _stamped_status(cluster.endpoint)
        time.sleep(seconds)
        t1, st1, lat1 = _stamped_status(cluster.endpoint)
        cpu_s1 = proc_cpu_seconds(server.pid)
        cpu_w1 = [proc_cpu_seconds(pid) for pid in worker_pids]
        if st0 is None or st1 is None:
            said = last_line(cluster.log_tail("server"))
            raise BenchError("the server stopped answering status during the window"
                             + (f": {said}" if said else "") + f" (logs in {cluster.logs})")
        check_running()                 # a worker lost in the warm-up or the window: fewer than N measured
    finally:
        cluster.stop_all(grace=5.0)
        cluster.close()
    window = t1 - t0
    updates = st1["version"] - st0["version"]
    samples = st1["samples_applied"] - st0["samples_applied"]
    res = {"window_s": window, "updates": updates, "samples": samples,
           "images_per_second": samples / window, "updates_per_second": updates / window,
           "status_latency_ms": 1e3 * max(lat0, lat1)}
    if cpu_s0 is not None and cpu_s1 is not None:
        res["server_cpu_fraction"] = (cpu_s1 - cpu_s0) / window
        pushes = samples / batch if batch else 0
        res["server_cpu_ms_per_push"] = 1e3 * (cpu_s1 - cpu_s0) / pushes if pushes else None
    w = [b - a for a, b in zip(cpu_w0, cpu_w1) if a is not None and b is not None]
    if w:
        res["workers_cpu_fraction"] = sum(w) / window
        res["cpu_share_per_worker"] = sum(w) / window / len(w)
        pushes = samples / batch if batch else 0
        res["worker_cpu_ms_per_push"] = 1e3 * sum(w) / pushes if pushes else None
        if cpu_s0 is not None and cpu_s1 is not None and sum(w) + cpu_s1 - cpu_s0 > 0:
            # images per CPU-second of the whole run (workers + server): what other tenants of a
            # shared machine cannot change, unlike images per wall second
            res["images_per_cpu_second"] = samples / (sum(w) + cpu_s1 - cpu_s0)
    res.update(split_from_log(out / "server" / "metrics.jsonl", st0["version"], st1["version"]))
    if not keep_logs:
        shutil.rmtree(out, ignore_errors=True)
    return res


def split_from_log(metrics_path: Path, v0: int, v1: int) -> dict:
    """Per-step compute / comm / wait (ms, means) and the staleness histogram of versions (v0, v1]."""
    recs = [r for r in step_records(metrics_path) if v0 < int(r.get("version", -1)) <= v1]
    out = {"step_records": len(recs)}
    if not recs:
        return out
    for key, name in (("compute_s", "step_compute_ms"), ("comm_s", "comm_ms"), ("wait_s", "wait_ms")):
        vals = [float(r.get(key, 0.0)) for r in recs]
        out[name] = 1e3 * sum(vals) / len(vals)
    hist = Counter()
    for r in recs:
        st = r.get("staleness", [])
        for s in (st if isinstance(st, list) else [st]):
            hist[int(s)] += 1
    total = sum(hist.values())
    if total:
        out["staleness_mean"] = sum(k * v for k, v in hist.items()) / total
        out["staleness_max"] = max(hist)
        ordered = sorted(hist.elements())
        out["staleness_p50"] = ordered[len(ordered) // 2]
        out["staleness_p99"] = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        out["staleness_hist"] = {str(k): v for k, v in sorted(hist.items())}
    return out
