"""
Hostile inputs: what a careless or hostile user throws at sample.py, train.py, eval.py and the checkpoint
loaders. Every case asserts the exit code, a one-line message (never a traceback) and what is on disk
afterwards: nothing lost, nothing half-written, no temp file left. CPU only, tiny models.
"""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import eval as ev
import files
import sample
from conftest import HERE, photo, run_script, write_photos
from files import read_checkpoint, read_header, save_checkpoint, write_atomic
from yonos import YonosSR


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def temps(folder) -> list[str]:
    return [p for p in os.listdir(folder) if p.endswith(".tmp") or ".tmp" in p]


def forge(src: str, dst: str, header=None, tensors=None) -> str:
    """A copy of checkpoint `src` with its header and/or tensors edited by the given functions."""
    t, h = load_file(src), read_header(src)
    if header:
        header(h)
    if tensors:
        tensors(t)
    save_file(t, dst, metadata={"yonos": json.dumps(h)})
    return dst


def set_unet(key, value):
    return lambda h: h["unet"].__setitem__(key, value)


FORGED = {  # name -> (header edit, tensor edit, words the one-line error must hold)
    "negative_channels": (set_unet("block_out_channels", [-32, 64, 64]), None, "block_out_channels"),
    "huge_channels": (set_unet("block_out_channels", [2 ** 40, 64, 64]), None, "block_out_channels"),
    "unknown_key": (set_unet("bogus", 1), None, "unknown key"),
    "scale_zero": (lambda h: h.__setitem__("scale", 0), None, "scale"),
    "scale_negative": (lambda h: h.__setitem__("scale", -4), None, "scale"),
    "scale_string": (lambda h: h.__setitem__("scale", "4"), None, "scale"),
    "train_crop_string": (lambda h: h.setdefault("meta", {}).__setitem__("train_crop", "32"), None, "train_crop"),
    "tile_zero": (lambda h: h.setdefault("meta", {}).__setitem__("tile", 0), None, "meta.tile"),
    "zero_heads": (set_unet("num_heads", [0, 4, 4]), None, "num_heads"),
    "zero_norm_groups": (set_unet("norm_num_groups", 0), None, "norm_num_groups"),
    "unet_null": (lambda h: h.__setitem__("unet", None), None, "JSON object"),
    "channels_not_a_list": (set_unet("block_out_channels", 64), None, "must be a list"),
    "vae_scaling_zero": (lambda h: h["vae"].__setitem__("scaling_factor", 0), None, "scaling_factor"),
    "vae_shortcut_wrong_channels": (lambda h: h["vae"].__setitem__("shortcut", True), None, "shortcut"),
    "lr_prior_negative": (set_unet("lr_prior_std", -1.0), None, "lr_prior_std"),
    "nan_weights": (None, lambda t: t["unet.conv_out.weight"].fill_(float("nan")), "non-finite"),
    "inf_weights": (None, lambda t: t["vae.decoder.conv_out.bias"].fill_(float("inf")), "non-finite"),
    "no_context": (None, lambda t: t.pop("context"), "context"),
    "missing_tensor": (None, lambda t: t.pop("unet.conv_in.bias"), "missing keys"),
}


@pytest.fixture(scope="module")
def forged(tmp_path_factory, random_ckpt):
    folder = tmp_path_factory.mktemp("forged")
    out = {name: forge(random_ckpt, str(folder / f"{name}.pt"), h, t) for name, (h, t, _) in FORGED.items()}
    good = open(random_ckpt, "rb").read()
    (folder / "truncated.pt").write_bytes(good[: len(good) // 2])
    (folder / "text.pt").write_text("not a checkpoint")
    torch.save({"a": 1}, folder / "pickle.pt")
    out |= {n: str(folder / f"{n}.pt") for n in ("truncated", "text", "pickle")}
    return out


def sample_main(args, capsys):
    try:
        code = sample.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# -----------------------------------------------------------------------------
# checkpoints: 22 malformed files through sample.py, eval.py and train.py


@pytest.mark.parametrize("name", list(FORGED) + ["truncated", "text", "pickle"])
def test_sample_refuses_a_malformed_checkpoint_in_one_line(name, forged, tmp_path, capsys):
    photo(16, 16).save(tmp_path / "in.png")
    code, _, err = sample_main([tmp_path / "in.png", "--ckpt", forged[name]], capsys)
    msg = one_line(err)
    words = FORGED[name][2] if name in FORGED else ("damaged" if name == "truncated" else "not a yonos checkpoint")
    assert code == 2 and words in msg and forged[name] in msg, msg
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


@pytest.mark.parametrize("name", ["scale_string", "nan_weights", "pickle", "unet_null"])
def test_eval_and_train_refuse_a_malformed_checkpoint_in_one_line(name, forged, tmp_path):
    write_photos(tmp_path / "hr", n=2, size=40)
    r = run_script([os.path.join(HERE, "eval.py"), forged[name], "--data", str(tmp_path / "hr"),
                    "--out", str(tmp_path / "res")])
    assert r.returncode == 2 and forged[name] in one_line(r.stderr) and not os.path.exists(tmp_path / "res.json")
    r = run_script([os.path.join(HERE, "train.py"), "--config", "tiny", "--teacher", forged[name], "--scale", "8",
                    "--data", str(tmp_path / "hr"), "--crop", "32", "--out", str(tmp_path / "x8.pt"), "--quiet"])
    assert r.returncode == 2 and forged[name] in one_line(r.stderr)
    assert sorted(os.listdir(tmp_path)) == ["hr"]  # no stray log, lock or checkpoint


# -----------------------------------------------------------------------------
# train.py: bad options and data, one line each and nothing written


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    from vae import VAE_PRESETS, AutoencoderKL
    path = str(tmp_path_factory.mktemp("vae") / "vae.pt")
    torch.manual_seed(0)
    AutoencoderKL(VAE_PRESETS["tiny"]).save(path)
    return path


TRAIN_CASES = {  # name -> (extra arguments, words of the message)
    "batch_negative": (["--batch-size", "-2"], "--batch-size"),
    "save_every_zero": (["--save-every", "0"], "--save-every"),
    "log_every_zero": (["--log-every", "0"], "--log-every"),
    "steps_zero": (["--steps", "0"], "--steps"),
    "lr_negative": (["--lr", "-1"], "--lr"),
    "steps_not_a_number": (["--steps", "ten"], "--steps"),
    "device_gpu0": (["--device", "gpu0"], "not a device"),
    "stage_unknown": (["--stage", "distill"], "--stage"),
    "degradation_unknown": (["--degradation", "jpeg"], "--degradation"),
    "resume_and_overwrite": (["--resume", "--overwrite"], "pass one of them"),
    "resume_without_state": (["--resume"], "no "),
    "crop_not_a_multiple": (["--crop", "30"], "--crop 30"),
    "teacher_wrong_scale": (["--teacher", "RANDOM_X4", "--scale", "4"], "x2 teacher"),
}


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_train_rejects_bad_options_in_one_line(name, tmp_path, vae_file, random_ckpt):
    write_photos(tmp_path / "photos", n=2, size=40)
    extra, words = TRAIN_CASES[name]
    extra = [random_ckpt if a == "RANDOM_X4" else a for a in extra]
    args = ["--config", "tiny", "--vae", vae_file, "--data", str(tmp_path / "photos"), "--crop", "32",
            "--out", str(tmp_path / "x2.pt"), "--quiet", *extra]
    r = run_script([os.path.join(HERE, "train.py"), *args])
    assert r.returncode == 2 and words in one_line(r.stderr), r.stderr
    assert sorted(os.listdir(tmp_path)) == ["photos"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_device_cuda_without_cuda_is_one_line(tmp_path, vae_file):
    write_photos(tmp_path / "photos", n=2, size=40)
    r = run_script([os.path.join(HERE, "train.py"), "--config", "tiny", "--vae", vae_file, "--data",
                    str(tmp_path / "photos"), "--device", "cuda", "--out", str(tmp_path / "x.pt")])
    assert r.returncode == 2 and "no usable CUDA" in one_line(r.stderr)


@pytest.mark.parametrize("case", ["missing", "empty", "all_bad", "all_too_small"])
def test_train_data_folder_without_usable_photos_is_one_line(case, tmp_path, vae_file):
    data = tmp_path / "data"
    if case != "missing":
        os.makedirs(data)
    if case == "all_bad":
        (data / "a.png").write_text("not an image")
        (data / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 100)
    if case == "all_too_small":
        photo(8, 8).save(data / "small.png")
    r = run_script([os.path.join(HERE, "train.py"), "--config", "tiny", "--vae", vae_file, "--data", str(data),
                    "--crop", "32", "--out", str(tmp_path / "x2.pt"), "--quiet"])
    assert r.returncode == 2 and "data.py --export-photos" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "x2.pt")
    assert not os.path.exists(tmp_path / "x2.pt.log.jsonl") and not os.path.exists(tmp_path / "x2.pt.lock")


def test_train_with_one_broken_photo_in_twenty_trains_to_the_end(tmp_path, vae_file):
    write_photos(tmp_path / "photos", n=19, size=40)
    good = open(tmp_path / "photos" / "img0.png", "rb").read()
    (tmp_path / "photos" / "broken.png").write_bytes(good[:300])  # a valid header, then nothing
    r = run_script([os.path.join(HERE, "train.py"), "--config", "tiny", "--vae", vae_file, "--data",
                    str(tmp_path / "photos"), "--crop", "32", "--batch-size", "4", "--steps", "30", "--quiet",
                    "--out", str(tmp_path / "x2.pt")])
    assert r.returncode == 0, r.stderr
    assert "skipping" in r.stderr and "broken.png" in r.stderr and "Traceback" not in r.stderr
    assert YonosSR.load(str(tmp_path / "x2.pt")).meta["step"] == 30


STATE_CASES = ["pickle", "truncated", "wrong_stage", "not_a_dict"]


@pytest.mark.parametrize("case", STATE_CASES)
def test_train_resume_from_a_bad_state_is_one_line(case, tmp_path, vae_file):
    write_photos(tmp_path / "photos", n=2, size=40)
    args = [os.path.join(HERE, "train.py"), "--config", "tiny", "--vae", vae_file, "--data",
            str(tmp_path / "photos"), "--crop", "32", "--batch-size", "2", "--steps", "2", "--quiet",
            "--out", str(tmp_path / "x2.pt")]
    assert run_script(args).returncode == 0
    state = tmp_path / "x2.pt.state"
    if case == "pickle":
        state.write_bytes(__import__("pickle").dumps(os.system))
    elif case == "truncated":
        state.write_bytes(state.read_bytes()[:500])
    elif case == "wrong_stage":
        s = torch.load(state, weights_only=True)
        torch.save(s | {"stage": "vae"}, state)
    else:
        torch.save([1, 2, 3], state)
    before = open(tmp_path / "x2.pt", "rb").read()
    r = run_script([*args[:-2], "--steps", "4", "--out", str(tmp_path / "x2.pt"), "--resume"])
    assert r.returncode == 2 and "x2.pt.state" in one_line(r.stderr)
    assert open(tmp_path / "x2.pt", "rb").read() == before and not temps(tmp_path)


# -----------------------------------------------------------------------------
# train.py: never replaces work silently; interrupts save; concurrent runs; kills; full disk


def train_args(tmp_path, vae_file, *extra, steps=4):
    return [os.path.join(HERE, "train.py"), "--config", "tiny", "--vae", vae_file, "--data", str(tmp_path / "photos"),
            "--crop", "32", "--batch-size", "2", "--steps", str(steps), "--out", str(tmp_path / "x2.pt"), *extra]


def test_train_refuses_to_replace_an_existing_run(tmp_path, vae_file):
    write_photos(tmp_path / "photos", n=2, size=40)
    assert run_script(train_args(tmp_path, vae_file, "--quiet")).returncode == 0
    before = {p: open(tmp_path / p, "rb").read() for p in ("x2.pt", "x2.pt.state", "x2.pt.log.jsonl")}
    r = run_script(train_args(tmp_path, vae_file, "--quiet", steps=6))
    assert r.returncode == 2 and "--resume" in one_line(r.stderr) and "--overwrite" in r.stderr
    assert {p: open(tmp_path / p, "rb").read() for p in before} == before
    r = run_script(train_args(tmp_path, vae_file, "--quiet", "--overwrite", "--seed", "1", steps=6))
    assert r.returncode == 0 and YonosSR.load(str(tmp_path / "x2.pt")).meta["step"] == 6
    assert open(tmp_path / "x2.pt", "rb").read() != before["x2.pt"]


def start_training(args, stderr_path) -> subprocess.Popen:
    """A train.py run in the background; returns once it has started training. Its stderr (the progress bar
    and the final message) goes to a file, so an unread pipe can never block it."""
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=open(stderr_path, "w"), text=True,
                         cwd=HERE)
    for line in p.stdout:
        if line.startswith("stage "):
            return p
    raise AssertionError(open(stderr_path).read())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_saves_a_checkpoint_even_before_the_first_save_and_resume_continues(sig, tmp_path, vae_file):
    write_photos(tmp_path / "photos", n=2, size=40)
    args = train_args(tmp_path, vae_file, "--save-every", "100000", "--log-every", "1", steps=100000)
    p = start_training(args, tmp_path / "stderr.txt")
    time.sleep(2.0)
    p.send_signal(sig)
    p.communicate(timeout=120)
    err = open(tmp_path / "stderr.txt").read()
    os.remove(tmp_path / "stderr.txt")
    assert p.returncode == 128 + sig, err
    msg = [line for line in err.splitlines() if line.startswith("train.py:")]
    assert len(msg) == 1 and "saved" in msg[0] and "--resume" in msg[0] and "Traceback" not in err
    step = YonosSR.load(str(tmp_path / "x2.pt")).meta["step"]
    assert step >= 1 and torch.load(tmp_path / "x2.pt.state", weights_only=True)["step"] == step
    rows = [json.loads(line) for line in open(tmp_path / "x2.pt.log.jsonl")]
    assert rows[-1]["step"] == step and not temps(tmp_path) and not os.path.exists(tmp_path / "x2.pt.lock")
    r = run_script(train_args(tmp_path, vae_file, "--resume", "--quiet", steps=step + 2))
    assert r.returncode == 0 and YonosSR.load(str(tmp_path / "x2.pt")).meta["step"] == step + 2


def test_two_concurrent_runs_on_one_out_the_second_refuses(tmp_path, vae_file):
    write_photos(tmp_path / "photos", n=2, size=40)
    first = start_training(train_args(tmp_path, vae_file, "--save-every", "20", steps=150), tmp_path / "err.txt")
    r = run_script(train_args(tmp_path, vae_file, "--quiet", "--overwrite", steps=10))
    assert r.returncode == 2 and "another train.py" in one_line(r.stderr)
    first.communicate(timeout=300)
    assert first.returncode == 0 and YonosSR.load(str(tmp_path / "x2.pt")).meta["step"] == 150


def test_kill_at_random_points_of_a_save_never_leaves_half_a_file(tmp_path):
    """A writer that saves two different checkpoints in turn is killed (SIGKILL) at random moments, ten times;
    each time the file on disk is one of the two, whole, and the next start removes the temp files it left."""
    a, b = {"w": torch.zeros(256, 1024)}, {"w": torch.ones(256, 1024)}
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, a, {"which": "a"})
    code = ("import sys, torch, files; files.remove_stale_temps(sys.argv[1]); t = [torch.zeros(256, 1024), "
            "torch.ones(256, 1024)]\nfor i in range(10**6): files.save_checkpoint(sys.argv[1], {'w': t[i % 2]}, "
            "{'which': 'ab'[i % 2]})")
    rng = random.Random(0)
    for _ in range(10):
        p = subprocess.Popen([sys.executable, "-c", code, path], cwd=HERE)
        time.sleep(1.5 + rng.random())
        p.send_signal(signal.SIGKILL)
        p.wait()
        tensors, header = read_checkpoint(path)
        assert torch.equal(tensors["w"], {"a": a, "b": b}[header["which"]]["w"])
    files.remove_stale_temps(path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_killed_training_resumes_and_its_leftovers_are_removed(tmp_path, vae_file):
    write_photos(tmp_path / "photos", n=2, size=40)
    p = start_training(train_args(tmp_path, vae_file, "--save-every", "1", steps=100000), tmp_path.parent / "err.txt")
    time.sleep(3.0)
    p.kill()
    p.wait()
    (tmp_path / ".x2.pt.state.abc123.tmp").write_bytes(b"left by a kill")
    step = torch.load(tmp_path / "x2.pt.state", weights_only=True)["step"]
    r = run_script(train_args(tmp_path, vae_file, "--resume", "--quiet", steps=step + 1))
    assert r.returncode == 0, r.stderr
    assert not temps(tmp_path) and YonosSR.load(str(tmp_path / "x2.pt")).meta["step"] == step + 1


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB file system where the platform allows mounting one; else None (the tests then inject ENOSPC)."""
    mnt = tmp_path / "disk"
    os.makedirs(mnt)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mnt)], capture_output=True).returncode:
        yield None
        return
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_write_atomic_on_a_full_disk_says_so_and_keeps_the_previous_file(small_disk, tmp_path, monkeypatch):
    folder = small_disk or tmp_path
    path = str(folder / "big.bin")
    write_atomic(path, b"previous")
    if small_disk is None:  # no mounting here: a write that fails as a full disk does
        real = files._Recorder.write
        monkeypatch.setattr(files._Recorder, "write", lambda self, b: real(self, b) if len(b) < 1000 else
                            (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    for data in (b"x" * 4_000_000, lambda f: torch.save({"w": torch.zeros(1_000_000)}, f)):
        with pytest.raises(OSError, match="no space left on device while writing .*big.bin; the previous file is intact"):
            write_atomic(path, data)
        assert open(path, "rb").read() == b"previous" and sorted(os.listdir(folder)) == ["big.bin"]


def test_train_on_a_full_disk_is_one_line_and_leaves_no_partial_file(small_disk, tmp_path, vae_file):
    if small_disk is None:
        pytest.skip("cannot mount a small file system here (the ENOSPC path is covered by the test above)")
    write_photos(tmp_path / "photos", n=2, size=40)
    r = run_script(train_args(tmp_path, vae_file, "--quiet", "--out", str(small_disk / "x2.pt")))
    assert r.returncode == 2 and "no space left on device while writing" in one_line(r.stderr)
    assert not temps(small_disk) and not os.path.exists(small_disk / "x2.pt.lock")


# -----------------------------------------------------------------------------
# sample.py: never two inputs onto one output, never its own outputs, errors before the work


def test_sample_mirrors_subfolders_so_same_names_do_not_collide(tmp_path, random_ckpt, capsys):
    for sub in ("a", "b"):
        os.makedirs(tmp_path / "in" / sub)
        photo(12, 12, seed=ord(sub)).save(tmp_path / "in" / sub / "img.png")
    code, out, err = sample_main([tmp_path / "in", "--out", tmp_path / "out", "--ckpt", random_ckpt], capsys)
    assert code == 0 and "2 of 2 images done" in out, err
    a, b = (np.asarray(Image.open(tmp_path / "out" / s / "img_x4.png")) for s in ("a", "b"))
    assert a.shape == b.shape == (48, 48, 3) and not np.array_equal(a, b)


def test_sample_refuses_two_inputs_for_one_output_before_any_work(tmp_path, random_ckpt, capsys):
    photo(12, 12).save(tmp_path / "img.png")
    photo(12, 12, seed=1).save(tmp_path / "img.jpg")
    code, _, err = sample_main([tmp_path / "img.png", tmp_path / "img.jpg", "--ckpt", random_ckpt], capsys)
    assert code == 2 and "would both be written" in one_line(err)
    assert sorted(os.listdir(tmp_path)) == ["img.jpg", "img.png"]


def test_sample_folder_run_twice_skips_its_own_outputs(tmp_path, random_ckpt, capsys):
    photo(12, 12).save(tmp_path / "img.png")
    assert sample_main([tmp_path, "--ckpt", random_ckpt], capsys)[0] == 0
    code, out, err = sample_main([tmp_path, "--ckpt", random_ckpt, "--force"], capsys)
    assert code == 0 and "img_x4_x4" not in out + err and sorted(os.listdir(tmp_path)) == ["img.png", "img_x4.png"]


def test_sample_unwritable_out_fails_before_the_work(tmp_path, random_ckpt, capsys):
    photo(12, 12).save(tmp_path / "img.png")
    (tmp_path / "file").write_text("a file, not a folder")
    code, out, err = sample_main([tmp_path / "img.png", "--out", tmp_path / "file" / "sub" / "x.png", "--ckpt",
                                  random_ckpt], capsys)
    assert code == 2 and one_line(err) and out == ""


@pytest.mark.parametrize("args,words", [(["--device", "gpu0"], "not a device"), (["--tile", "-4"], "--tile"),
                                        (["--threads", "0"], "--threads"), (["--scale", "3"], "--scale")])
def test_sample_bad_options_are_one_line(args, words, tmp_path, random_ckpt, capsys):
    photo(12, 12).save(tmp_path / "img.png")
    code, _, err = sample_main([tmp_path / "img.png", "--ckpt", random_ckpt, *args], capsys)
    assert code == 2 and words in one_line(err) and sorted(os.listdir(tmp_path)) == ["img.png"]


# -----------------------------------------------------------------------------
# eval.py: scores what it can, checks everything before the long work


def test_eval_with_one_bad_image_scores_the_others_and_lists_it(tmp_path, random_ckpt, capsys):
    write_photos(tmp_path / "hr", n=2, size=40)
    (tmp_path / "hr" / "bad.png").write_text("not an image")
    photo(3, 3).save(tmp_path / "hr" / "tiny.png")
    code = ev.main([random_ckpt, "--data", str(tmp_path / "hr"), "--out", str(tmp_path / "res")])
    out, err = capsys.readouterr()
    report = json.load(open(tmp_path / "res.json"))
    assert code == 1 and {r["image"] for r in report["rows"]} == {"img0.png", "img1.png"}
    assert len(report["failed"]) == 2 and "bad.png" in one_line(err) and "tiny.png" in err


@pytest.mark.parametrize("case", ["bad_second_checkpoint", "vae_scale_zero", "unwritable_out", "no_images"])
def test_eval_fails_fast_before_any_work(case, tmp_path, random_ckpt, forged, capsys):
    write_photos(tmp_path / "hr", n=2, size=40)
    (tmp_path / "file").write_text("x")
    ckpts, overrides = {"bad_second_checkpoint": ([random_ckpt, forged["nan_weights"]], []),
                        "vae_scale_zero": ([random_ckpt], ["--vae-scale", "0"]),
                        "unwritable_out": ([random_ckpt], ["--out", str(tmp_path / "file" / "res")]),
                        "no_images": ([random_ckpt], ["--data", str(tmp_path / "file")])}[case]
    t0 = time.time()
    try:  # argparse keeps the last value of a repeated option: the overrides win
        code = ev.main([*ckpts, "--data", str(tmp_path / "hr"), "--out", str(tmp_path / "res"), *overrides])
    except SystemExit as e:
        code = e.code
    _, err = capsys.readouterr()
    assert code == 2 and one_line(err) and time.time() - t0 < 20
    assert not os.path.exists(tmp_path / "res.json")
