"""
Hostile runs: what goes wrong around a train.py run, and what it must do then. Bad options and data folders, an
existing run in the way, Ctrl-C and SIGTERM (with data workers), two runs on one --out, kills at random points,
full disks, stale locks, non-finite weights, a resume with other options, a Hub that never answers. Every case asserts
the exit code, a one-line message (never a traceback) and what is on disk afterwards: nothing lost, nothing
half-written, no temp file left. CPU only, tiny models. The inputs of sample.py and eval.py are in test_hostile.py.
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

import files
from conftest import HERE, one_line, photo, run_script, temps, train_args, write_photos
from files import read_checkpoint, save_checkpoint, write_atomic
from yonos import YonosSR


# -----------------------------------------------------------------------------
# train.py: bad options and data, one line each and nothing written


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
    first.communicate(timeout=900)  # a minute alone; the margin is for a loaded machine
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
    deadline = time.monotonic() + 300  # the first save: a second alone, longer on a loaded machine
    while not (tmp_path / "x2.pt.state").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # then a few more saves, and the kill lands wherever it lands
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
# nothing lost: one path rule for every writer (files.check_outputs), and no save of broken weights


def test_train_never_writes_over_a_file_it_reads(tmp_path, vae_file, random_ckpt):
    """--out may not be the teacher, the model being fine-tuned, the VAE or a training photo, even with --overwrite
    or through a symbolic link; each is one line before any work, and the file is intact."""
    write_photos(tmp_path / "photos", n=2, size=40)
    teacher = tmp_path / "x4.pt"
    teacher.write_bytes(open(random_ckpt, "rb").read())
    os.symlink(teacher, tmp_path / "link.pt")
    photo_file = tmp_path / "photos" / "img0.png"
    before = {p: p.read_bytes() for p in (teacher, photo_file)}
    base = [os.path.join(HERE, "train.py"), "--config", "tiny", "--data", str(tmp_path / "photos"), "--crop", "32",
            "--steps", "1", "--quiet", "--overwrite"]
    for extra, words in [(["--teacher", str(teacher), "--scale", "8", "--out", str(teacher)], "is an input"),
                         (["--stage", "decoder", "--unet", str(teacher), "--out", str(teacher)], "is an input"),
                         (["--teacher", str(teacher), "--scale", "8", "--out", str(tmp_path / "link.pt")], "symbolic link"),
                         (["--vae", vae_file, "--out", vae_file], "is an input"),
                         (["--vae", vae_file, "--out", str(photo_file)], "is an input")]:
        r = run_script([*base, *extra])
        assert r.returncode == 2 and words in one_line(r.stderr), (extra, r.stderr)
    assert {p: p.read_bytes() for p in before} == before and not temps(tmp_path)


def test_a_save_of_non_finite_weights_is_refused_and_the_last_good_files_stay(tmp_path, vae_file, monkeypatch):
    """NaN gradients skip their step (the weights stay finite); weights that are NaN all the same are never saved:
    the run stops, exit 1, with the last good checkpoint and state untouched."""
    import train
    import yonos
    write_photos(tmp_path / "photos", n=2, size=40)
    cfg = lambda steps, **kw: train.TrainConfig(config="tiny", vae=vae_file, data=str(tmp_path / "photos"), crop=32,
                                                batch_size=2, steps=steps, save_every=2, quiet=True,
                                                out=str(tmp_path / "x2.pt"), **kw)
    train.main(cfg(2))
    good = {p: open(tmp_path / p, "rb").read() for p in ("x2.pt", "x2.pt.state")}
    real = yonos.sr_loss

    def nan_gradient(unet, *a, **kw):  # a finite loss whose gradient is NaN: sqrt'(0) * 0
        loss = real(unet, *a, **kw)
        return loss + (0 * sum(p.sum() for p in unet.parameters())).clamp(min=0).sqrt()
    monkeypatch.setattr(train, "sr_loss", nan_gradient)
    model = train.main(cfg(4, resume=True))  # steps 3 and 4 are skipped: their gradients are NaN
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = [json.loads(line) for line in open(tmp_path / "x2.pt.log.jsonl")]
    assert not np.isfinite(rows[-1]["grad_norm"]) if rows[-1]["grad_norm"] is not None else True
    monkeypatch.setattr(train, "sr_loss", real)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **kw: [p.data.fill_(float("nan")) for g in
                                                                           self.param_groups for p in g["params"]])
    good = {p: open(tmp_path / p, "rb").read() for p in ("x2.pt", "x2.pt.state")}
    with pytest.raises(SystemExit) as e:
        train.main(cfg(6, resume=True))
    assert e.value.code == 1 and {p: open(tmp_path / p, "rb").read() for p in good} == good


@pytest.mark.parametrize("change", [["--scale", "4"], ["--seed", "3"], ["--batch-size", "3"], ["--vae", "OTHER"]])
def test_resume_refuses_a_run_saved_with_other_options(change, tmp_path, vae_file):
    write_photos(tmp_path / "photos", n=2, size=40)
    assert run_script(train_args(tmp_path, vae_file, "--quiet", steps=2)).returncode == 0
    other = tmp_path / "vae2.pt"
    other.write_bytes(open(vae_file, "rb").read())
    change = [str(other) if a == "OTHER" else a for a in change]
    before = open(tmp_path / "x2.pt", "rb").read()
    r = run_script([*train_args(tmp_path, vae_file, "--quiet", steps=4), "--resume", *change])
    assert r.returncode == 2 and "other options" in one_line(r.stderr) and change[0] in r.stderr
    assert open(tmp_path / "x2.pt", "rb").read() == before


# -----------------------------------------------------------------------------
# never a traceback, never a hang: odd numbers, locks, signals, the Hub


@pytest.mark.parametrize("args,words", [(["--seed", str(2 ** 70)], "--seed"), (["--batch-size", "100000"], "GiB"),
                                        (["--lr", "nan"], "--lr"), (["--grad-accum", "0"], "--grad-accum")])
def test_train_odd_numbers_are_one_line_and_fast(args, words, tmp_path, vae_file):
    write_photos(tmp_path / "photos", n=2, size=40)
    t0 = time.time()
    r = run_script([*train_args(tmp_path, vae_file, "--quiet"), *args])
    assert r.returncode == 2 and words in one_line(r.stderr) and time.time() - t0 < 30, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["photos"]


def test_a_lock_that_is_a_folder_or_a_stale_file_with_our_pid_is_handled(tmp_path, vae_file):
    """A .lock that is a folder: one line. A .lock file left by a killed run whose pid this run happens to have
    (containers reuse pids): no one holds it, so the run goes on (the lock is an OS lock, not a pid)."""
    write_photos(tmp_path / "photos", n=2, size=40)
    os.makedirs(tmp_path / "x2.pt.lock")
    r = run_script(train_args(tmp_path, vae_file, "--quiet"))
    assert r.returncode == 2 and "is a folder" in one_line(r.stderr)
    os.rmdir(tmp_path / "x2.pt.lock")
    assert run_script(train_args(tmp_path, vae_file, "--quiet", steps=2)).returncode == 0
    code = f"import os; open({str(tmp_path / 'x2.pt.lock')!r}, 'w').write(str(os.getpid())); import runpy, sys; " \
           f"sys.argv = {train_args(tmp_path, vae_file, '--quiet', '--resume', steps=4)!r}; " \
           "runpy.run_path(sys.argv[0], run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert r.returncode == 0, r.stderr
    assert YonosSR.load(str(tmp_path / "x2.pt")).meta["step"] == 4 and not os.path.exists(tmp_path / "x2.pt.lock")


def test_sigterm_to_the_process_group_with_workers_saves_and_stops(tmp_path, vae_file):
    """What systemd and kill -TERM -PGID do: every process of the group gets SIGTERM, the data workers too; they
    ignore it, the main process saves the step reached and stops with 143."""
    write_photos(tmp_path / "photos", n=2, size=40)
    args = train_args(tmp_path, vae_file, "--save-every", "100000", "--workers", "2", steps=100000)
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=open(tmp_path.parent / "e.txt", "w"),
                         text=True, cwd=HERE, start_new_session=True)
    for line in p.stdout:
        if line.startswith("stage "):
            break
    time.sleep(4.0)
    os.killpg(p.pid, signal.SIGTERM)
    p.communicate(timeout=120)
    err = open(tmp_path.parent / "e.txt").read()
    assert p.returncode == 143 and "saved" in err and "Traceback" not in err, err[-2000:]
    assert YonosSR.load(str(tmp_path / "x2.pt")).meta["step"] >= 1


def test_a_hub_that_never_answers_is_one_line_within_seconds(tmp_path):
    import socket
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections (the kernel does) and never answers
    port = server.getsockname()[1]
    write_photos(tmp_path / "photos", n=2, size=40)
    t0 = time.time()
    r = run_script([os.path.join(HERE, "train.py"), "--pretrained", "org/model", "--data", str(tmp_path / "photos"),
                    "--quiet", "--out", str(tmp_path / "x2.pt")],
                   env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_OFFLINE": "0",
                        "HF_HUB_CACHE": str(tmp_path / "cache")})
    server.close()
    assert r.returncode == 2 and "did not answer" in one_line(r.stderr) and time.time() - t0 < 60, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["cache", "photos"] or sorted(os.listdir(tmp_path)) == ["photos"]


def test_a_mistyped_local_folder_is_never_read_as_a_hub_repo(tmp_path):
    os.makedirs(tmp_path / "models")
    write_photos(tmp_path / "photos", n=2, size=40)
    r = run_script([os.path.join(HERE, "train.py"), "--pretrained", "models/sd21", "--data", str(tmp_path / "photos"),
                    "--quiet", "--out", str(tmp_path / "x2.pt")], cwd=str(tmp_path),
                   env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    assert r.returncode == 2 and "no such folder" in one_line(r.stderr) and "models/ is a folder" in r.stderr
