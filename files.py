"""
Files: reading weights from the Hugging Face Hub or a local folder (diffusers layout), our own checkpoint files,
and writing anything to disk atomically.

Nothing here knows about networks or the method: model.py, vae.py, yonos.py, metrics.py and the scripts build
on it. Rules kept here once for the whole project:
  - weights are read from .safetensors only, so loading never unpickles code (resume states and third-party
    metric weights that exist only as .pth are read with torch.load(weights_only=True)); every field of our
    checkpoints' JSON header is checked by type and range before anything is built from it;
  - every file is written to a unique temp file in the target's folder, flushed to disk (fsync) and renamed
    into place, so a crash, a kill or a full disk never leaves half a file where a good one was;
  - no output of a run is, or resolves through a link to, a file the run reads or another of its outputs
    (`check_outputs`, called by every script before any work);
  - one writer at a time: `Lock` holds an OS lock that dies with its process, so a killed run never blocks the
    next one.
"""
import dataclasses
import errno
import glob
import io
import json
import os
import pickle
import math
import struct
import tempfile
import typing
import zlib
import warnings

try:
    import fcntl  # POSIX: locks that the OS releases when their process dies
except ImportError:  # Windows: an exclusive create, without stale-lock detection
    fcntl = None

import numpy as np
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


def write_png(f, width: int, height: int, rows, icc: bytes | None = None) -> None:
    """Writes a PNG to binary file `f` from `rows`, an iterable of uint8 arrays (n, width, 3 or 4) top to bottom,
    as they come: memory holds one band, whatever the image size. Each row gets PNG's Paeth filter (the best of the
    five on photographs, measured here within 2% of Pillow's per-row choice), then zlib at level 6, as Pillow."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z, prev, written, channels = zlib.compressobj(6), None, 0, None
    for band in rows:
        if channels is None:
            channels = band.shape[2]
            f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8,
                                                                        {3: 2, 4: 6}[channels], 0, 0, 0)))
            if icc:
                f.write(chunk(b"iCCP", b"icc\0\0" + zlib.compress(icc)))
        for row in band.reshape(band.shape[0], -1).astype(np.int16):
            up = prev if prev is not None else np.zeros_like(row)
            left = np.concatenate([np.zeros(channels, np.int16), row[:-channels]])
            up_left = np.concatenate([np.zeros(channels, np.int16), up[:-channels]])
            p = left + up - up_left  # Paeth's predictor: whichever of left, up, up-left is nearest to p
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
            data = z.compress(b"\x04" + ((row - pred) % 256).astype(np.uint8).tobytes())
            if data:
                f.write(chunk(b"IDAT", data))
            prev, written = row, written + 1
    if written != height:
        raise ValueError(f"write_png: got {written} rows for a {height}-row image")
    f.write(chunk(b"IDAT", z.flush()) + chunk(b"IEND", b""))


def write_figure(path: str, fig) -> None:
    """A matplotlib figure as a PNG, atomically, then closed (so a long script does not collect open figures)."""
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    fig.clf()
    import matplotlib.pyplot as plt  # only where a figure exists, matplotlib is imported already
    plt.close(fig)


def remove_stale_temps(path: str) -> list[str]:
    """Removes temp files that a killed writer of `path` left behind (.<name>.*.tmp); returns their paths."""
    stale = glob.glob(glob.escape(temp_prefix(path)) + "*.tmp")
    for p in stale:
        try:
            os.remove(p)
        except OSError:
            pass
    return stale


def json_text(obj) -> str:
    """JSON that any reader accepts: NaN and infinities (a perfect PSNR is inf) become null, never the
    non-standard `Infinity`."""
    def clean(x):
        if isinstance(x, np.generic):  # numpy numbers: the Python ones
            x = x.item()
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), indent=1, allow_nan=False)


# -----------------------------------------------------------------------------
# what a run writes never lands on what it reads


def check_outputs(outputs: list[str], reads: list[str] = ()) -> None:
    """The path-safety rule every script applies before its work: no output may be a symbolic link (an atomic
    write would silently replace the link, or a writer could follow it onto another file), resolve to the same file
    as another output of the run, or be an existing file that the run reads (an input image, a checkpoint being
    loaded, a teacher), whatever names or links lead to them. Raises ValueError naming both."""
    identity = lambda p: (os.stat(p).st_dev, os.stat(p).st_ino)
    read = {identity(r): r for r in reads if r and os.path.isfile(r)}
    seen = {}
    for out in outputs:
        if os.path.islink(out):
            raise ValueError(f"{out}: is a symbolic link (to {os.readlink(out)}); refusing to write over it")
        real = os.path.realpath(out)
        if real in seen:
            raise ValueError(f"{seen[real]} and {out} are the same file; one run cannot write both")
        seen[real] = out
        if os.path.isdir(out):
            raise ValueError(f"{out}: is a folder, not a file")
        if os.path.isfile(out) and identity(out) in read:
            raise ValueError(f"{out}: is an input of this run ({read[identity(out)]}); refusing to overwrite it")


class Lock:
    """An exclusive lock on `path` (created beside the file it guards) while a run writes. flock: the OS drops it
    when the process dies, so a lock file left by a killed run, or by a run in another container whose pid a new
    run happens to get, never blocks anyone. ValueError if another process holds it."""

    def __init__(self, path: str, holder: str = "another process"):
        self.path, self.fd = path, None
        while self.fd is None:
            try:
                fd = os.open(path, os.O_CREAT | os.O_WRONLY | (0 if fcntl else os.O_EXCL), 0o644)
            except FileExistsError:
                raise ValueError(f"{holder} is writing beside {path}; wait for it (or remove {path})") from None
            except IsADirectoryError:
                raise ValueError(f"{path}: is a folder; remove it (it is where the run's lock goes)") from None
            except OSError as e:
                raise ValueError(f"cannot write {path}: {e.strerror}") from None
            if fcntl:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    raise ValueError(f"{holder} is writing beside {path}; wait for it or choose another output") \
                        from None
                try:  # the holder we waited on may have removed the file just before we locked it: lock the new one
                    if os.fstat(fd).st_ino != os.stat(path).st_ino:
                        os.close(fd)
                        continue
                except FileNotFoundError:
                    os.close(fd)
                    continue
            os.truncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.remove(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


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


def check_positive_ints(name: str, top: int = 65536, **values) -> None:
    """For configs' __post_init__: every value (or every item of a tuple value) a whole number in 1..top."""
    for key, v in values.items():
        for item in (v if isinstance(v, tuple) else (v,)):
            if isinstance(item, bool) or not isinstance(item, int) or not 0 < item <= top:
                raise ValueError(f"{name}.{key} must hold whole numbers in 1..{top}, not {v!r}")


# the "meta" fields of a model file: (type, smallest, largest). Unknown fields are kept but never read. A file's own
# sampling_steps is what sample.py does by default: a distilled model samples in a few steps, so a header asking for
# more than 100 is damaged or forged (an explicit --steps may still ask for up to 1000)
META_FIELDS = {"stage": (str,), "init": (str,), "teacher": (str,), "degradation": (str,), "step": (int, 0, 10 ** 12),
               "train_crop": (int, 1, 65536), "tile": (int, 1, 65536), "teacher_scale": (int, 1, 64),
               "init_scale": (int, 1, 64), "sampling_steps": (int, 1, 100), "teacher_steps": (int, 2, 1000),
               "w_max": (float, 0.0, 1e3), "cond_drop": (float, 0.0, 1.0), "ema": (float, 0.0, 1.0),
               "lora_rank": (int, 0, 65536)}


def check_model_header(header: dict, tensors: dict, path: str) -> None:
    """A YonosSR file's header and special tensors, before anything is built from them (ValueError naming the
    field): the U-Net and VAE configs (checked field by field when built), the scale, every known meta field, the
    context and the schedule."""
    if "unet" not in header:
        raise ValueError(f"{path}: holds no SR U-Net (a VAE-only file? pass it as --vae)")
    if "vae" not in header:
        raise ValueError(f"{path}: holds no VAE config")
    scale = header.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, int) or not 2 <= scale <= 64:
        raise ValueError(f"{path}: scale must be a whole number in 2..64, not {scale!r}")
    check_meta(header.get("meta", {}), path)
    if "context" not in tensors:
        raise ValueError(f"{path}: holds no context tensor")
    ac = tensors.get("alphas_cumprod")
    if ac is not None and (ac.dtype != torch.float64 or ac.shape != (1000,)):
        raise ValueError(f"{path}: alphas_cumprod must be 1000 float64 values, not {tuple(ac.shape)} {ac.dtype}")


def check_meta(meta, name: str) -> dict:
    """A model file's meta object, every known field of the right type and range (ValueError naming it)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: its meta is not a JSON object")
    for key, (kind, *bounds) in META_FIELDS.items():
        if key not in meta:
            continue
        v = meta[key]
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) if kind is float else \
            (type(v) is kind)
        if ok and bounds:
            ok = bounds[0] <= v <= bounds[1]
        if not ok:
            what = f"a {kind.__name__}" + (f" in {bounds[0]}..{bounds[1]}" if bounds else "")
            raise ValueError(f"{name}: meta.{key} must be {what}, not {v!r}")
    return meta


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


def looks_local(spec: str) -> bool:
    """Whether `spec` names a local path rather than a Hub repo id (org/name): it exists, starts like a path, has
    more or fewer than one slash, or its first part is a folder here (runs/sd21 when runs/ exists: a mistyped
    folder, not a download)."""
    return (os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") != 1
            or os.path.isdir(spec.split("/")[0]))


def hub_snapshot(repo: str, patterns: list[str], revision: str | None = None, cache_dir: str | None = None,
                 local_files_only: bool | None = None) -> str:
    """The local folder of `patterns` of Hub repo `repo` (huggingface_hub: its cache, HF_HUB_OFFLINE, HF_TOKEN and
    HF_ENDPOINT apply). A Hub that does not answer within HF_HUB_ETAG_TIMEOUT seconds (default 10) falls back to the
    cache, else is a one-line FileNotFoundError: huggingface_hub itself would wait for ever."""
    if looks_local(repo):
        first = repo.split("/")[0]
        why = f" ({first}/ is a folder here, so this is read as a path)" if os.path.isdir(first) else ""
        raise FileNotFoundError(f"{repo}: no such folder{why}; a Hub repo id has the form org/name")
    from huggingface_hub import HfApi, constants, snapshot_download  # here: it reads HF_HUB_* when imported
    offline, why = bool(local_files_only or constants.HF_HUB_OFFLINE), None
    if not offline:
        try:
            HfApi().repo_info(repo, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except Exception as e:
            if "timeout" not in f"{type(e).__name__} {e}".lower():
                raise FileNotFoundError(f"{repo}: cannot get it from the Hub ({type(e).__name__}: "
                                        f"{(str(e).splitlines() or ['no answer'])[0]})") from None
            offline, why = True, f"the Hub did not answer within {constants.HF_HUB_ETAG_TIMEOUT} s"
    try:  # no answer in time: the cache, if it holds the files
        return snapshot_download(repo, local_files_only=offline, cache_dir=cache_dir, revision=revision,
                                 allow_patterns=patterns)
    except Exception as e:  # repo missing, gated, offline and not cached, ...
        why = why or f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        raise FileNotFoundError(f"{repo}: cannot get it from the Hub or its cache ({why})") from None


def fetch_pretrained(repo_or_path: str, subfolder: str, weights: str, revision: str | None = None,
                     variant: str | None = None, extra: tuple = (), cache_dir: str | None = None,
                     local_files_only: bool | None = None) -> tuple[dict, dict]:
    """Returns (config dict, state dict) of `subfolder` of a local folder or a Hub repo in diffusers layout.

    A repo id goes through huggingface_hub, so its cache, HF_HUB_OFFLINE and HF_TOKEN apply; only the
    files needed are fetched. Weights are read only from .safetensors (never unpickled); `variant="fp16"`
    reads `<weights>.fp16.safetensors`. The config dict gets `_folder`, where the files are."""
    fname = f"{weights}.{variant}.safetensors" if variant else f"{weights}.safetensors"
    root = repo_or_path if os.path.isdir(repo_or_path) else hub_snapshot(
        repo_or_path, [f"{subfolder}/config.json", f"{subfolder}/{fname}", *extra], revision, cache_dir,
        local_files_only)
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


def fetch_json(repo_or_path: str, filename: str) -> dict | None:
    """A JSON file of a local folder or Hub repo (e.g. scheduler/scheduler_config.json), or None if it has none."""
    root = repo_or_path if os.path.isdir(repo_or_path) else hub_snapshot(repo_or_path, [filename])
    path = os.path.join(root, filename)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        raise ValueError(f"{repo_or_path}/{filename}: unreadable JSON") from None


def fetch_weights(spec: str, filename: str) -> str:
    """Local path of `filename` given a file, a folder holding it, or a Hub repo id (org/name) holding it
    (through huggingface_hub: its cache and HF_HUB_OFFLINE apply). Used for the metric networks' weights."""
    if os.path.isfile(spec):
        return spec
    if os.path.isdir(spec) or looks_local(spec):
        path = os.path.join(spec, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights not found: {path}")
        return path
    try:
        path = os.path.join(hub_snapshot(spec, [filename]), filename)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"weights not found: {filename} in {spec} ({str(e).split(': ', 1)[-1]})") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights not found: {filename} in {spec}")
    return path


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
    types = [f"{k} is {str(state[k].dtype).removeprefix('torch.')}" for k, v in ours.items()
             if k in state and v.is_floating_point() and not state[k].is_floating_point()]
    problems = [(what, keys) for what, keys in
                [("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong),
                 ("integer or bool tensors where floats belong", types)] if keys]
    if problems:
        msg = "; ".join(f"{len(keys)} {what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                        for what, keys in problems)
        raise ValueError(f"{name}: weights do not fit the model: {msg}")
    if assign:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)
