"""The GPU path (``device="gpu"``) run here, without a GPU, on tests/fake_cupy.py.

The fake stands in for CuPy and refuses what CuPy refuses (a host array mixed
into device work, implicit conversion to the host, the NumPy-only functions and
methods), so these tests fail on any NumPy-only call slipped into the code a GPU
runs: the engine, the optimizers, evaluation, checkpoints, ``pscnn train`` and a
trainer's step.  What it cannot check (CUDA kernels, cuBLAS's rounding) is
tests/test_gpu.py's, on a lent GPU.
"""
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import fake_cupy
from cnn_core import backend
from cnn_core.checkpoint import load_model_checkpoint, save_model_checkpoint
from cnn_core.errors import ConfigError
from cnn_core.flat import FlatArrays
from cnn_core.metrics import evaluate
from cnn_core.model import build_model
from cnn_core.optim import OPTIMIZERS, build_optimizer
from pscnn import protocol as P
from worker.trainer import Trainer

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py")
_spec = importlib.util.spec_from_file_location("gpu_check", _SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.fixture
def cupy(monkeypatch):
    return fake_cupy.install(monkeypatch)


def device_and_host_models(spec, dtype):
    """The same model on the fake device and on the CPU, with a batch of its input."""
    dev = build_model(spec, seed=2, dtype=dtype, device="gpu")
    cpu = build_model(spec, seed=2, dtype=dtype, device="cpu")
    c, h, w = cpu.spec["input_shape"]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2 * cpu.CPU_CHUNK + 3, c, h, w)).astype(dtype)   # the CPU runs three chunks
    y = rng.integers(0, cpu.num_classes, len(x))
    return dev, cpu, x, y


def test_the_fake_refuses_what_cupy_refuses(cupy):
    # Each refusal here is one a real CuPy makes: without them the tests below could not fail.
    a = cupy.zeros(3)
    host = np.ones(3)
    for mixed in (lambda: a + host, lambda: cupy.add(a, host), lambda: cupy.maximum(a, a, out=host),
                  lambda: a.__setitem__(Ellipsis, host), lambda: np.asarray(a), lambda: list(a)):
        with pytest.raises(TypeError):
            mixed()
    with pytest.raises(AttributeError):
        cupy.errstate
    b = product = cupy.eye(2)
    product @= cupy.eye(2)                      # a new array, as on CuPy: not written in place
    assert product is not b
    a[...] = cupy.asarray(host)
    assert float(a.sum()) == 3.0 and fake_cupy.counts == {"h2d": 1, "d2h": 0, "sync_reads": 1}


@pytest.mark.parametrize("spec,dtype,tol", [("light", "float32", 1e-5), (gpu_check.SMALL_SPEC, "float64", 1e-12)])
def test_model_forward_backward_predict_and_evaluate_run_on_the_device(cupy, spec, dtype, tol):
    dev, cpu, x, y = device_and_host_models(spec, dtype)
    assert isinstance(dev.params.flat, cupy.ndarray)
    dev.reseed((1, 2, 3))
    cpu.reseed((1, 2, 3))
    d_loss, d_logits, d_grads = dev.loss_and_grads(x, y)       # whole, as on a GPU
    c_loss, c_logits, c_grads = cpu.loss_and_grads(x, y)       # in chunks
    assert isinstance(d_logits, cupy.ndarray) and d_loss == pytest.approx(c_loss, rel=tol)
    assert gpu_check.scaled_err(d_logits, c_logits) < tol
    for name, grad in c_grads.items():
        assert isinstance(d_grads[name], cupy.ndarray) and d_grads[name].dtype == grad.dtype, name
        assert gpu_check.scaled_err(d_grads[name], grad) < tol, name
    for name, value in cpu.state.items():
        assert gpu_check.scaled_err(dev.state[name], value) < tol, name
    xe = np.concatenate([x] * 5)                     # more than GPU_EVAL_CHUNK: evaluated in chunks
    assert gpu_check.scaled_err(dev.forward(xe, train=False), cpu.forward(xe, train=False)) < tol
    np.testing.assert_array_equal(fake_cupy.host(dev.predict(x, batch_size=50)), cpu.predict(x, batch_size=50))
    d_eval, c_eval = evaluate(dev, x, y, batch_size=40), evaluate(cpu, x, y, batch_size=40)
    assert d_eval["confusion_matrix"] == c_eval["confusion_matrix"]
    assert d_eval["loss"] == pytest.approx(c_eval["loss"], rel=tol)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_step_save_and_resume_on_the_device(cupy, name, tmp_path):
    dev, cpu, x, y = device_and_host_models("light", "float64")
    config = {"name": name, "lr": 0.01, "l2": 1e-3, "l1": 1e-4, **({"momentum": 0.9, "nesterov": True}
                                                                   if name == "sgd" else {})}
    optimizers = {"dev": build_optimizer(config), "cpu": build_optimizer(config)}
    for _ in range(2):
        for key, model in (("dev", dev), ("cpu", cpu)):
            optimizers[key].step(model.params, model.loss_and_grads(x[:8], y[:8])[2])
    assert gpu_check.scaled_err(dev.params.flat, cpu.params.flat) < 1e-12
    save_model_checkpoint(tmp_path / "dev.npz", dev, optimizers["dev"], step=2)
    loaded, optimizer, _ = load_model_checkpoint(tmp_path / "dev.npz", device="gpu")
    assert isinstance(loaded.params.flat, cupy.ndarray)
    for model in (loaded, cpu):
        model.reseed(7)                                 # the same dropout masks
    optimizer.step(loaded.params, loaded.loss_and_grads(x[:8], y[:8])[2])     # the host state moves over
    optimizers["cpu"].step(cpu.params, cpu.loss_and_grads(x[:8], y[:8])[2])
    assert gpu_check.scaled_err(loaded.params.flat, cpu.params.flat) < 1e-12


def test_a_trainers_step_on_the_device_moves_weights_and_gradients_in_one_transfer_each(cupy):
    """A trainer with --device gpu: the server's weights in as one host-to-device copy, the batch's
    gradients out as one host buffer in the server's layout (one device-to-host copy)."""
    trainer = Trainer(client=None, device="gpu")
    dev, cpu, x, y = device_and_host_models(gpu_check.SMALL_SPEC, "float32")
    trainer.model = dev
    trainer.run = {"seed": 5, "batch_size": 16, "num_samples": len(y)}
    trainer.data = (dev.xp.asarray(x), dev.xp.asarray(y))
    layout = P.model_layout(cpu)
    weights = FlatArrays(layout, np.concatenate([cpu.params.flat, *(v.ravel() for v in cpu.state.values())]))
    weights.flat[:] = np.random.default_rng(6).standard_normal(weights.flat.shape) * 0.1
    before = dict(fake_cupy.counts)
    trainer.model.assign(weights)
    assert fake_cupy.counts["h2d"] - before["h2d"] == 1         # one host-to-device copy, not one per array
    before = dict(fake_cupy.counts)
    result, push = trainer.compute({"epoch": 0, "batch": 1})
    assert fake_cupy.counts["d2h"] - before["d2h"] == 1
    # Each a host wait on a GPU: the input is finite, the labels in range (twice: before a BatchNorm
    # moves its statistics, then in the loss), the loss, the count correct
    assert fake_cupy.counts["sync_reads"] - before["sync_reads"] == 5
    assert type(push.flat) is np.ndarray and push.specs == layout
    cpu.assign({k: v.copy() for k, v in weights.items()})
    cpu.reseed((5, 0, 1))
    idx = trainer._epoch_batches[1][1]
    c_loss, _, c_grads = cpu.loss_and_grads(x[idx], y[idx])
    assert result["loss"] == pytest.approx(c_loss, rel=1e-5) and result["count"] == 16
    for name, grad in c_grads.items():
        assert gpu_check.scaled_err(push[name], grad) < 1e-5, name


def test_gpu_checks_worker_step_moves_what_a_trainer_moves(cupy):
    """benchmarks/gpu_check.py times a trainer's step on the GPU: the weights in as one buffer, the
    gradients out as one (it copied each gradient on its own, and no weights, timing another step)."""
    _, _, worker_step, _, _ = gpu_check.pscnn_fns("gpu", cupy, 8, 16)
    before = dict(fake_cupy.counts)
    pushed = worker_step()
    assert type(pushed) is np.ndarray
    assert fake_cupy.counts["d2h"] - before["d2h"] == 1
    assert fake_cupy.counts["h2d"] - before["h2d"] == 3         # the weights, the images, the labels


def test_pscnn_train_runs_on_the_device(cupy, tmp_path, mnist_dir):
    from cnn_core.training import train
    summary = train({"model": "light", "seed": 1, "train_limit": 256, "test_limit": 200, "batch_size": 64,
                     "epochs": 1, "mnist_dir": mnist_dir, "device": "gpu", "out": str(tmp_path / "run"),
                     "optimizer": {"name": "adam", "lr": 0.002}}, progress=False)
    assert summary["status"] == "complete" and summary["device"] == "gpu"
    assert summary["platform"]["cupy"] == cupy.__version__ and 0 <= summary["test_accuracy"] <= 1
    loaded, _, _ = load_model_checkpoint(tmp_path / "run" / "model.npz", device="gpu")
    assert isinstance(loaded.params.flat, cupy.ndarray)


def test_the_gpu_tests_pass_on_the_fake():
    """The GPU tests (pytest -m gpu) run only where a GPU is lent, a few times so far: a test broken
    as a test (a helper renamed, an API gone) would spend that GPU time. Here they run on the fake."""
    tests = Path(__file__).parent
    files = sorted(str(path) for path in tests.glob("test_*.py") if "mark.gpu" in path.read_text())
    assert str(tests / "test_gpu.py") in files
    proc = subprocess.run([sys.executable, str(tests / "fake_cupy.py"), "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           *files], capture_output=True, text=True, timeout=300, cwd=tests.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "needs CuPy and a usable CUDA device" not in proc.stdout      # run, not skipped
    assert re.search(r"\b(1[89]|[2-9]\d) passed", proc.stdout), proc.stdout[-1000:]


# --------------------------------------------------------------------------- no usable GPU: why, and what to install
def cupy_without_a_device(driver_version: int, device_error: str):
    """A CuPy that imports but has no usable device, as on a machine without a GPU or with an old driver."""
    def device_count():
        raise RuntimeError(device_error)
    runtime = types.SimpleNamespace(getDeviceCount=device_count, driverGetVersion=lambda: driver_version)
    return types.SimpleNamespace(is_available=lambda: False, cuda=types.SimpleNamespace(runtime=runtime))


def gpu_refusal() -> str:
    with pytest.raises(ConfigError) as info:
        backend.array_module("gpu")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_no_cupy_names_the_extras_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)          # import cupy: ModuleNotFoundError
    message = gpu_refusal()
    assert message.startswith("device 'gpu' requested but CuPy is not installed: install ")
    assert "gpu extra (cupy-cuda12x) for a CUDA 12 driver" in message
    assert "gpu-cuda13 extra (cupy-cuda13x) for a CUDA 13 driver" in message
    assert not backend.gpu_available()


def test_cupy_without_a_driver_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", cupy_without_a_device(
        0, "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"))
    assert gpu_refusal() == ("device 'gpu' requested but CuPy finds no usable CUDA device (cudaErrorInsufficientDriver: "
                             "CUDA driver version is insufficient for CUDA runtime version): no NVIDIA driver is loaded")


def test_a_cuda13_wheel_on_a_cuda12_driver_names_the_extra_that_fits(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", cupy_without_a_device(
        12040, "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"))
    monkeypatch.setattr(backend, "_installed", lambda wheel: wheel == "cupy-cuda13x")
    assert gpu_refusal().endswith("): cupy-cuda13x needs a CUDA 13 driver, and this one supports CUDA 12.4; "
                                  "install pscnn's gpu extra (cupy-cuda12x) in its place")
