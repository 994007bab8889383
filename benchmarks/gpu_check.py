"""One-shot GPU check of cnn_core: correctness against the CPU engine, then speed vs PyTorch CUDA.

Run once on a machine with a CUDA GPU (needs numpy and cupy; torch optional;
nothing else from pscnn's dependencies: only the numpy/cupy parts of cnn_core
are imported)::

    python benchmarks/gpu_check.py [--json out.json] [--trials 7] [--no-torch]
    python benchmarks/gpu_check.py --cpu-dry-run     # no GPU: numpy stands in, tiny counts

Checks (exit status 1 if any fails):

* "seed" model, float32, same seed, dropout p=0: GPU vs CPU logits and every
  gradient, max error relative to each tensor's largest magnitude (< 1e-4);
* float64 GPU vs float64 CPU gradients (< 1e-10, expected ~1e-13), on "seed"
  and on a small spec with every layer type (conv stride 2, batchnorm,
  residual, leaky_relu/elu/silu, overlapping maxpool, dense), plus
  BatchNorm running statistics.  (The finite-difference gradcheck helper is
  CPU-only; agreement with the CPU engine, itself gradchecked and compared
  with PyTorch in tests/, stands in for it.)
* dropout on the device: the fraction dropped, and masks identical to the
  CPU's for the same (key, counter) (``cnn_core/rng.py``).

Timings (medians of ``--trials`` trials, ``cupy.cuda.Device().synchronize()``
around each): "seed" training step (forward + loss + backward + SGD-momentum
update, inputs already on the device) at batch 64 and 256, a trainer's sync step
(the weights and the batch in from the host, the gradients back in one buffer) at batch 64, inference at batch
1000; the same in PyTorch CUDA (NCHW and channels_last, float32 with TF32 off,
cudnn.benchmark on), where a pscnn step spends its time, layer by layer, and
what a batch's reseeded dropout masks cost against a new device generator.
Exit status: 0 all checks passed, 1 a check failed, 2 no usable GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnn_core.backend import array_module, to_numpy  # noqa: E402
from cnn_core.errors import ConfigError  # noqa: E402
from cnn_core.flat import FlatArrays  # noqa: E402
from cnn_core.layers import Dropout  # noqa: E402
from cnn_core.losses import softmax_cross_entropy  # noqa: E402
from cnn_core.model import PRESETS, build_model  # noqa: E402
from cnn_core.rng import uniform  # noqa: E402
from cnn_core.text import for_count  # noqa: E402
from pscnn.bench.common import check_writable  # noqa: E402
from pscnn.bench.torch_reference import torch_model  # noqa: E402
from pscnn.cli import positive_int  # noqa: E402

F32_TOL = 1e-4       # float32, GPU vs CPU: different summation orders (cuBLAS vs OpenBLAS), ~1e-6 seen
F64_TOL = 1e-10      # float64: ~1e-13 expected

SMALL_SPEC = {
    "input_shape": [2, 13, 11],
    "layers": [   # no conv bias feeds a BatchNorm directly: such a bias has an exactly 0 gradient
        {"type": "conv2d", "name": "c1", "out_channels": 6, "kernel": 3, "stride": 2, "padding": 1},
        {"type": "leaky_relu", "alpha": 0.1},
        {"type": "batchnorm2d", "name": "bn1"},
        {"type": "residual", "name": "res", "layers": [
            {"type": "batchnorm2d", "name": "bn"},
            {"type": "conv2d", "name": "ca", "out_channels": 6, "kernel": 3, "padding": 1},
            {"type": "elu"},
            {"type": "conv2d", "name": "cb", "out_channels": 6, "kernel": [3, 1], "padding": [1, 0]},
        ]},
        {"type": "silu"},
        {"type": "conv2d", "name": "c2", "out_channels": 5, "kernel": [2, 3], "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel": 3, "stride": 2},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.0},
        {"type": "dense", "name": "fc", "units": 7},
    ],
}


def no_dropout(spec):
    spec = copy.deepcopy(PRESETS[spec] if isinstance(spec, str) else spec)
    for layer in spec["layers"]:
        if layer["type"] == "dropout":
            layer["p"] = 0.0
    return spec


def scaled_err(a, b) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    a, b = np.asarray(to_numpy(a), dtype=np.float64), np.asarray(to_numpy(b), dtype=np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if b.size else 0.0
    return diff / scale if scale > 0 else diff


def compare(spec, dtype, dev, batch, seed=0):
    """Build ``spec`` on ``dev`` and on the CPU; errors of logits, loss, grads and state."""
    m_dev = build_model(spec, seed=seed, dtype=dtype, device=dev)
    m_cpu = build_model(spec, seed=seed, dtype=dtype, device="cpu")
    rng = np.random.default_rng(seed + 1)
    for k, v in m_cpu.params.items():              # non-zero biases, same on both
        if k.endswith("bias"):
            v[...] = 0.1 * rng.standard_normal(v.shape)
            m_dev.params[k][...] = m_dev.xp.asarray(v)
    for k, v in m_cpu.params.items():
        assert np.array_equal(to_numpy(m_dev.params[k]), v), f"{k}: different initial weights"
    c, h, w = m_cpu.spec["input_shape"]
    x = rng.standard_normal((batch, c, h, w)).astype(dtype)
    y = rng.integers(0, m_cpu.num_classes, batch)
    errs = {}
    errs["logits(eval)"] = scaled_err(m_dev.forward(m_dev.xp.asarray(x), train=False), m_cpu.forward(x, train=False))
    out = {}
    for name, m in (("dev", m_dev), ("cpu", m_cpu)):
        logits = m.forward(m.xp.asarray(x), train=True)
        loss, d = softmax_cross_entropy(logits, m.xp.asarray(y))
        out[name] = (logits, loss, m.backward(d))
    errs["logits(train)"] = scaled_err(out["dev"][0], out["cpu"][0])
    errs["loss"] = abs(out["dev"][1] - out["cpu"][1]) / abs(out["cpu"][1])
    for k in m_cpu.params:
        g_dev, g_cpu = out["dev"][2][k], out["cpu"][2][k]
        assert tuple(g_dev.shape) == tuple(g_cpu.shape) and g_dev.dtype == g_cpu.dtype, k
        errs[k] = scaled_err(g_dev, g_cpu)
    for k in m_cpu.state:
        errs[k] = scaled_err(m_dev.state[k], m_cpu.state[k])
    return errs


# --------------------------------------------------------------------------- timing

class Timer:
    def __init__(self, sync):
        self.sync = sync

    def rate(self, fn, images, reps, trials):
        """Median images/s over ``trials`` trials of ``reps`` calls (after one warm call)."""
        fn()
        self.sync()
        rates = []
        for _ in range(trials):
            self.sync()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            self.sync()
            rates.append(images * reps / (time.perf_counter() - t))
        return float(np.median(rates))


def pscnn_fns(dev, xp, batch, infer_batch, seed=0):
    model = build_model(no_dropout("seed"), seed=seed, dtype="float32", device=dev)
    rng = np.random.default_rng(seed)
    xb_host = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    yb_host = rng.integers(0, 10, batch)
    xb, yb = xp.asarray(xb_host), xp.asarray(yb_host)
    xi = xp.asarray(rng.standard_normal((infer_batch, 1, 28, 28)).astype(np.float32))
    vel = {k: xp.zeros_like(v) for k, v in model.params.items()}
    lr, mom = np.float32(0.01), np.float32(0.9)

    def step():
        _, d = softmax_cross_entropy(model.forward(xb, train=True), yb)
        grads = model.backward(d)
        for k, p in model.params.items():           # SGD with momentum, as torch.optim.SGD
            v = vel[k]
            v *= mom
            v += grads[k]
            p -= lr * v

    host_weights = FlatArrays(model.params.specs, to_numpy(model.params.flat).copy())

    def worker_step():          # as a trainer's sync step: weights and batch in from the host, gradients out
        model.assign(host_weights)                  # one host-to-device copy (Model.assign)
        grads = model.loss_and_grads(xb_host, yb_host)[2]
        return to_numpy(FlatArrays.pack(grads).flat)    # one buffer back, as Trainer.push_arrays sends it

    def infer():
        return model.forward(xi, train=False)

    return model, step, worker_step, infer, (xb, yb)


def torch_fns(torch, device, memory_format, batch, infer_batch):
    net = torch_model(torch, "seed", dropout=0.0).to(device).to(memory_format=memory_format)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=g).to(device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    xi = torch.randn(infer_batch, 1, 28, 28, generator=g).to(device).contiguous(memory_format=memory_format)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    def infer():
        with torch.inference_mode():
            net.eval()
            out = net(xi)
            net.train()
        return out

    return step, infer


def layer_breakdown(model, xb, yb, sync, reps):
    """Median ms per layer (forward + backward) and loss, synchronizing around each call."""
    times: dict = {}

    def timed(key, fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.setdefault(key, []).append((time.perf_counter() - t) * 1e3)
        return out

    for _ in range(reps + 1):                       # the first rep is a warm-up
        h = model.xp.asarray(xb).transpose(0, 2, 3, 1)
        caches = [None] * len(model.layers)
        for idx in model._order:
            layer = model.layers[idx]
            h, caches[idx] = timed(layer.name, lambda layer=layer, h=h: layer.forward(h, True))
        _, d = timed("loss", lambda h=h: softmax_cross_entropy(h, yb))
        for pos in range(len(model._order) - 1, -1, -1):
            i = model._order[pos]
            layer = model.layers[i]
            d, _ = timed(layer.name, lambda layer=layer, d=d, i=i, pos=pos:
                         layer.backward(d, caches[i], need_dx=pos > 0))
    out = {}
    for key, vals in times.items():
        per_rep = len(vals) // (reps + 1)
        sums = [sum(vals[i * per_rep:(i + 1) * per_rep]) for i in range(1, reps + 1)]
        out[key] = float(np.median(sums))
    return out


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no GPU: run every code path on numpy (and torch CPU) with tiny counts")
    # 0 meant the default, and -1 no trial at all
    p.add_argument("--trials", type=positive_int, default=None, help="timing trials (default 7; dry run 1)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.json is not None:           # checked now, not after the whole run
        check_writable(p, "--json", args.json)
    t_start = time.perf_counter()
    dry = args.cpu_dry_run
    trials = args.trials or (1 if dry else 7)
    results: dict = {"dry_run": dry, "checks": {}, "timings": {}}
    failures: list[str] = []

    # ---------------------------------------------------------------- device info
    print(f"python {platform.python_version()}, numpy {np.__version__}")
    if dry:
        dev, xp = "cpu", np

        def sync():
            pass
        print("CPU DRY RUN: numpy stands in for cupy; timings are meaningless")
    else:
        try:
            dev, xp = "gpu", array_module("gpu")
        except ConfigError as exc:          # says why: CuPy missing, no driver, a wheel for another CUDA
            print(f"no usable GPU: {exc} (use --cpu-dry-run to test the script)")
            return 2
        import cupy
        d = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(d.id)
        free, total = cupy.cuda.runtime.memGetInfo()
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        info = {"cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                "cuda_driver": cupy.cuda.runtime.driverGetVersion(), "device": name,
                "compute_capability": d.compute_capability, "sm_count": props["multiProcessorCount"],
                "memory_gib": round(total / 2**30, 1), "free_gib": round(free / 2**30, 1),
                "cupy_tf32": os.environ.get("CUPY_TF32", "0")}
        results["device"] = info
        print("cupy {cupy}, CUDA runtime {cuda_runtime}, driver {cuda_driver}; {device} (sm_{compute_capability}, "
              "{sm_count} SMs, {memory_gib} GiB, {free_gib} free); CUPY_TF32={cupy_tf32}".format(**info))

        def sync():
            cupy.cuda.Device().synchronize()

    # ---------------------------------------------------------------- correctness
    cases = [("seed f32", no_dropout("seed"), "float32", 16 if dry else 64, F32_TOL),
             ("seed f64", no_dropout("seed"), "float64", 4 if dry else 16, F64_TOL),
             ("small all-layers f64", SMALL_SPEC, "float64", 4 if dry else 16, F64_TOL),
             ("small all-layers f32", SMALL_SPEC, "float32", 4 if dry else 16, F32_TOL)]
    print(f"\ncorrectness, {dev} vs cpu (max |a-b| / max |b| per tensor):")
    for label, spec, dtype, batch, tol in cases:
        try:
            errs = compare(spec, dtype, dev, batch)
        except Exception as exc:                   # report and go on: the summary says what broke
            errs = {"exception": float("inf")}
            print(f"  {label}: EXCEPTION {type(exc).__name__}: {exc}")
        worst_key = max(errs, key=errs.get)
        ok = errs[worst_key] < tol
        results["checks"][label] = {"ok": ok, "tol": tol, "errors": errs}
        print(f"  {'ok  ' if ok else 'FAIL'} {label:<22} batch {batch:<3} worst {errs[worst_key]:.2e} "
              f"({worst_key}), tol {tol:.0e}")
        if not ok:
            failures.append(f"{label}: {worst_key} error {errs[worst_key]:.2e} >= {tol:.0e}")
            for k, v in errs.items():
                print(f"       {k:<26}{v:.2e}")

    # dropout on the device: fraction dropped and inverted scaling
    try:
        layer = Dropout(0.3)
        layer.build((10_000,), xp, np.float32, np.random.default_rng(0))
        out, _ = layer.forward(xp.ones((8, 10_000), dtype=xp.float32), train=True)
        out = to_numpy(out)
        frac = float((out == 0).mean())
        ok = abs(frac - 0.3) < 0.01 and np.allclose(out[out != 0], 1 / 0.7)
    except Exception as exc:
        ok, frac = False, float("nan")
        print(f"  dropout: EXCEPTION {type(exc).__name__}: {exc}")
    results["checks"]["dropout p=0.3"] = {"ok": ok, "dropped": frac}
    print(f"  {'ok  ' if ok else 'FAIL'} dropout p=0.3 on {dev}: dropped {frac:.4f}, survivors scaled 1/0.7")
    if not ok:
        failures.append(f"dropout: dropped fraction {frac}")
    # cnn_core.rng is integer arithmetic: a (key, counter) draws the same masks on both devices
    try:
        same = all(np.array_equal(to_numpy(uniform(xp, 99, 4, (64, 128), dt)), uniform(np, 99, 4, (64, 128), dt))
                   for dt in (np.float32, np.float64))
    except Exception as exc:
        same = False
        print(f"  dropout masks: EXCEPTION {type(exc).__name__}: {exc}")
    results["checks"]["dropout masks equal the cpu's"] = {"ok": same}
    print(f"  {'ok  ' if same else 'FAIL'} dropout masks on {dev} equal the cpu's (cnn_core.rng)")
    if not same:
        failures.append("dropout masks differ from the cpu's")

    # ---------------------------------------------------------------- timings
    batches = (8, 16) if dry else (64, 256)
    infer_batch = 32 if dry else 1000
    reps = {b: (1 if dry else max(5, 2560 // b)) for b in batches}
    infer_reps = 1 if dry else 10
    timer = Timer(sync)
    rates: dict = {}
    print(f"\ntimings (images/s, median of {trials} {for_count(trials, 'trial')}):")
    try:
        for b in batches:
            model, step, worker_step, infer, (xb, yb) = pscnn_fns(dev, xp, b, infer_batch)
            rates[f"pscnn train b{b}"] = timer.rate(step, b, reps[b], trials)
            if b == batches[0]:
                rates[f"pscnn worker-step b{b} (host io)"] = timer.rate(worker_step, b, reps[b], trials)
                rates[f"pscnn infer b{infer_batch}"] = timer.rate(infer, infer_batch, infer_reps, trials)
            if b == batches[-1]:
                results["breakdown_ms"] = layer_breakdown(model, xb, yb, sync, reps=1 if dry else 5)
            del model, step, worker_step, infer
    except Exception as exc:
        failures.append(f"pscnn timing: {type(exc).__name__}: {exc}")
        print(f"  pscnn timing: EXCEPTION {type(exc).__name__}: {exc}")

    torch_info = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
            print("  torch not installed: no PyTorch comparison")
        if torch is not None and (dry or torch.cuda.is_available()):
            tdev = "cpu" if dry else "cuda"
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.allow_tf32 = False       # plain float32, like cupy's default
            torch.backends.cuda.matmul.allow_tf32 = False
            if dry:
                torch.set_num_threads(1)
            torch_info = {"version": torch.__version__, "device": tdev,
                          "cudnn": torch.backends.cudnn.version() if not dry else None}
            tsync = (lambda: None) if dry else torch.cuda.synchronize
            ttimer = Timer(tsync)
            try:
                for fmt_name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
                    for b in batches:
                        step, infer = torch_fns(torch, tdev, fmt, b, infer_batch)
                        rates[f"torch {fmt_name} train b{b}"] = ttimer.rate(step, b, reps[b], trials)
                        if b == batches[0]:
                            rates[f"torch {fmt_name} infer b{infer_batch}"] = ttimer.rate(
                                infer, infer_batch, infer_reps, trials)
            except Exception as exc:
                print(f"  torch timing: EXCEPTION {type(exc).__name__}: {exc}")
                torch_info["error"] = f"{type(exc).__name__}: {exc}"
        elif torch is not None:
            print("  torch sees no CUDA device: no PyTorch comparison")
    results["torch"] = torch_info
    results["timings"] = rates

    # What a trainer pays per batch for its reseeded dropout masks (64 x 128, the seed model's),
    # against a fresh device generator per batch, which initializes its cuRAND states each time.
    def per_call_us(fn, n=3 if dry else 200):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t) / n * 1e6

    try:
        mask_us = {"cnn_core.rng (SplitMix64)": per_call_us(lambda: uniform(xp, 1, 2, (64, 128))),
                   "a new default_rng per batch": per_call_us(
                       lambda: xp.random.default_rng(7).random((64, 128), dtype=np.float32))}
        results["dropout_mask_us"] = mask_us
        print("  dropout mask per batch (us): " + ", ".join(f"{k} {v:,.0f}" for k, v in mask_us.items()))
    except Exception as exc:
        print(f"  dropout mask timing: EXCEPTION {type(exc).__name__}: {exc}")

    def ratio(kind, b):
        ours = rates.get(f"pscnn {kind} b{b}")
        best = max((rates.get(f"torch {f} {kind} b{b}", 0.0) for f in ("nchw", "channels_last")), default=0.0)
        return f"{best / ours:5.1f}x" if ours and best else "  n/a"

    for b in batches:
        row = [f"  train b{b:<5}  pscnn {rates.get(f'pscnn train b{b}', float('nan')):>10,.0f}"]
        for f in ("nchw", "channels_last"):
            row.append(f"torch {f} {rates.get(f'torch {f} train b{b}', float('nan')):>10,.0f}")
        print("   ".join(row) + f"   torch best / pscnn {ratio('train', b)}")
    row = [f"  infer b{infer_batch:<5}  pscnn {rates.get(f'pscnn infer b{infer_batch}', float('nan')):>10,.0f}"]
    for f in ("nchw", "channels_last"):
        row.append(f"torch {f} {rates.get(f'torch {f} infer b{infer_batch}', float('nan')):>10,.0f}")
    print("   ".join(row) + f"   torch best / pscnn {ratio('infer', infer_batch)}")
    key = f"pscnn worker-step b{batches[0]} (host io)"
    if key in rates:
        print(f"  worker step b{batches[0]} (host weights and batch in, one gradient buffer out): "
              f"{rates[key]:,.0f} img/s")
    if results.get("breakdown_ms"):
        bd = results["breakdown_ms"]
        total = sum(bd.values())
        print(f"  pscnn step at batch {batches[-1]}, per layer fwd+bwd (ms, synchronized, total {total:.2f}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(bd.items(), key=lambda kv: -kv[1])))

    # ---------------------------------------------------------------- summary
    elapsed = time.perf_counter() - t_start
    results["elapsed_s"] = elapsed
    results["failures"] = failures
    print(f"\n{'PASS' if not failures else 'FAIL'}: {len(results['checks']) - sum(not c['ok'] for c in results['checks'].values())}"
          f"/{len(results['checks'])} correctness checks passed; {elapsed:.1f} s")
    for f in failures:
        print(f"  - {f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:              # Ctrl-C: one line, as pscnn's commands and bench_engine.py say it
        print("gpu_check.py: interrupted", file=sys.stderr)
        sys.exit(130)
