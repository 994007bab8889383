"""Checkpoint files: raw arrays + meta, model/optimizer round trips, corrupt files."""
import json
import os
import zipfile

import numpy as np
import pytest

from cnn_core.backend import gpu_available
from cnn_core.checkpoint import (load_checkpoint, load_model_checkpoint, save_checkpoint,
                                 save_model_checkpoint)
from cnn_core.errors import CheckpointError, ConfigError
from cnn_core.model import build_model
from cnn_core.optim import SGD, Adam, build_optimizer

# A small net with BatchNorm, so model.state is not empty.
BN_SPEC = {"input_shape": [1, 8, 8], "layers": [
    {"type": "conv2d", "name": "conv1", "out_channels": 4, "kernel": 3, "padding": 1},
    {"type": "batchnorm2d", "name": "bn1"},
    {"type": "relu"},
    {"type": "flatten"},
    {"type": "dense", "name": "fc1", "units": 10},
]}


def train_steps(model, optimizer, steps=2, seed=0):
    """A few real training steps so params, BatchNorm statistics and optimizer state are non-trivial."""
    from cnn_core.losses import softmax_cross_entropy
    rng = np.random.default_rng(seed)
    c, h, w = model.spec["input_shape"]
    for _ in range(steps):
        x = rng.standard_normal((8, c, h, w)).astype(model.dtype)
        y = rng.integers(0, 10, size=8)
        _, dlogits = softmax_cross_entropy(model.forward(x, train=True), y)
        optimizer.step(model.params, model.backward(dlogits))


@pytest.fixture
def trained():
    model = build_model(BN_SPEC, seed=3)
    opt = Adam(lr=0.01, l2=1e-4, schedule={"name": "cosine", "total_steps": 100, "warmup_steps": 5})
    train_steps(model, opt)
    return model, opt


# ---------------------------------------------------------------------- raw files
def test_raw_round_trip_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "param/conv1.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "optim/m/fc1.weight": rng.standard_normal((7, 3)),
        "t": np.array(12, dtype=np.int64),
        "file": np.arange(3, dtype=np.uint8),          # would clash with np.savez's argument
        "fortran": np.asfortranarray(rng.standard_normal((3, 5))),
        "nan": np.array([np.nan, np.inf, -0.0]),
    }
    meta = {"step": 7, "metrics": {"loss": 0.25, "acc": [0.5, 1.0]}, "note": "héllo"}
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, arrays, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert list(loaded) == list(arrays)
    for name, value in arrays.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        np.testing.assert_array_equal(loaded[name], value)
    assert loaded_meta == meta
    # Plain numpy reads it too, without pickle.
    with np.load(path, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["optim/m/fc1.weight"], arrays["optim/m/fc1.weight"])
        assert json.loads(npz["__meta__"].tobytes()) == meta


def test_atomic_write_leaves_no_temp_file_and_replaces(tmp_path):
    path = tmp_path / "sub" / "model.npz"           # missing folders are created
    save_checkpoint(path, {"a": np.zeros(2)}, {"v": 1})
    save_checkpoint(path, {"a": np.ones(2)}, {"v": 2})
    assert os.listdir(tmp_path / "sub") == ["model.npz"]
    arrays, meta = load_checkpoint(path)
    assert meta == {"v": 2} and arrays["a"].tolist() == [1.0, 1.0]
    # Permissions follow the umask like any other file (not tempfile's 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"a": np.arange(3)}, {"v": 1})
    real_write = np.lib.format.write_array
    calls = []

    def failing_write(fh, array, **kwargs):           # the disk fills up at the second array
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(fh, array, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: cannot write: No space left on device"):
        save_checkpoint(path, {"a": np.arange(3), "b": np.arange(4)}, {"v": 2})
    assert len(calls) == 2
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    monkeypatch.undo()
    assert load_checkpoint(path)[1] == {"v": 1}


@pytest.mark.parametrize("arrays, meta, message", [
    ({"__meta__": np.zeros(1)}, {}, "invalid array name '__meta__'"),
    ({"": np.zeros(1)}, {}, "invalid array name ''"),
    ({"x": np.array([{}, 1], dtype=object)}, {}, "array x has dtype object"),
    ({"x": np.zeros(1)}, {"bad": object()}, "meta is not JSON-serializable"),
    ({"x": np.zeros(1)}, [1], "meta must be a dict"),
])
def test_save_rejects_bad_input(tmp_path, arrays, meta, message):
    with pytest.raises(CheckpointError, match=message):
        save_checkpoint(tmp_path / "c.npz", arrays, meta)
    assert os.listdir(tmp_path) == []


def _good_file(tmp_path):
    path = tmp_path / "good.npz"
    save_checkpoint(path, {"param/w": np.arange(1000, dtype=np.float64)}, {"step": 1})
    return path


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: file not found"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("cut", [0.3, 0.9, 0.999])
def test_truncated_file(tmp_path, cut):
    path = _good_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: not a valid .npz archive"):
        load_checkpoint(path)


def test_random_bytes_and_empty_file(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: not a valid .npz archive"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a valid .npz archive"):
        load_checkpoint(path)


def test_corrupted_member_data(tmp_path):
    path = _good_file(tmp_path)
    data = bytearray(path.read_bytes())
    middle = data.find(np.arange(1000, dtype=np.float64).tobytes()[800:816])
    data[middle:middle + 8] = b"\xff" * 8                 # flips array bytes: CRC mismatch
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: .*(CRC|corrupt)"):
        load_checkpoint(path)


def test_plain_npz_without_meta(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.zeros(3))
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: no __meta__ record"):
        load_checkpoint(path)


def _write_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, value in members.items():
            with zf.open(name, "w") as fh:
                if isinstance(value, bytes):
                    fh.write(value)
                elif isinstance(value, str):                      # "object-array"
                    # The header of an object array; the loader must refuse it before
                    # reading on (this test writes no actual pickle data either).
                    header = {"descr": "|O", "fortran_order": False, "shape": (1,)}
                    np.lib.format.write_array_header_1_0(fh, header)
                    fh.write(b"\x80\x04not really a pickle")
                else:
                    np.lib.format.write_array(fh, value, allow_pickle=False)


@pytest.mark.parametrize("members, message", [
    ({"__meta__.npy": np.frombuffer(b"{not json", dtype=np.uint8)}, "__meta__ is not valid JSON"),
    ({"__meta__.npy": np.frombuffer(b"[1, 2]", dtype=np.uint8)}, "__meta__ must be a JSON object"),
    ({"__meta__.npy": np.frombuffer(b"[" * 100_000, dtype=np.uint8)}, "__meta__ nests maps and lists too deep"),
    ({"__meta__.npy": np.zeros(3, dtype=np.float32)}, "__meta__ must be a 1-d uint8 array"),
    ({"__meta__.npy": np.frombuffer(b"{}{}", dtype=np.uint8).reshape(2, 2)}, "__meta__ must be a 1-d uint8 array"),
    ({"__meta__.npy": np.frombuffer(b"{}", dtype=np.uint8), "w.npy": "object-array"},
     "array w holds Python objects"),
    ({"__meta__.npy": np.frombuffer(b"{}", dtype=np.uint8), "notes.txt": b"hi"}, "unexpected member 'notes.txt'"),
    ({"__meta__.npy": np.frombuffer(b"{}", dtype=np.uint8), "w.npy": b"\x93NUMPY garbage"}, "corrupt or truncated"),
])
def test_malformed_contents(tmp_path, members, message):
    path = tmp_path / "bad.npz"
    _write_zip(path, members)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: {message}"):
        load_checkpoint(path)


# ---------------------------------------------------------------------- model checkpoints
@pytest.mark.parametrize("step", [1.7, -1, True, "3"])
def test_model_checkpoint_step_must_be_a_count(tmp_path, trained, step):
    model, opt = trained
    with pytest.raises(ConfigError, match="checkpoint step must be an int >= 0"):
        save_model_checkpoint(tmp_path / "model.npz", model, opt, step=step)
    assert not (tmp_path / "model.npz").exists()


@pytest.mark.parametrize("field", ["metrics", "extra"])
def test_model_checkpoint_metrics_and_extra_must_be_dicts(tmp_path, trained, field):
    model, opt = trained
    with pytest.raises(ConfigError, match=f"checkpoint {field} must be a dict or None, got list"):
        save_model_checkpoint(tmp_path / "model.npz", model, opt, **{field: [0.9]})
    assert not (tmp_path / "model.npz").exists()


def test_model_round_trip_bit_exact(tmp_path, trained):
    model, opt = trained
    assert float(np.abs(model.state["bn1.running_mean"]).sum()) > 0   # statistics did move
    path = tmp_path / "model.npz"
    save_model_checkpoint(path, model, opt, step=2, metrics={"loss": 1.5}, extra={"run": "abc"})

    arrays, meta = load_checkpoint(path)
    assert set(arrays) == ({f"param/{n}" for n in model.params} | {f"state/{n}" for n in model.state}
                           | {f"optim/{k}" for k in opt.state_dict()})
    assert meta == {"format": "pscnn-checkpoint", "version": 1, "model_spec": model.spec,
                    "dtype": "float32", "optimizer": opt.config(), "step": 2,
                    "metrics": {"loss": 1.5}, "extra": {"run": "abc"}}

    model2, opt2, meta2 = load_model_checkpoint(path)
    assert meta2 == meta
    assert model2.spec == model.spec and model2.dtype == model.dtype
    for name in model.params:
        assert model2.params[name].dtype == model.params[name].dtype
        np.testing.assert_array_equal(model2.params[name], model.params[name], err_msg=name)
    for name in model.state:
        np.testing.assert_array_equal(model2.state[name], model.state[name], err_msg=name)
    assert isinstance(opt2, Adam) and opt2.config() == opt.config() and opt2.t == opt.t
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert set(sd) == set(sd2)
    for key in sd:
        np.testing.assert_array_equal(sd2[key], sd[key], err_msg=key)

    # Both continue identically: same forward, same next steps.
    train_steps(model, opt, steps=2, seed=9)
    train_steps(model2, opt2, steps=2, seed=9)
    for name in model.params:
        np.testing.assert_array_equal(model2.params[name], model.params[name], err_msg=name)


def test_load_into_existing_model_is_in_place(tmp_path, trained):
    model, opt = trained
    path = tmp_path / "m.npz"
    save_model_checkpoint(path, model, opt, step=5)
    target = build_model(BN_SPEC, seed=99)
    arrays_before = {n: id(v) for n, v in target.params.items()}
    target_opt = Adam(lr=0.5)                      # own hyperparameters are kept
    got_model, got_opt, meta = load_model_checkpoint(path, model=target, optimizer=target_opt)
    assert got_model is target and got_opt is target_opt and meta["step"] == 5
    assert {n: id(v) for n, v in target.params.items()} == arrays_before
    np.testing.assert_array_equal(target.params["conv1.weight"], model.params["conv1.weight"])
    np.testing.assert_array_equal(target.state["bn1.running_var"], model.state["bn1.running_var"])
    # The layers compute with the loaded arrays (they share them with model.params).
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(target.forward(x, train=False), model.forward(x, train=False))
    assert target_opt.lr == 0.5 and target_opt.t == opt.t


def test_light_preset_round_trip_without_optimizer(tmp_path):
    model = build_model("light", seed=5)
    path = tmp_path / "light.npz"
    save_model_checkpoint(path, model)
    loaded, opt, meta = load_model_checkpoint(path)
    assert opt is None and meta["optimizer"] is None and meta["step"] == 0
    assert meta["metrics"] == {} and meta["extra"] == {}
    assert list(loaded.params) == list(model.params)
    for name in model.params:
        np.testing.assert_array_equal(loaded.params[name], model.params[name])
    # An optimizer passed for a checkpoint saved without one comes back untouched.
    sgd = SGD(lr=0.1, momentum=0.9)
    _, same, _ = load_model_checkpoint(path, optimizer=sgd)
    assert same is sgd and sgd.t == 0


def test_float64_checkpoint_keeps_dtype(tmp_path):
    model = build_model("light", seed=1, dtype="float64")
    path = tmp_path / "f64.npz"
    save_model_checkpoint(path, model)
    loaded, _, meta = load_model_checkpoint(path)
    assert meta["dtype"] == "float64" and loaded.params["fc1.weight"].dtype == np.float64
    np.testing.assert_array_equal(loaded.params["fc1.weight"], model.params["fc1.weight"])


def _snapshot(model):
    return {n: v.copy() for n, v in {**model.params, **model.state}.items()}


def _assert_unchanged(model, snap):
    for n, v in {**model.params, **model.state}.items():
        np.testing.assert_array_equal(v, snap[n], err_msg=n)


def test_shape_mismatch_names_param_and_shapes(tmp_path, trained):
    model, _ = trained
    path = tmp_path / "light.npz"
    save_model_checkpoint(path, build_model("light"))
    other = build_model("seed")
    snap = _snapshot(other)
    with pytest.raises(CheckpointError, match=(
            rf"checkpoint {path}: param conv1.weight has shape \(8, 1, 3, 3\) "
            r"but the model expects \(32, 1, 3, 3\)")):
        load_model_checkpoint(path, model=other)
    _assert_unchanged(other, snap)


def test_missing_and_unexpected_names(tmp_path, trained):
    model, opt = trained
    path = tmp_path / "m.npz"
    save_model_checkpoint(path, model, opt)
    arrays, meta = load_checkpoint(path)

    without_bias = {k: v for k, v in arrays.items() if k != "param/fc1.bias"}
    save_checkpoint(path, without_bias, meta)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: param fc1.bias is missing; the model expects it"):
        load_model_checkpoint(path)

    save_checkpoint(path, {**arrays, "param/fc9.weight": np.zeros(2, np.float32)}, meta)
    with pytest.raises(CheckpointError, match="param fc9.weight is not in the model"):
        load_model_checkpoint(path)

    without_stats = {k: v for k, v in arrays.items() if not k.startswith("state/")}
    save_checkpoint(path, without_stats, meta)
    with pytest.raises(CheckpointError, match=r"state bn1.running_mean is missing \(and 1 more\)"):
        load_model_checkpoint(path)

    save_checkpoint(path, {**arrays, "junk": np.zeros(1)}, meta)
    with pytest.raises(CheckpointError, match="unexpected array 'junk'"):
        load_model_checkpoint(path)


def test_bad_optimizer_state_leaves_model_unchanged(tmp_path, trained):
    model, opt = trained
    path = tmp_path / "m.npz"
    save_model_checkpoint(path, model, opt)
    arrays, meta = load_checkpoint(path)
    arrays["optim/m/fc1.weight"] = np.zeros((3, 3), dtype=np.float32)
    save_checkpoint(path, arrays, meta)
    target = build_model(BN_SPEC, seed=42)
    snap = _snapshot(target)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: adam optimizer state: "):
        load_model_checkpoint(path, model=target)
    _assert_unchanged(target, snap)


def test_a_param_of_an_uncastable_dtype_is_refused_before_anything_is_loaded(tmp_path, trained):
    """Checked up front, like the shapes: otherwise the optimizer state is loaded and then
    copying the weights fails with a raw TypeError, leaving model and optimizer half loaded."""
    model, opt = trained
    path = tmp_path / "m.npz"
    save_model_checkpoint(path, model, opt)
    arrays, meta = load_checkpoint(path)
    arrays["param/fc1.weight"] = arrays["param/fc1.weight"].astype(np.complex64)
    save_checkpoint(path, arrays, meta)
    target, target_opt = build_model(BN_SPEC, seed=42), Adam(lr=0.01)
    train_steps(target, target_opt, seed=5)
    snap, opt_snap = _snapshot(target), target_opt.state_dict()
    with pytest.raises(CheckpointError, match=(
            f"checkpoint {path}: param fc1.weight has dtype complex64, "
            "which cannot be stored in the model's float32")):
        load_model_checkpoint(path, model=target, optimizer=target_opt)
    _assert_unchanged(target, snap)
    after = target_opt.state_dict()
    assert set(after) == set(opt_snap)
    for key in opt_snap:
        np.testing.assert_array_equal(after[key], opt_snap[key], err_msg=key)


def test_a_negative_batchnorm_running_variance_is_refused_naming_the_array(tmp_path, trained):
    """It loaded silently: every evaluation-mode output of the layer was then NaN (sqrt of var + eps < 0),
    and a server resumed from it (--resume loads through load_model_checkpoint) evaluated a NaN test loss."""
    model, opt = trained
    residual_spec = {"input_shape": [2, 4, 4], "layers": [
        {"type": "residual", "name": "res1", "layers": [{"type": "batchnorm2d", "name": "bn"}]},
        {"type": "flatten"}, {"type": "dense", "name": "fc1", "units": 3}]}
    path = tmp_path / "m.npz"
    for source, name in ((model, "bn1.running_var"), (build_model(residual_spec), "res1.bn.running_var")):
        save_model_checkpoint(path, source)
        arrays, meta = load_checkpoint(path)
        arrays[f"state/{name}"] = arrays[f"state/{name}"].copy()
        arrays[f"state/{name}"][1] = -0.5
        save_checkpoint(path, arrays, meta)
        message = f"^checkpoint {path}: state {name} holds a negative variance \\(-0.5\\); a variance is >= 0$"
        with pytest.raises(CheckpointError, match=message):
            load_model_checkpoint(path)
        target = build_model(source.spec, seed=42)
        snap = _snapshot(target)
        with pytest.raises(CheckpointError, match=message):
            load_model_checkpoint(path, model=target)
        _assert_unchanged(target, snap)
        arrays[f"state/{name}"][1] = 0.0                # a zero variance is a variance (eps keeps it finite)
        save_checkpoint(path, arrays, meta)
        load_model_checkpoint(path, model=target)


def test_float64_values_beyond_float32_are_refused_when_loading_into_float32(tmp_path):
    """They used to load as Inf (a RuntimeWarning only), though loading refuses Inf in the weights."""
    model = build_model(BN_SPEC, seed=3, dtype="float64")
    opt = Adam(lr=0.01)
    train_steps(model, opt, steps=1)
    path = tmp_path / "m.npz"
    save_model_checkpoint(path, model, opt)
    arrays, meta = load_checkpoint(path)
    for key, message in (("param/fc1.bias", "param fc1.bias holds values beyond float32 \\(up to 1e\\+39\\)"),
                         ("optim/v/fc1.bias", "optimizer state v/fc1.bias holds values beyond float32")):
        bad = {**arrays, key: np.full_like(arrays[key], 1e39)}
        save_checkpoint(path, bad, meta)
        target = build_model(BN_SPEC, seed=42)
        snap = _snapshot(target)
        with pytest.raises(CheckpointError, match=f"checkpoint {path}: {message}"):
            load_model_checkpoint(path, model=target, optimizer=Adam(lr=0.01))
        _assert_unchanged(target, snap)
        loaded, _, _ = load_model_checkpoint(path)        # into a float64 model, as saved: fine
        assert loaded.dtype == np.float64


def test_optimizer_kind_mismatch(tmp_path, trained):
    model, opt = trained
    path = tmp_path / "m.npz"
    save_model_checkpoint(path, model, opt)
    with pytest.raises(CheckpointError, match="holds adam optimizer state but the given optimizer is sgd"):
        load_model_checkpoint(path, optimizer=build_optimizer("sgd"))


@pytest.mark.parametrize("change, message", [
    ({"format": "something-else"}, "format is 'something-else', expected 'pscnn-checkpoint'"),
    ({"version": 2}, r"version 2 is not supported \(this pscnn reads version 1\)"),
    ({"model_spec": {"input_shape": [1, 8, 8], "layers": [{"type": "warp"}]}},
     "stored model cannot be built: .*unknown layer type 'warp'"),
    ({"optimizer": {"name": "lion"}}, "stored optimizer cannot be built: unknown optimizer 'lion'"),
    # A string spec was taken for a preset name or, worse, for a file on the loading machine.
    ({"model_spec": "light"}, r"meta field 'model_spec' must be an object \(the model's spec\), got 'light'"),
    ({"model_spec": "/etc/hostname"}, "meta field 'model_spec' must be an object"),
    ({"step": "7"}, "meta field 'step' must be an int >= 0, got '7'"),
    ({"step": -1}, "meta field 'step' must be an int >= 0, got -1"),
    ({"step": True}, "meta field 'step' must be an int >= 0, got True"),
    ({"metrics": [0.9]}, r"meta field 'metrics' must be an object, got \[0.9\]"),
    ({"extra": None}, "meta field 'extra' must be an object, got None"),
    ({"optimizer": {"name": 3}},
     r"meta field 'optimizer' must be null or an object with a 'name' string, got \{'name': 3\}"),
    ({"dtype": 32}, "meta field 'dtype' must be a string, got 32"),
    # a hand-edited value is quoted cut to 60 characters, so the error stays one short line
    ({"step": "9" * 100}, r"meta field 'step' must be an int >= 0, got '9{56}\.\.\.$"),
])
def test_bad_meta(tmp_path, trained, change, message):
    model, opt = trained
    path = tmp_path / "m.npz"
    save_model_checkpoint(path, model, opt)
    arrays, meta = load_checkpoint(path)
    save_checkpoint(path, arrays, {**meta, **change})
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: {message}"):
        load_model_checkpoint(path)


def test_a_meta_without_dtype_builds_a_float32_model(tmp_path):
    model = build_model(BN_SPEC, seed=3, dtype="float64")
    path = tmp_path / "m.npz"
    save_model_checkpoint(path, model)
    arrays, meta = load_checkpoint(path)
    del meta["dtype"]
    save_checkpoint(path, arrays, meta)
    loaded, _, _ = load_model_checkpoint(path)
    assert loaded.dtype == np.float32 and loaded.params["fc1.weight"].dtype == np.float32


def test_an_array_named_only_by_its_group_is_refused(tmp_path, trained):
    model, opt = trained
    path = tmp_path / "m.npz"
    save_model_checkpoint(path, model, opt)
    arrays, meta = load_checkpoint(path)
    save_checkpoint(path, {**arrays, "param/": np.zeros(1, dtype=np.float32)}, meta)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: unexpected array 'param/'"):
        load_model_checkpoint(path)


@pytest.mark.parametrize("device", ["tpu", "gpu"])
def test_a_device_that_is_not_there_is_not_blamed_on_the_checkpoint(tmp_path, trained, device):
    # It read "checkpoint m.npz: stored model cannot be built: unknown device 'tpu'", as if the file were bad.
    if device == "gpu" and gpu_available():
        pytest.skip("a GPU is there")
    path = tmp_path / "m.npz"
    save_model_checkpoint(path, *trained)
    with pytest.raises(ConfigError, match=f"^(unknown device '{device}'|device 'gpu' requested but CuPy)"):
        load_model_checkpoint(path, device=device)


@pytest.mark.gpu
def test_gpu_model_round_trip(tmp_path):
    from cnn_core.backend import cupy_module
    cp = cupy_module()
    if cp is None:
        pytest.skip("needs CuPy and a CUDA device")
    model = build_model(BN_SPEC, seed=3, device="gpu")
    opt = Adam(lr=0.01)
    train_steps(model, opt)
    path = tmp_path / "gpu.npz"
    save_model_checkpoint(path, model, opt, step=2)
    # Back onto the GPU, from scratch and in place.
    loaded, opt2, _ = load_model_checkpoint(path, device="gpu")
    target = build_model(BN_SPEC, seed=8, device="gpu")
    ids = {n: id(v) for n, v in target.params.items()}
    load_model_checkpoint(path, model=target)
    assert {n: id(v) for n, v in target.params.items()} == ids
    for m in (loaded, target):
        for name, value in {**model.params, **model.state}.items():
            got = {**m.params, **m.state}[name]
            assert isinstance(got, cp.ndarray)
            np.testing.assert_array_equal(cp.asnumpy(got), cp.asnumpy(value), err_msg=name)
    assert all(isinstance(opt2.state[n]["m"], cp.ndarray) for n in model.params)
    # And onto the CPU.
    cpu, _, _ = load_model_checkpoint(path, device="cpu")
    np.testing.assert_array_equal(cpu.params["fc1.weight"], cp.asnumpy(model.params["fc1.weight"]))
    train_steps(model, opt, seed=4)
    train_steps(loaded, opt2, seed=4)
    for name in model.params:
        np.testing.assert_array_equal(cp.asnumpy(loaded.params[name]), cp.asnumpy(model.params[name]))
