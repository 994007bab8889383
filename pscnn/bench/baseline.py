"""The single-process baseline: ``pscnn train``'s step rate, in a process of its own.

    OPENBLAS_NUM_THREADS=1 python -m pscnn.bench.baseline --batch 64 --seconds 5 [--model seed] [--mnist-dir D]

One step is what a single-process ``pscnn train`` does per batch: forward,
softmax cross-entropy, backward, and the SGD-momentum update, on real MNIST
batches (random images when MNIST is not available).  Prints one JSON line.

It runs as its own process so that the BLAS thread count (set in the
environment by the caller, before numpy loads) and the OPENBLAS_* overrides
are exactly those of the workers it is compared with.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .common import THROUGHPUT_LR, THROUGHPUT_MOMENTUM


def measure(model_name: str, batch: int, seconds: float, warmup_steps: int = 3, mnist_dir: str | None = None,
            seed: int = 0, lr: float = THROUGHPUT_LR, momentum: float = THROUGHPUT_MOMENTUM) -> dict:
    import numpy as np  # noqa: PLC0415

    from cnn_core.backend import tune_host_allocator  # noqa: PLC0415
    from cnn_core.model import build_model  # noqa: PLC0415
    from cnn_core.optim import build_optimizer  # noqa: PLC0415

    tune_host_allocator()                      # as the pscnn entry points do
    data = "mnist"
    try:
        from cnn_core.data import batch_index, load_mnist  # noqa: PLC0415
        x, y = load_mnist("train", mnist_dir=mnist_dir, download=False)
        batches = batch_index(len(y), batch, seed, 0, drop_last=True)
    except Exception:                          # no MNIST here: the step costs the same on random images
        data = "random"
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((batch * 8, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, batch * 8)
        batches = [np.arange(i * batch, (i + 1) * batch) for i in range(8)]
    model = build_model(model_name, seed=seed)
    opt = build_optimizer({"name": "sgd", "lr": lr, "momentum": momentum})

    def step(i):
        idx = batches[i % len(batches)]
        _, _, grads = model.loss_and_grads(x[idx], y[idx])
        opt.step(model.params, grads)

    for i in range(warmup_steps):
        step(i)
    times = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    i = 0
    while True:
        t = time.perf_counter()
        step(warmup_steps + i)
        now = time.perf_counter()
        times.append(now - t)
        i += 1
        if now - t0 >= seconds and i >= 3:
            break
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    times.sort()
    med = times[len(times) // 2]
    return {"steps": i, "seconds": elapsed, "steps_per_second": i / elapsed,
            "images_per_second": i * batch / elapsed, "median_step_ms": med * 1e3,
            "median_steps_per_second": 1.0 / med, "cpu_ms_per_step": 1e3 * cpu / i,
            "cpu_fraction": cpu / elapsed, "images_per_cpu_second": i * batch / cpu if cpu > 0 else None,
            "data": data, "batch": batch, "model": model_name,
            "threads": int(os.environ.get("OPENBLAS_NUM_THREADS", "0") or 0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="single-process training step rate", allow_abbrev=False)
    p.add_argument("--model", default="seed")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--mnist-dir", default=None)
    p.add_argument("--lr", type=float, default=THROUGHPUT_LR)
    p.add_argument("--momentum", type=float, default=THROUGHPUT_MOMENTUM)
    args = p.parse_args(argv)
    res = measure(args.model, args.batch, args.seconds, args.warmup_steps, args.mnist_dir, lr=args.lr,
                  momentum=args.momentum)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
