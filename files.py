"""
Files: reading weights from the Hugging Face Hub or a local folder (diffusers layout), our own checkpoint files,
and writing anything to disk atomically.

Nothing here knows about networks or the method: model.py, vae.py, yonos.py, metrics.py and the scripts build
on it. Rules kept here once for the whole project:
  - weights are read from .safetensors only, so loading never unpickles code (resume states and third-party
    metric weights that exist only as .pth are read with torch.load(weights_only=True));
  - every file is written to a unique temp file in the target's folder, flushed to disk (fsync) and renamed
    into place, so a crash, a kill or a full disk never leaves half a file where a good one was.
"""
import dataclasses
import errno
import glob
import io
import json
import os
import pickle
import tempfile
import typing
import warnings

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save

# -----------------------------------------------------------------------------
# atomic writes


class _Recorder(io.RawIOBase):
    """A file wrapper that remembers the first OSError of a write: torch.save turns it into an opaque
    RuntimeError ("unexpected pos ..."), and we want to say "no space left" instead."""

    def __init__(self, f):
        super().__init__()
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise


def temp_prefix(path: str) -> str:
    """Temp files of `path` are named .<name>.<random>.tmp beside it (see `remove_stale_temps`)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.")


def write_atomic(path: str, data) -> None:
    """Writes `data` (bytes, str, or a function that writes to a binary file object) to `path` atomically: a
    unique temp file in the same folder, flushed and fsynced, then renamed over `path`. On any failure the
    temp file is removed and `path` is untouched; a full disk raises OSError(ENOSPC) with a readable message."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(temp_prefix(path)), suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _Recorder(raw)
            try:
                if callable(data):
                    data(f)
                else:
                    f.write(data.encode("utf-8") if isinstance(data, str) else data)
                raw.flush()
                os.fsync(raw.fileno())
            except Exception as e:
                cause = f.error if f.error is not None else e
                if getattr(cause, "errno", None) == errno.ENOSPC:
                    what = "the previous file is intact" if os.path.exists(path) else "nothing was written"
                    raise OSError(errno.ENOSPC, f"no space left on device while writing {path}; {what}") from None
                raise
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of an ordinary new file (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some file systems cannot fsync a folder


def remove_stale_temps(path: str) -> list[str]:
    """Removes temp files that a killed writer of `path` left behind (.<name>.*.tmp); returns their paths."""
    stale = glob.glob(glob.escape(temp_prefix(path)) + "*.tmp")
    for p in stale:
        try:
            os.remove(p)
        except OSError:
            pass
    return stale


# -----------------------------------------------------------------------------
# configs from JSON, checked before anything is built


def config_from_dict(cls, d, name: str = "config"):
    """Rebuilds a config dataclass from its JSON form (JSON turns tuples into lists), checking every key and
    type first: a malformed file is a ValueError naming the field, never a crash deep inside a constructor.
    Range checks live in each config's __post_init__."""
    if not isinstance(d, dict):
        raise ValueError(f"{name}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {', '.join(map(repr, unknown))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        want = hints[key]
        if want is tuple:
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{name}: {key} must be a list, not {value!r}")
            value = tuple(value)
        elif want is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: {key} must be a number, not {value!r}")
            value = float(value)
        elif want in (int, bool, str) and (type(value) is not want):
            raise ValueError(f"{name}: {key} must be of type {want.__name__}, not {value!r}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None


def check_positive_ints(name: str, **values) -> None:
    """For configs' __post_init__: every value (or every item of a tuple value) a positive int below 2^16."""
    for key, v in values.items():
        for item in (v if isinstance(v, tuple) else (v,)):
            if isinstance(item, bool) or not isinstance(item, int) or not 0 < item <= 65536:
                raise ValueError(f"{name}.{key} must hold whole numbers in 1..65536, not {v!r}")


# -----------------------------------------------------------------------------
# our own checkpoint files: safetensors tensors + a JSON header, never pickled code


def save_checkpoint(path: str, tensors: dict, header: dict) -> None:
    """One safetensors file: every tensor plus `header` as JSON metadata under the key "yonos". Atomic."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, save(tensors, metadata={"yonos": json.dumps(header)}))


def read_header(path: str) -> dict:
    """The JSON header of a file written by save_checkpoint (cheap: the tensors are not read)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with safe_open(path, "pt") as f:
            header = json.loads((f.metadata() or {})["yonos"])
    except Exception:
        with open(path, "rb") as f:
            start = f.read(9)
        if len(start) == 9 and start[8:9] == b"{":  # a safetensors header length, then JSON: a damaged file
            raise ValueError(f"{path}: damaged or truncated checkpoint (an incomplete copy?)") from None
        raise ValueError(f"{path}: not a yonos checkpoint (a safetensors file with a 'yonos' header)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: its 'yonos' header is not a JSON object")
    return header


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """(tensors, header) of a file written by save_checkpoint, whatever its extension (x2.pt works)."""
    header = read_header(path)
    try:
        tensors = load_file(path)
    except Exception as e:
        raise ValueError(f"{path}: damaged checkpoint ({type(e).__name__})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: holds non-finite (NaN/Inf) weights in {', '.join(bad[:3])}")
    return tensors, header


def load_state(path: str, device="cpu") -> dict:
    """A resume state written by train.py (torch.save of plain tensors and numbers), read without unpickling code."""
    return load_tensors_only(path, device, "a resume state written by train.py")


def load_tensors_only(path: str, device="cpu", what: str = "a weights file") -> object:
    """torch.load(weights_only=True): plain tensors, numbers and containers; anything else (pickled code, a
    damaged file) is a one-line ValueError that never suggests turning the check off."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = "it holds pickled objects other than tensors; refusing to unpickle them" if isinstance(
            e, pickle.UnpicklingError) else f"damaged or of another kind ({type(e).__name__})"
        raise ValueError(f"{path}: not {what}: {why}") from None


# -----------------------------------------------------------------------------
# weights from the Hub or a folder


def fetch_pretrained(repo_or_path: str, subfolder: str, weights: str, revision: str | None = None,
                     variant: str | None = None, extra: tuple = (), cache_dir: str | None = None,
                     local_files_only: bool | None = None) -> tuple[dict, dict]:
    """Returns (config dict, state dict) of `subfolder` of a local folder or a Hub repo in diffusers layout.

    A repo id goes through huggingface_hub, so its cache, HF_HUB_OFFLINE and HF_TOKEN apply; only the
    files needed are fetched. Weights are read only from .safetensors (never unpickled); `variant="fp16"`
    reads `<weights>.fp16.safetensors`. The config dict gets `_folder`, where the files are."""
    fname = f"{weights}.{variant}.safetensors" if variant else f"{weights}.safetensors"
    if os.path.isdir(repo_or_path):
        root = repo_or_path
    elif os.path.exists(repo_or_path) or repo_or_path.count("/") != 1:
        raise FileNotFoundError(f"{repo_or_path}: neither a folder nor a Hub repo id of the form org/name")
    else:
        from huggingface_hub import snapshot_download  # here, not at the top: it reads HF_HUB_* when imported
        kwargs = dict(cache_dir=cache_dir, local_files_only=local_files_only or False, revision=revision)
        try:
            root = snapshot_download(repo_or_path, allow_patterns=[f"{subfolder}/config.json", f"{subfolder}/{fname}",
                                                                   *extra], **kwargs)
        except Exception as e:  # repo missing, gated, offline and not cached, ...
            raise FileNotFoundError(f"{repo_or_path}: cannot get it from the Hub or its cache "
                                    f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    folder = os.path.join(root, subfolder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{repo_or_path}: has no subfolder '{subfolder}'")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{repo_or_path}: no config.json in '{subfolder}'")
    if not os.path.isfile(os.path.join(folder, fname)):
        found = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin")))
        raise FileNotFoundError(f"{repo_or_path}: no {subfolder}/{fname} (found: {', '.join(found) or 'nothing'}; "
                                f"pass variant='fp16' for .fp16.safetensors; .bin files are not read)")
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        state = load_file(os.path.join(folder, fname))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{repo_or_path}/{subfolder}: unreadable ({type(e).__name__})") from None
    except Exception as e:  # safetensors' own errors for damaged files
        raise ValueError(f"{repo_or_path}/{subfolder}/{fname}: damaged ({type(e).__name__})") from None
    config["_folder"] = folder
    return config, state


def fetch_weights(spec: str, filename: str) -> str:
    """Local path of `filename` given a file, a folder holding it, or a Hub repo id (org/name) holding it
    (through huggingface_hub: its cache and HF_HUB_OFFLINE apply). Used for the metric networks' weights."""
    if os.path.isfile(spec):
        return spec
    if os.path.isdir(spec) or os.path.exists(spec) or spec.count("/") != 1:
        path = os.path.join(spec, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights not found: {path}")
        return path
    from huggingface_hub import hf_hub_download  # here, not at the top: it reads HF_HUB_* when imported
    try:
        return hf_hub_download(spec, filename)
    except Exception as e:  # missing repo or file, offline and not cached, ...
        raise FileNotFoundError(f"weights not found: {filename} in {spec} ({type(e).__name__})") from None


def build_pretrained(cls, config_cls, repo_or_path: str, subfolder: str, revision: str | None = None,
                     variant: str | None = None, renames: dict | None = None, **hub_kwargs) -> nn.Module:
    """A diffusers-layout model (our U-Net or VAE) from a Hub repo id or a local folder: its config.json becomes our
    config (`config_cls.from_diffusers`), the model is built on the meta device (no memory and no random init for
    weights about to be replaced), then takes the checked weights."""
    config, state = fetch_pretrained(repo_or_path, subfolder, "diffusion_pytorch_model", revision, variant,
                                     **hub_kwargs)
    with torch.device("meta"):
        model = cls(config_cls.from_diffusers(config))
    load_checked(model, state, f"{repo_or_path}/{subfolder}", renames=renames, assign=True)
    return model


def load_checked(model: nn.Module, state: dict, name: str, renames: dict | None = None, assign: bool = False) -> None:
    """load_state_dict(strict=True) after checking key set and shapes, with a message naming the first
    mismatches. `renames` maps legacy key fragments to ours (see vae.py). With `assign`, the model (built on
    the meta device) takes the given tensors as its parameters, cast to fp32, so loading never holds two copies."""
    for old, new in (renames or {}).items():
        state = {k.replace(old, new): v for k, v in state.items()}
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in ours.items()
             if k in state and state[k].shape != v.shape]
    problems = [(what, keys) for what, keys in
                [("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)] if keys]
    if problems:
        msg = "; ".join(f"{len(keys)} {what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                        for what, keys in problems)
        raise ValueError(f"{name}: weights do not fit the model: {msg}")
    if assign:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)
