"""Engine benchmark: pscnn's training step and inference vs references.

Measures, at one BLAS thread, in one process, interleaved trial by trial so
that machine noise hits every contender alike:

* pscnn "seed" model training step (forward + backward + SGD-momentum update)
  at batch 64, and inference at batch 1000, in images/s.  The step is
  ``Model.loss_and_grads``, what ``pscnn train`` and the trainers run (on the
  CPU, chunks of ``Model.CPU_CHUNK`` images, each forward and backward while
  its activations are in cache); ``pscnn_whole_batch`` is the same step as one
  ``forward`` and one ``backward`` over the whole batch;
* the same model in PyTorch 2.13 CPU (NCHW and channels_last), when torch is
  installed;
* a straightforward float64 NCHW im2col implementation with Python loops over
  kernel offsets (``cnn_core.reference``);
* where pscnn's step time goes, layer by layer.

Rates are medians over trials; each ratio is the median of the per-trial
ratios (the two contenders measured back to back), what to compare across
machines.  OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (set on the build machines,
they halve numpy's sgemm speed) are removed for this process unless
``--keep-openblas-env`` is given: a user's machine has neither.

    python benchmarks/bench_engine.py [--trials 7] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

_OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _reexec_without_openblas_env(argv) -> None:
    """Restart this script without the OPENBLAS_* overrides (they are read at load)."""
    if "--keep-openblas-env" in argv or not any(v in os.environ for v in _OPENBLAS_VARS):
        return
    env = {k: v for k, v in os.environ.items() if k not in _OPENBLAS_VARS}
    os.execve(sys.executable, [sys.executable, *argv], env)


def main(argv=None) -> dict:
    argv = sys.argv if argv is None else argv
    _reexec_without_openblas_env(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cnn_core.data import MNIST_FILES  # noqa: PLC0415  (after the re-exec: the OPENBLAS_* overrides are gone)
    from cnn_core.text import for_count  # noqa: PLC0415
    from pscnn.bench.common import check_writable  # noqa: PLC0415
    from pscnn.cli import _int_in, positive_int  # noqa: PLC0415

    train_images, test_images = MNIST_FILES["train-images"]["count"], MNIST_FILES["test-images"]["count"]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--trials", type=positive_int, default=7)
    p.add_argument("--steps", type=positive_int, default=15, help="training steps per trial")
    p.add_argument("--reference-steps", type=positive_int, default=3,
                   help="float64 reference steps per trial (each is ~5x a pscnn step)")
    # at most an MNIST split's images, the most pscnn runs at once (a billion: a MemoryError traceback)
    p.add_argument("--batch", type=lambda text: _int_in(text, 1, train_images), default=64,
                   help=f"training batch (at most {train_images})")
    p.add_argument("--infer-batch", type=lambda text: _int_in(text, 1, test_images), default=1000,
                   help=f"inference batch (at most {test_images})")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--keep-openblas-env", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv[1:])
    if args.json is not None:           # checked now, not after minutes of measuring
        check_writable(p, "--json", args.json)

    import numpy as np
    try:                                   # a test extra, not a pscnn dependency
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        p.error("threadpoolctl is not installed: pip install threadpoolctl (it pins the BLAS to one thread)")
    threadpool_limits(1)
    from cnn_core import build_model, softmax_cross_entropy
    from cnn_core.backend import tune_host_allocator
    tune_host_allocator()
    from cnn_core.optim import build_optimizer
    from cnn_core.reference import ReferenceModel
    from pscnn.bench.torch_reference import torch_model

    blas = [f"{i['internal_api']} {i.get('architecture', '')} threads={i['num_threads']}" for i in threadpool_info()]
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.batch, 1, 28, 28)).astype(np.float32)
    yb = rng.integers(0, 10, args.batch)
    xi = rng.standard_normal((args.infer_batch, 1, 28, 28)).astype(np.float32)

    model = build_model("seed", seed=0)
    opt = build_optimizer({"name": "sgd", "lr": 0.01, "momentum": 0.9})

    def pscnn_step():                      # what pscnn train and the trainers run
        _, _, grads = model.loss_and_grads(xb, yb)
        opt.step(model.params, grads)

    whole_model = build_model("seed", seed=0)
    whole_opt = build_optimizer({"name": "sgd", "lr": 0.01, "momentum": 0.9})

    def pscnn_whole_batch_step():          # the public forward/backward over the whole batch at once
        _, d = softmax_cross_entropy(whole_model.forward(xb, train=True), yb)
        whole_opt.step(whole_model.params, whole_model.backward(d))

    ref_model = build_model("seed", seed=0, dtype="float64")
    ref = ReferenceModel(ref_model)
    ref_opt = build_optimizer({"name": "sgd", "lr": 0.01, "momentum": 0.9})
    xb64 = xb.astype(np.float64)

    def reference_step():
        _, grads = ref.loss_and_grads(xb64, yb)
        ref_opt.step(ref.params, grads)

    train = {"pscnn": pscnn_step, "pscnn_whole_batch": pscnn_whole_batch_step,
             "reference_f64_loops": reference_step}
    infer = {"pscnn": lambda: model.forward(xi, train=False)}

    torch_version = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
            print("torch not installed: no PyTorch reference (pip install torch==2.13.0)")
        if torch is not None:
            torch_version = torch.__version__
            torch.set_num_threads(1)
            for fmt, mf in (("torch_nchw", torch.contiguous_format), ("torch_channels_last", torch.channels_last)):
                net = torch_model(torch, "seed").to(memory_format=mf)
                topt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
                tx = torch.from_numpy(xb).contiguous(memory_format=mf)
                ty = torch.from_numpy(yb)
                txi = torch.from_numpy(xi).contiguous(memory_format=mf)

                def torch_step(net=net, topt=topt, tx=tx, ty=ty):
                    topt.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(net(tx), ty).backward()
                    topt.step()

                def torch_infer(net=net, txi=txi):
                    with torch.inference_mode():
                        net.eval()
                        net(txi)
                        net.train()

                train[fmt] = torch_step
                infer[fmt] = torch_infer

    def rate(fn, images, reps):
        fn()                                   # warm: allocator, caches
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return images * reps / (time.perf_counter() - t)

    train_rates = {k: [] for k in train}
    infer_rates = {k: [] for k in infer}
    from tqdm import tqdm
    for _ in tqdm(range(args.trials), desc="trials", file=sys.stderr):
        for name, fn in train.items():
            reps = args.reference_steps if name.startswith("reference") else args.steps
            train_rates[name].append(rate(fn, args.batch, reps))
        for name, fn in infer.items():
            infer_rates[name].append(rate(fn, args.infer_batch, 2))

    med = {"train": {k: float(np.median(v)) for k, v in train_rates.items()},
           "infer": {k: float(np.median(v)) for k, v in infer_rates.items()}}
    ratios = {kind: {k: float(np.median(np.array(rates["pscnn"]) / np.array(v))) for k, v in rates.items()}
              for kind, rates in (("train", train_rates), ("infer", infer_rates))}
    breakdown = _layer_breakdown(model, xb, yb, opt, np)
    result = {"batch": args.batch, "infer_batch": args.infer_batch, "trials": args.trials,
              "blas": blas, "torch": torch_version, "cpu_count": os.cpu_count(),
              "images_per_second": med, "pscnn_over": ratios, "step_breakdown_ms": breakdown}

    print(f"\nBLAS: {'; '.join(blas)}; torch: {torch_version}; "
          f"medians of {args.trials} {for_count(args.trials, 'trial')} "
          "(ratios: the median of the per-trial ratios)")
    print(f"training step, batch {args.batch}, 1 thread:")
    for kind in ("train", "infer"):
        if kind == "infer":
            print(f"inference, batch {args.infer_batch}, 1 thread:")
        for name, v in med[kind].items():
            print(f"  {name:<22}{v:>9,.0f} img/s   pscnn / this = {ratios[kind][name]:5.2f}x")
    total = sum(breakdown.values())
    print("where a pscnn training step goes (ms, median):")
    for name, ms in sorted(breakdown.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<22}{ms:7.2f}  {100 * ms / total:5.1f}%")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


def _layer_breakdown(model, xb, yb, opt, np, reps: int = 9) -> dict:
    """Median ms per step: each layer (forward + backward, over all chunks),
    the rest of ``loss_and_grads`` (the loss, summing the chunks' gradients,
    the dense weight gradients taken over the whole batch), and the optimizer
    update.  Times the layers in place, on the real path."""
    current: dict = {}

    def timing(layer):
        forward, backward = layer.forward, layer.backward

        def timed_forward(x, train=True):
            t = time.perf_counter()
            out = forward(x, train)
            current[layer.name] = current.get(layer.name, 0.0) + time.perf_counter() - t
            return out

        def timed_backward(d, cache, need_dx=True, **options):    # a chunked step's Dense: weight_grad=False
            t = time.perf_counter()
            out = backward(d, cache, need_dx, **options)
            current[layer.name] = current.get(layer.name, 0.0) + time.perf_counter() - t
            return out
        layer.forward, layer.backward = timed_forward, timed_backward

    reps_ms = []
    for layer in model.layers:
        timing(layer)
    try:
        for _ in range(reps + 1):          # the first is a warm-up
            current.clear()
            t = time.perf_counter()
            _, _, grads = model.loss_and_grads(xb, yb)
            current["loss, chunk sums"] = time.perf_counter() - t - sum(current.values())
            t = time.perf_counter()
            opt.step(model.params, grads)
            current["sgd_update"] = time.perf_counter() - t
            reps_ms.append({k: v * 1e3 for k, v in current.items()})
    finally:
        for layer in model.layers:         # back to the class's methods
            del layer.forward, layer.backward
    return {key: float(np.median([rep[key] for rep in reps_ms[1:]])) for key in reps_ms[0]}


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:              # Ctrl-C: one line, as pscnn's commands say it
        print("bench_engine.py: interrupted", file=sys.stderr)
        sys.exit(130)
