"""The engine on a CUDA GPU (CuPy) agrees with the CPU engine.

Every test here but the last two is skipped unless
``cnn_core.backend.gpu_available()`` (pytest's quiet output, CI's, lists why: the
next to last checks that); the last runs
``benchmarks/gpu_check.py --cpu-dry-run`` (numpy only, tiny counts) so the
one-shot GPU script cannot rot unnoticed on machines without a GPU.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cnn_core import Model, build_model, softmax_cross_entropy, to_numpy
from cnn_core.backend import gpu_available

# Helpers shared with the one-shot GPU script (benchmarks/ is not a package).
_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py")
_spec = importlib.util.spec_from_file_location("gpu_check", _SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA device")]


def gpu_test(fn):
    for mark in needs_gpu:
        fn = mark(fn)
    return fn

SMALL_SPEC = {**gpu_check.SMALL_SPEC, "input_shape": [2, 11, 10]}   # the one-shot script's all-layer spec
no_dropout = gpu_check.no_dropout
scaled_err = gpu_check.scaled_err


def gpu_cpu_pair(spec, dtype, batch, seed=0):
    gpu = build_model(spec, seed=seed, dtype=dtype, device="gpu")
    cpu = build_model(spec, seed=seed, dtype=dtype, device="cpu")
    rng = np.random.default_rng(seed + 1)
    for k, v in cpu.params.items():
        if k.endswith("bias"):
            v[...] = 0.1 * rng.standard_normal(v.shape)
            gpu.params[k][...] = gpu.xp.asarray(v)
    c, h, w = cpu.spec["input_shape"]
    x = rng.standard_normal((batch, c, h, w)).astype(dtype)
    y = rng.integers(0, cpu.num_classes, batch)
    return gpu, cpu, x, y


@gpu_test
@pytest.mark.parametrize("spec,dtype,tol", [
    ("light", "float32", 1e-4),
    ("light", "float64", 1e-11),
    (SMALL_SPEC, "float32", 1e-4),
    (SMALL_SPEC, "float64", 1e-11),
])
def test_gpu_matches_cpu(spec, dtype, tol):
    gpu, cpu, x, y = gpu_cpu_pair(no_dropout(spec), dtype, batch=8)
    import cupy
    assert all(isinstance(v, cupy.ndarray) for v in gpu.params.values())
    for k, v in cpu.params.items():
        np.testing.assert_array_equal(to_numpy(gpu.params[k]), v)       # same init on the host
    assert scaled_err(gpu.forward(x, train=False), cpu.forward(x, train=False)) < tol
    res = {}
    for name, m in (("gpu", gpu), ("cpu", cpu)):
        logits = m.forward(m.xp.asarray(x), train=True)
        loss, d = softmax_cross_entropy(logits, y)
        res[name] = (logits, loss, m.backward(d))
    assert isinstance(res["gpu"][0], cupy.ndarray) and res["gpu"][0].dtype == np.dtype(dtype)
    assert scaled_err(res["gpu"][0], res["cpu"][0]) < tol
    assert res["gpu"][1] == pytest.approx(res["cpu"][1], rel=tol)
    assert list(res["gpu"][2]) == list(cpu.params)
    for k, g in res["cpu"][2].items():
        assert res["gpu"][2][k].shape == g.shape and res["gpu"][2][k].dtype == g.dtype, k
        assert scaled_err(res["gpu"][2][k], g) < tol, k
    for k, v in cpu.state.items():
        assert scaled_err(gpu.state[k], v) < tol, k


@gpu_test
def test_gpu_dropout_masks_statistics_and_determinism():
    a, b = (build_model("light", seed=4, device="gpu") for _ in range(2))
    x = np.random.default_rng(5).standard_normal((16, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(to_numpy(a.forward(x, train=True)), to_numpy(b.forward(x, train=True)))
    layer = a.layers[9]
    out, mask = layer.forward(a.xp.ones((64, 1000), dtype=np.float32), train=True)
    out = to_numpy(out)
    assert abs((out == 0).mean() - 0.25) < 0.01
    np.testing.assert_allclose(out[out != 0], 1 / 0.75, rtol=1e-6)


@gpu_test
def test_gpu_draws_the_cpu_dropout_masks():
    """cnn_core.rng is integer arithmetic: the same (key, counter) gives the same masks on both."""
    import cupy
    from cnn_core.rng import uniform
    for dtype in (np.float32, np.float64):
        np.testing.assert_array_equal(to_numpy(uniform(cupy, 99, 4, (64, 128), dtype)),
                                      uniform(np, 99, 4, (64, 128), dtype))
    gpu, cpu = (build_model("light", seed=4, device=d) for d in ("gpu", "cpu"))
    x = np.ones((8, 32), dtype=np.float32)
    for model in (gpu, cpu):
        model.reseed((0, 2, 5))
    np.testing.assert_array_equal(to_numpy(gpu.layers[9].forward(gpu.xp.asarray(x))[0]),
                                  cpu.layers[9].forward(x)[0])


@gpu_test
def test_gpu_maxpool_ties_match_cpu():
    spec = {"input_shape": [2, 9, 9], "layers": [
        {"type": "maxpool2d", "kernel": 3, "stride": 2}, {"type": "relu"},
        {"type": "maxpool2d", "kernel": 2, "stride": 2}, {"type": "flatten"}, {"type": "dense", "units": 3}]}
    gpu, cpu, _, y = gpu_cpu_pair(spec, "float64", batch=4)
    x = np.random.default_rng(6).integers(-1, 2, (4, 2, 9, 9)).astype(np.float64)
    grads = {}
    for name, m in (("gpu", gpu), ("cpu", cpu)):
        _, d = softmax_cross_entropy(m.forward(x, train=True), y)
        grads[name] = m.backward(d)
    for k, g in grads["cpu"].items():
        np.testing.assert_allclose(to_numpy(grads["gpu"][k]), g, rtol=1e-12, atol=1e-15)


@gpu_test
def test_gpu_in_place_updates_and_predict():
    model = build_model("light", seed=0, device="gpu")
    x = np.random.default_rng(7).standard_normal((5, 1, 28, 28)).astype(np.float32)
    out0 = to_numpy(model.forward(x, train=False))
    model.params["fc2.bias"][...] += 1
    np.testing.assert_allclose(to_numpy(model.forward(x, train=False)), out0 + 1, rtol=1e-5, atol=1e-5)
    pred = model.predict(x, batch_size=2)
    assert pred.shape == (5,)
    np.testing.assert_array_equal(to_numpy(pred), out0.argmax(axis=1))


@gpu_test
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float64", 1e-11)])
def test_gpu_training_step_and_chunked_evaluation_match_cpu(dtype, tol):
    """loss_and_grads runs whole on a GPU and in chunks of CPU_CHUNK on the CPU; evaluation in
    chunks of GPU_EVAL_CHUNK on a GPU. Same values either way, dropout masks included."""
    import cupy
    gpu, cpu, x, y = gpu_cpu_pair("light", dtype, batch=2 * Model.CPU_CHUNK + 5)   # three CPU chunks
    results = {}
    for name, m in (("gpu", gpu), ("cpu", cpu)):
        m.reseed((3, 1, 4))
        results[name] = m.loss_and_grads(x, y)
    (g_loss, g_logits, g_grads), (c_loss, c_logits, c_grads) = results["gpu"], results["cpu"]
    assert isinstance(g_logits, cupy.ndarray) and g_logits.shape == c_logits.shape
    assert scaled_err(g_logits, c_logits) < tol
    assert float(g_loss) == pytest.approx(float(c_loss), rel=tol)
    assert list(g_grads) == list(cpu.params)
    for k, g in c_grads.items():
        assert isinstance(g_grads[k], cupy.ndarray) and g_grads[k].dtype == g.dtype, k
        assert scaled_err(g_grads[k], g) < tol, k
    n_eval = 2 * gpu.GPU_EVAL_CHUNK + 3                                          # three GPU chunks
    xe = np.random.default_rng(8).standard_normal((n_eval, 1, 28, 28)).astype(dtype)
    g_eval = gpu.forward(xe, train=False)
    assert isinstance(g_eval, cupy.ndarray) and g_eval.shape == (n_eval, 10)
    assert scaled_err(g_eval, cpu.forward(xe, train=False)) < tol


@gpu_test
def test_gpu_trainer_step_matches_cpu():
    """A trainer with --device gpu (data on the device, a host index per batch): the server's weights
    in as one host buffer (Model.assign's one copy), the gradients out as one host buffer in the
    server's layout, equal to the CPU's step on the same weights and batch."""
    from cnn_core.flat import FlatArrays
    from pscnn import protocol as P
    from worker.trainer import Trainer
    gpu, cpu, x, y = gpu_cpu_pair(SMALL_SPEC, "float32", batch=40)
    trainer = Trainer(client=None, device="gpu")
    trainer.model, trainer.run = gpu, {"seed": 5, "batch_size": 16, "num_samples": len(y)}
    trainer.data = (gpu.xp.asarray(x), gpu.xp.asarray(y))
    layout = P.model_layout(cpu)
    weights = FlatArrays(layout, np.random.default_rng(6).standard_normal(sum(
        int(np.prod(shape)) for _, shape in layout)).astype(np.float32) * 0.1)
    weights["bn1.running_var"][...] = 1.5                       # a variance is >= 0
    gpu.assign(weights)
    cpu.assign({k: v.copy() for k, v in weights.items()})
    for name, value in weights.items():
        np.testing.assert_array_equal(to_numpy({**gpu.params, **gpu.state}[name]), value, err_msg=name)
    result, push = trainer.compute({"epoch": 0, "batch": 1})
    assert type(push.flat) is np.ndarray and push.specs == layout
    cpu.reseed((5, 0, 1))
    idx = trainer._epoch_batches[1][1]
    c_loss, _, c_grads = cpu.loss_and_grads(x[idx], y[idx])
    assert result["loss"] == pytest.approx(c_loss, rel=1e-4) and result["count"] == 16
    for name, grad in c_grads.items():
        assert scaled_err(push[name], grad) < 1e-4, name
    for name, value in cpu.state.items():
        assert scaled_err(push[name], value) < 1e-4, name


@gpu_test
def test_gpu_pscnn_train_runs(tmp_path, mnist_dir):
    """pscnn train --device gpu: the optimizer's flat step, the divergence checks and the
    evaluation on the device, the platform record and a checkpoint saved from it."""
    import cupy
    from cnn_core.checkpoint import load_model_checkpoint
    from cnn_core.training import train
    summary = train({"model": "light", "seed": 1, "train_limit": 512, "test_limit": 500, "batch_size": 64,
                     "epochs": 1, "mnist_dir": mnist_dir, "device": "gpu", "out": str(tmp_path / "run"),
                     "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}, progress=False)
    assert summary["status"] == "complete" and summary["device"] == "gpu"
    assert summary["platform"]["cupy"] == cupy.__version__ and "gpu" in summary["platform"]
    assert summary["test_accuracy"] > 0.2      # 8 updates of the light model: 0.378 on the CPU; chance is 0.1
    loaded, _, _ = load_model_checkpoint(tmp_path / "run" / "model.npz", device="gpu")
    assert isinstance(loaded.params.flat, cupy.ndarray)


def test_quiet_runs_list_why_each_test_was_skipped(pytestconfig):
    # without -rs, `pytest -q` (make test, CI) counted the skipped GPU tests but never said why
    assert "-rs" in pytestconfig.getini("addopts")


def test_gpu_check_cpu_dry_run(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gc.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_check.py"), "--cpu-dry-run",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
    res = json.loads(out.read_text())
    assert res["dry_run"] and not res["failures"]
    assert len(res["checks"]) == 6 and all(c["ok"] for c in res["checks"].values())
    assert res["checks"]["dropout masks equal the cpu's"]["ok"]
    assert res["timings"]["pscnn train b8"] > 0 and res["breakdown_ms"]["conv2"] > 0
    assert set(res["dropout_mask_us"]) == {"cnn_core.rng (SplitMix64)", "a new default_rng per batch"}
    assert all(v > 0 for v in res["dropout_mask_us"].values())
