"""Checkpoints: one ``.npz`` file holding named arrays plus a JSON ``meta`` dict.

Layout of the zip archive (readable by ``np.load(path, allow_pickle=False)``)::

    <name>.npy      one member per array; names may contain '.' and '/'
    __meta__.npy    the UTF-8 JSON text of ``meta`` as a 1-d uint8 array

No pickle anywhere: object arrays are refused when writing and reading.  Files
are written atomically (a temporary file in the same folder, fsync, then
``os.replace``), so a crash mid-write leaves the previous checkpoint intact and
a reader never sees half a file.

:func:`save_model_checkpoint` / :func:`load_model_checkpoint` add the pscnn
model layout on top: ``param/<name>`` (``model.params``), ``state/<name>``
(``model.state``, e.g. BatchNorm statistics) and ``optim/<key>``
(``optimizer.state_dict()``), with the model spec, dtype, optimizer config,
step, metrics and free-form ``extra`` in ``meta``.  Loading refuses, with one
line naming the file and the offending field or array, a meta field of the
wrong type, any NaN or Inf in the weights, the model state or the optimizer
state, and model state no layer can run with (a negative BatchNorm running
variance): a checkpoint may have been edited by hand.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib

import numpy as np

from . import backend
from .config import is_integer
from .errors import CheckpointError, ConfigError, PscnnError, SpecError
from .fileio import atomic_write

META_KEY = "__meta__"
FORMAT = "pscnn-checkpoint"
VERSION = 1


# ---------------------------------------------------------------------- raw files
def save_checkpoint(path, arrays: dict, meta: dict) -> None:
    """Write ``arrays`` (name -> array, NumPy or CuPy) and ``meta`` (JSON-able dict) to ``path``.

    The file is written exactly at ``path`` (no suffix is added); missing parent
    folders are created.  Raises CheckpointError for a reserved or empty name,
    an object array or a ``meta`` that JSON cannot encode.
    """
    path = os.fspath(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: meta must be a dict, got {type(meta).__name__}")
    try:
        meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: meta is not JSON-serializable: {exc}") from None
    host = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name or name == META_KEY:
            raise CheckpointError(f"checkpoint {path}: invalid array name {name!r}")
        value = np.asarray(backend.to_numpy(value))
        if value.dtype.hasobject:
            raise CheckpointError(f"checkpoint {path}: array {name} has dtype object, which would need pickle")
        host[name] = value
    host[META_KEY] = np.frombuffer(meta_bytes, dtype=np.uint8)

    try:
        with atomic_write(path, "wb") as fh:
            # What np.savez does, without its keyword-argument interface (an array
            # named "file" would collide with it) and with pickling disabled.
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, value in host.items():
                    with zf.open(name + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, value, allow_pickle=False)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot write: {exc.strerror or exc}") from exc


def load_checkpoint(path) -> tuple[dict, dict]:
    """Read a file written by :func:`save_checkpoint`: ``(arrays, meta)``.

    Arrays come back as NumPy arrays, in the order they were saved.  Raises
    CheckpointError naming the file if it is missing, not a zip archive,
    truncated or corrupt, lacks the meta record, has malformed (or absurdly nested) meta JSON, or
    holds object (pickled) arrays.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: file not found")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: is a folder, not a checkpoint file")
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise CheckpointError(f"checkpoint {path}: unexpected member {info.filename!r} "
                                          f"(not an .npy array)")
                name = info.filename[:-len(".npy")]
                with zf.open(info) as member:
                    try:
                        arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
                    except ValueError as exc:
                        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                            raise CheckpointError(f"checkpoint {path}: array {name} holds Python objects "
                                                  f"(pickled data is refused)") from None
                        raise
    except CheckpointError:
        raise
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"checkpoint {path}: not a valid .npz archive (truncated or corrupt): {exc}") from None
    except (ValueError, EOFError, OSError, zlib.error, NotImplementedError) as exc:
        raise CheckpointError(f"checkpoint {path}: corrupt or truncated ({type(exc).__name__}: {exc})") from None

    raw = arrays.pop(META_KEY, None)
    if raw is None:
        raise CheckpointError(f"checkpoint {path}: no {META_KEY} record (not a pscnn checkpoint?)")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"checkpoint {path}: {META_KEY} must be a 1-d uint8 array, "
                              f"got {raw.dtype} {raw.shape}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {META_KEY} is not valid JSON: {exc}") from None
    except RecursionError:              # thousands of brackets deep: the decoder recurses per level
        raise CheckpointError(f"checkpoint {path}: {META_KEY} nests maps and lists too deep to read") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: {META_KEY} must be a JSON object, got {type(meta).__name__}")
    return arrays, meta


# ---------------------------------------------------------------------- models
def save_model_checkpoint(path, model, optimizer=None, step: int = 0, metrics: dict | None = None,
                          extra: dict | None = None) -> None:
    """Save ``model`` (weights, state, spec, dtype) and optionally ``optimizer`` to ``path``.

    ``step`` is the training step (or server version) it was taken at;
    ``metrics`` and ``extra`` are JSON-able dicts stored in meta as they are.
    """
    if not is_integer(step) or step < 0:
        raise ConfigError(f"checkpoint step must be an int >= 0, got {step!r}")   # int(1.7) would store 1
    for field, value in (("metrics", metrics), ("extra", extra)):
        if value is not None and not isinstance(value, dict):   # else a checkpoint its loader refuses
            raise ConfigError(f"checkpoint {field} must be a dict or None, got {type(value).__name__}")
    arrays = {}
    for name, value in model.params.items():
        arrays[f"param/{name}"] = value
    for name, value in model.state.items():
        arrays[f"state/{name}"] = value
    if optimizer is not None:
        for key, value in optimizer.state_dict().items():
            arrays[f"optim/{key}"] = value
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model_spec": model.spec,
        "dtype": np.dtype(model.dtype).name,
        "optimizer": optimizer.config() if optimizer is not None else None,
        "step": int(step),
        "metrics": metrics or {},
        "extra": extra or {},
    }
    save_checkpoint(path, arrays, meta)


def load_model_checkpoint(path, model=None, optimizer=None, device: str = "cpu", check_meta=None):
    """Load a checkpoint written by :func:`save_model_checkpoint`: ``(model, optimizer, meta)``.

    * ``model`` None: built from the stored spec and dtype on ``device``
      (ConfigError, as from build_model, for a device that is not there);
      otherwise its names and shapes must match the checkpoint exactly.
    * ``optimizer`` None: built from the stored config if there is one (else
      the result is None); otherwise it must be of the stored kind, and keeps
      its own hyperparameters while taking the stored state.  An optimizer
      given for a checkpoint saved without one is returned unchanged.

    * ``check_meta``: called with ``meta`` once its format is known good and
      before any array is looked at, so a caller can refuse a checkpoint for
      what its meta says (raise CheckpointError) before the arrays'
      mismatches are reported.

    Arrays are copied into ``model.params`` / ``model.state`` in place (onto
    the GPU for a CuPy model).  Everything is checked before anything is
    copied, so on CheckpointError the model and optimizer are left unchanged.
    Floating-point weights, model state and optimizer state must be finite,
    BatchNorm running variances >= 0, and the meta fields have the types :func:`save_model_checkpoint` writes
    (``model_spec`` an object, never a preset name or a file's path; ``step``
    an int >= 0; ``metrics`` and ``extra`` objects).
    """
    path = os.fspath(path)
    if model is None:       # the machine's fault, not the checkpoint's: said before the file is read
        backend.array_module(device)
    arrays, meta = load_checkpoint(path)
    where = f"checkpoint {path}"
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{where}: version {meta.get('version')!r} is not supported "
                              f"(this pscnn reads version {VERSION})")
    saved_opt = meta.get("optimizer")
    if saved_opt is not None and not (isinstance(saved_opt, dict) and isinstance(saved_opt.get("name"), str)):
        raise CheckpointError(f"{where}: meta field 'optimizer' must be null or an object with a 'name' string, "
                              f"got {_short(saved_opt)}")
    if check_meta is not None:
        check_meta(meta)
    _check_meta_fields(where, meta)
    groups = {"param": {}, "state": {}, "optim": {}}
    for key, value in arrays.items():
        prefix, sep, name = key.partition("/")
        if not sep or prefix not in groups or not name:
            raise CheckpointError(f"{where}: unexpected array {key!r} (expected param/, state/ or optim/ names)")
        groups[prefix][name] = value

    if model is None:
        from .model import build_model  # noqa: PLC0415  (model imports heavy layer code)
        dtype = meta.get("dtype", "float32")
        if not isinstance(dtype, str):
            raise CheckpointError(f"{where}: meta field 'dtype' must be a string, got {_short(dtype)}")
        try:
            model = build_model(meta.get("model_spec"), dtype=dtype, device=device)
        except (SpecError, ConfigError) as exc:
            raise CheckpointError(f"{where}: stored model cannot be built: {exc}") from None
    _check_arrays(where, "param", groups["param"], model.params)
    _check_arrays(where, "state", groups["state"], model.state)
    for name, value in groups["state"].items():
        problem = model.state_problem(name, value)
        if problem:
            raise CheckpointError(f"{where}: state {name} {problem}")
    _check_finite(where, "optimizer state", groups["optim"], model.dtype)

    if optimizer is None and saved_opt is not None:
        from .optim import build_optimizer  # noqa: PLC0415
        try:
            optimizer = build_optimizer(saved_opt)
        except ConfigError as exc:
            raise CheckpointError(f"{where}: stored optimizer cannot be built: {exc}") from None
    elif optimizer is not None and saved_opt is not None and saved_opt.get("name") != optimizer.name:
        raise CheckpointError(f"{where}: holds {saved_opt.get('name')} optimizer state "
                              f"but the given optimizer is {optimizer.name}")
    if optimizer is not None and saved_opt is not None:
        # load_state_dict validates fully before it changes anything, so it goes
        # first: a bad optimizer state must not leave a half-loaded model.
        try:
            optimizer.load_state_dict(groups["optim"], params=model.params)
        except PscnnError as exc:
            raise CheckpointError(f"{where}: {exc}") from None

    _copy_into(model.params, groups["param"])
    _copy_into(model.state, groups["state"])
    return model, optimizer, meta


def _check_meta_fields(where: str, meta: dict) -> None:
    """The types of the meta fields :func:`save_model_checkpoint` writes: a hand-edited meta may hold anything."""
    spec = meta.get("model_spec")
    if not isinstance(spec, dict):      # a string would be taken for a preset name, or a file on this machine
        raise CheckpointError(f"{where}: meta field 'model_spec' must be an object (the model's spec), "
                              f"got {_short(spec)}")
    step = meta.get("step")
    if not is_integer(step) or step < 0:
        raise CheckpointError(f"{where}: meta field 'step' must be an int >= 0, got {_short(step)}")
    for field in ("metrics", "extra"):
        if not isinstance(meta.get(field), dict):
            raise CheckpointError(f"{where}: meta field {field!r} must be an object, got {_short(meta.get(field))}")


def _check_arrays(where: str, kind: str, saved: dict, target: dict) -> None:
    """Same names, shapes and a castable dtype in ``saved`` as in ``target`` (the model's)."""
    missing = [n for n in target if n not in saved]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: {kind} {missing[0]} is missing{more}; the model expects it")
    unexpected = [n for n in saved if n not in target]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{where}: {kind} {unexpected[0]}{more} is not in the model")
    for name, want in target.items():
        got = saved[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{where}: {kind} {name} has shape {tuple(got.shape)} "
                                  f"but the model expects {tuple(want.shape)}")
        if not np.can_cast(got.dtype, want.dtype, casting="same_kind"):
            raise CheckpointError(f"{where}: {kind} {name} has dtype {got.dtype}, "
                                  f"which cannot be stored in the model's {want.dtype}")
    _check_finite(where, kind, saved, next((t.dtype for t in target.values()), None))


def _check_finite(where: str, kind: str, arrays: dict, dtype=None) -> None:
    """No NaN or Inf in the floating-point arrays of ``arrays``: a model cannot train on from them.

    ``dtype``: the model's; a value beyond its range (1e39 saved in float64,
    loaded into float32) would be cast to Inf, so it is refused too.
    """
    limit = np.finfo(dtype).max if dtype is not None and np.dtype(dtype).kind == "f" else None
    for name, value in arrays.items():
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise CheckpointError(f"{where}: {kind} {name} holds NaN or Inf")
        if limit is not None and value.dtype.kind == "f" and value.size and np.abs(value).max() > limit:
            raise CheckpointError(f"{where}: {kind} {name} holds values beyond {np.dtype(dtype).name} "
                                  f"(up to {float(np.abs(value).max()):.3g}), which would load as Inf")


def _short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, on one line: a hand-edited meta may hold anything."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _copy_into(target: dict, saved: dict) -> None:
    """Copy host arrays into the model's arrays in place (the layers hold the same objects)."""
    for name, dst in target.items():
        src = saved[name]
        xp = backend.get_array_module(dst)
        if xp is np:
            np.copyto(dst, src, casting="same_kind")
        else:
            dst[...] = xp.asarray(src, dtype=dst.dtype)
