"""The PyTorch reference: DistributedDataParallel (gloo, CPU) on the same model.

:func:`measure_ddp` starts ``N`` processes (``python -m pscnn.bench.ddp``),
each training pscnn's "seed" architecture written in PyTorch at the same
per-process batch size and thread count; gradients are all-reduced by DDP
every step (synchronous data parallelism, like ``--mode sync``).  Rank 0
times a fixed number of steps between two barriers and reports aggregate
images/s.  Inputs are random tensors of MNIST's shape (the step's cost does
not depend on the pixel values).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .torch_reference import torch_model


def torch_available() -> bool:
    try:
        import importlib.util  # noqa: PLC0415
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def rank_command(rank: int, world: int, port: int, batch: int, seconds: float, threads: int, model: str,
                 result: Path) -> list[str]:
    """The command line of DDP rank ``rank``.  The model and the result as --flag=VALUE
    (:func:`pscnn.launcher.flag_with`): ``--model -m.json`` was refused."""
    from pscnn.launcher import flag_with  # noqa: PLC0415
    return [sys.executable, "-m", "pscnn.bench.ddp", "--rank", str(rank), "--world", str(world), "--port", str(port),
            "--batch", str(batch), "--seconds", str(seconds), "--threads", str(threads), flag_with("--model", model),
            flag_with("--result", result)]


def measure_ddp(world: int, batch: int, seconds: float, threads: int = 1, model: str = "seed",
                env: dict | None = None) -> dict:
    """Aggregate images/s of ``world`` DDP processes (medians are the caller's business)."""
    from pscnn.launcher import free_port  # noqa: PLC0415

    from .common import BenchError, PortTaken, reference_limit  # noqa: PLC0415
    port = free_port()                          # rank 0 listens there (torch's TCPStore)
    timeout = reference_limit(seconds)          # a fixed 300 s killed every run of --seconds 300 or more
    with tempfile.TemporaryDirectory(prefix="pscnn-ddp-") as tmp:
        result = Path(tmp) / "result.json"
        procs = []
        for rank in range(world):
            cmd = rank_command(rank, world, port, batch, seconds, threads, model, result)
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        outputs, timed_out = [], False
        try:
            for p in procs:
                try:
                    out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, _ = p.communicate()
                    timed_out = True
                outputs.append(out.decode(errors="replace"))
                if p.returncode != 0:           # the others would wait for it until the time limit
                    break
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if timed_out:
            raise BenchError(f"DDP run with {world} processes did not finish within {timeout:g} s")
        if procs[0].returncode != 0 and f"port: {port}," in outputs[0] and "EADDRINUSE" in outputs[0]:
            raise PortTaken(f"DDP rank 0 could not listen on 127.0.0.1:{port}: address already in use")
        # Rank 0 writes the result (atomically) after every rank has passed the measured loop's last
        # barrier: a rank that dies after it, in gloo's teardown ("terminate called without an active
        # exception", seen under load), has not voided the measurement.
        if not result.exists():
            tail = "\n".join(o[-1500:] for o in outputs)
            raise RuntimeError(f"DDP run with {world} processes failed:\n{tail}")
        return json.loads(result.read_text())


def _run_rank(args) -> int:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    from cnn_core.runlog import write_json_atomic  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world)
    torch.manual_seed(0)
    net = DDP(torch_model(torch, args.model))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(args.rank)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(5):
        step()
    per_step = (time.perf_counter() - t) / 5
    steps = torch.tensor([max(5, int(args.seconds / max(per_step, 1e-4)))])
    dist.broadcast(steps, 0)                 # every rank runs the same number of steps
    n = int(steps.item())
    dist.barrier()
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    Path(f"{args.result}.rank{args.rank}").write_text(json.dumps({"cpu_s": cpu, "seconds": elapsed}))
    dist.barrier()                           # every rank's CPU time is on disk
    if args.rank == 0:
        ranks = [json.loads(Path(f"{args.result}.rank{r}").read_text()) for r in range(args.world)]
        cpu_total = sum(r["cpu_s"] for r in ranks)
        write_json_atomic(args.result, {
            "world": args.world, "batch": args.batch, "steps": n, "seconds": elapsed,
            "images_per_second": n * args.batch * args.world / elapsed, "steps_per_second": n / elapsed,
            "cpu_fraction": cpu_total / elapsed, "cpu_ms_per_step": 1e3 * cpu_total / (n * args.world),
            "images_per_cpu_second": n * args.batch * args.world / cpu_total if cpu_total > 0 else None,
            "torch": torch.__version__, "threads": args.threads, "model": args.model})
    dist.barrier()                           # no rank tears down while rank 0 still reads and writes
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="one rank of the DDP reference run", allow_abbrev=False)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="seed", help="a preset or a JSON spec, as pscnn's --model")
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return _run_rank(args)


if __name__ == "__main__":
    sys.exit(main())
