"""
Hostile inputs: what a careless or hostile user throws at sample.py and eval.py, and at every checkpoint loader:
images that are not what they say, checkpoints that lie, outputs that point at inputs, odd numbers, inputs too large
for memory. Every case asserts the exit code, a one-line message (never a traceback) and what is on disk
afterwards: nothing lost, nothing half-written, no temp file left. CPU only, tiny models. train.py's runs (options,
interrupts, kills, full disks, locks, the Hub) are in test_hostile_runs.py.
"""
import json
import os
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
from conftest import HERE, one_line, photo, run_script, train_args, write_photos
from files import read_header


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


# -----------------------------------------------------------------------------
# nothing lost: one path rule for every writer (files.check_outputs)


def test_eval_never_writes_over_an_input_or_into_the_photos_it_scores(tmp_path, random_ckpt):
    write_photos(tmp_path / "hr", n=2, size=40)
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(open(random_ckpt, "rb").read())
    before = {p: p.read_bytes() for p in [ckpt, *sorted((tmp_path / "hr").iterdir())]}
    for args, words in [(["--figure", str(tmp_path / "hr" / "img0.png")], "is an input"),
                        (["--figure", str(ckpt)], "is an input"),
                        (["--out", str(tmp_path / "hr" / "img1")], "is an input"),  # writes img1.png, img1.json, ...
                        (["--out", str(tmp_path / "hr" / "report")], "inside --data")]:
        code = ev.main([str(ckpt), "--data", str(tmp_path / "hr"), *args])
        assert code == 2, args
    assert {p: p.read_bytes() for p in before} == before


def test_sample_never_writes_through_a_link_or_onto_its_checkpoint(tmp_path, random_ckpt, capsys):
    photo(12, 12).save(tmp_path / "a.png")
    photo(12, 12, seed=1).save(tmp_path / "b.png")
    (tmp_path / "b_x4.png").write_bytes(b"b's own output")
    os.symlink(tmp_path / "b_x4.png", tmp_path / "a_x4.png")  # a's output name leads to b's output
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(open(random_ckpt, "rb").read())
    for args, words in [([tmp_path / "a.png", "--force"], "symbolic link"),
                        ([tmp_path / "b.png", "--out", ckpt, "--force"], "format")]:
        code, _, err = sample_main([*args, "--ckpt", ckpt], capsys)
        assert code == 2 and words in one_line(err), (args, err)
    assert (tmp_path / "b_x4.png").read_bytes() == b"b's own output" and os.path.islink(tmp_path / "a_x4.png")
    png = tmp_path / "m_as.png"
    png.write_bytes(open(random_ckpt, "rb").read())  # a checkpoint with an image's name: still never overwritten
    code, _, err = sample_main([tmp_path / "b.png", "--out", png, "--force", "--ckpt", png], capsys)
    assert code == 2 and "is an input" in one_line(err) and png.read_bytes() == open(random_ckpt, "rb").read()


# -----------------------------------------------------------------------------
# nothing executed: only the documented raster formats are opened, by content


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` on PATH that records that it ran (Pillow starts Ghostscript to decode EPS and PS files)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gs_ran"
    os.makedirs(bin_dir)
    # Pillow asks `gs --version` to know there is one; any other call is Ghostscript being run on a file
    (bin_dir / "gs").write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo 10.0 && exit 0\necho "$@" >> {log}\nexit 1\n')
    os.chmod(bin_dir / "gs", 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\nshowpage\n"


def test_an_eps_named_png_never_starts_ghostscript(tmp_path, random_ckpt, vae_file, fake_ghostscript, capsys):
    from PIL import EpsImagePlugin
    assert EpsImagePlugin.has_ghostscript()  # the fake one: Pillow would run it for an EPS it is allowed to open
    (tmp_path / "evil.png").write_bytes(EPS)
    code, _, err = sample_main([tmp_path / "evil.png", "--ckpt", random_ckpt], capsys)
    assert code == 1 and "cannot read" in one_line(err) and "evil.png" in err
    write_photos(tmp_path / "photos", n=2, size=40)
    (tmp_path / "photos" / "evil.jpg").write_bytes(EPS)
    r = run_script(train_args(tmp_path, vae_file, "--quiet", steps=1), env={"PATH": os.environ["PATH"]})
    assert r.returncode == 0 and "evil.jpg" in r.stderr and "Traceback" not in r.stderr
    code = ev.main([random_ckpt, "--data", str(tmp_path / "photos"), "--out", str(tmp_path / "res")])
    assert code == 1 and not os.path.exists(fake_ghostscript)


# -----------------------------------------------------------------------------
# wrong but quiet: 16-bit, float, ICC, the output format, JSON


def run_one(tmp_path, capsys, src, ckpt, *extra, out="out.png"):
    code, _, err = sample_main([src, "--ckpt", ckpt, "--out", tmp_path / out, "--no-color-fix", *extra], capsys)
    assert code == 0, err
    return tmp_path / out


def test_sixteen_bit_and_float_images_keep_their_brightness(tmp_path):
    """A dark 16-bit PNG (0.19% of full scale) reads as 0.19%, not as half brightness; a float TIFF in [0, 1]
    reads as its values, not black; 32-bit integer TIFFs scale by their bit depth."""
    import tifffile
    from data import open_image
    dark = np.full((20, 20), 127, np.uint16)  # 127 / 65535 = 0.19 %
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    tifffile.imwrite(tmp_path / "float.tif", np.full((20, 20), 0.75, np.float32))
    tifffile.imwrite(tmp_path / "int32.tif", np.full((20, 20), 2 ** 31, np.uint32).astype(np.int64).clip(0, 2 ** 31 - 1)
                     .astype(np.int32))
    assert np.asarray(open_image(str(tmp_path / "dark16.png"))[0]).max() == 0  # 0.49 of a level: rounds to black
    assert np.asarray(open_image(str(tmp_path / "float.tif"))[0]).mean() == pytest.approx(191, abs=1)
    assert np.asarray(open_image(str(tmp_path / "int32.tif"))[0]).mean() == pytest.approx(128, abs=1)
    mid = np.full((20, 20), 32896, np.uint16)  # 50.2 % of full scale
    Image.fromarray(mid).save(tmp_path / "mid16.png")
    assert np.asarray(open_image(str(tmp_path / "mid16.png"))[0]).mean() == pytest.approx(128, abs=0.5)
    tifffile.imwrite(tmp_path / "nan.tif", np.full((20, 20), np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        open_image(str(tmp_path / "nan.tif"))


def test_sample_keeps_an_icc_profile_and_writes_the_format_its_extension_names(tmp_path, random_ckpt, capsys):
    from PIL import ImageCms
    wide = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # any profile that is not sRGB
    photo(12, 12).save(tmp_path / "in.png", icc_profile=wide)
    out = run_one(tmp_path, capsys, tmp_path / "in.png", random_ckpt)
    assert Image.open(out).info.get("icc_profile") == wide
    for name, magic in [("r.jpg", b"\xff\xd8\xff"), ("r.webp", b"RIFF"), ("r.bmp", b"BM"), ("r.tif", b"II*\0")]:
        path = run_one(tmp_path, capsys, tmp_path / "in.png", random_ckpt, out=name)
        assert path.read_bytes().startswith(magic), name
    code, _, err = sample_main([tmp_path / "in.png", "--ckpt", random_ckpt, "--out", tmp_path / "r.gif"], capsys)
    assert code == 2 and "cannot write this format" in one_line(err) and not (tmp_path / "r.gif").exists()


def test_eval_json_is_standard_json_even_for_a_perfect_score(tmp_path, random_ckpt):
    os.makedirs(tmp_path / "hr")
    Image.new("RGB", (40, 40), (90, 120, 200)).save(tmp_path / "hr" / "flat.png")  # bicubic is exact: PSNR inf
    assert ev.main([random_ckpt, "--data", str(tmp_path / "hr"), "--out", str(tmp_path / "res")]) == 0
    text = open(tmp_path / "res.json").read()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert [r["psnr"] for r in report["rows"] if r["model"] == "bicubic"] == [None]


# -----------------------------------------------------------------------------
# never a traceback, never a hang: header fields by type, odd numbers


@pytest.mark.parametrize("name,edit,words", [
    ("int8_weights", lambda t, h: t.__setitem__("unet.conv_in.weight", t["unet.conv_in.weight"].to(torch.int8)),
     "integer or bool"),
    ("bool_context", lambda t, h: t.__setitem__("context", t["context"] > 0), "context"),
    ("steps_float", lambda t, h: h.setdefault("meta", {}).__setitem__("sampling_steps", 2.5), "sampling_steps"),
    ("steps_huge", lambda t, h: h.setdefault("meta", {}).__setitem__("sampling_steps", 1000), "sampling_steps"),
    ("w_max_string", lambda t, h: h.setdefault("meta", {}).__setitem__("w_max", "4"), "w_max"),
    ("layers_huge", lambda t, h: h["unet"].__setitem__("layers_per_block", 65536), "at most"),
    ("levels_many", lambda t, h: h["vae"].__setitem__("block_out_channels", [32] * 40), "block_out_channels"),
    ("schedule_wrong", lambda t, h: t.__setitem__("alphas_cumprod", torch.ones(10)), "alphas_cumprod"),
])
def test_forged_header_fields_are_checked_by_type_first(name, edit, words, tmp_path, random_ckpt, capsys):
    t, h = load_file(random_ckpt), read_header(random_ckpt)
    edit(t, h)
    save_file(t, str(tmp_path / "f.pt"), metadata={"yonos": json.dumps(h)})
    photo(16, 16).save(tmp_path / "in.png")
    t0 = time.time()
    code, _, err = sample_main([tmp_path / "in.png", "--ckpt", tmp_path / "f.pt"], capsys)
    assert code == 2 and words in one_line(err) and time.time() - t0 < 10, err
    assert sorted(os.listdir(tmp_path)) == ["f.pt", "in.png"]


@pytest.mark.parametrize("args,words", [(["--seed", str(2 ** 70)], "--seed"), (["--tile", "-3"], "--tile"),
                                        (["--steps", "1.5"], "--steps"), (["--max-pixels", "0"], "--max-pixels")])
def test_sample_odd_numbers_are_one_line(args, words, tmp_path, random_ckpt, capsys):
    photo(12, 12).save(tmp_path / "img.png")
    code, _, err = sample_main([tmp_path / "img.png", "--ckpt", random_ckpt, *args], capsys)
    assert code == 2 and words in one_line(err)


@pytest.mark.parametrize("args,words", [(["--tile", "-3"], "--tile"), (["--seeds", str(2 ** 70)], "--seeds"),
                                        (["--lr-jpeg", "300"], "--lr-jpeg")])
def test_eval_odd_numbers_are_one_line(args, words, tmp_path, random_ckpt, capsys):
    write_photos(tmp_path / "hr", n=1, size=40)
    code = ev.main([random_ckpt, "--data", str(tmp_path / "hr"), "--out", str(tmp_path / "res"), *args])
    assert code == 2 and words in one_line(capsys.readouterr().err) and not os.path.exists(tmp_path / "res.json")


# -----------------------------------------------------------------------------
# memory: planned before the work, and bounded by the tile


def test_sample_refuses_what_would_not_fit_before_reading_it(tmp_path, random_ckpt, capsys):
    """An input near Pillow's bomb limit, or a checkpoint claiming x64: the output's size is checked against
    --max-pixels from the file's header, before any decoding; one line, at once."""
    import zlib
    width, height = 9000, 9000  # 81 M pixels (Pillow warns above 89 M): a valid grey PNG of zeros, 80 KB on disk
    rows = zlib.compressobj(9)
    body = b"".join(rows.compress(b"\0" * (width + 1)) for _ in range(height)) + rows.flush()
    chunk = lambda kind, d: len(d).to_bytes(4, "big") + kind + d + zlib.crc32(kind + d).to_bytes(4, "big")
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(
        4, "big") + bytes([8, 0, 0, 0, 0])) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    t0 = time.time()
    code, _, err = sample_main([tmp_path / "big.png", "--ckpt", random_ckpt], capsys)
    assert code == 1 and "--max-pixels" in one_line(err) and time.time() - t0 < 10
    forge(random_ckpt, str(tmp_path / "x64.pt"), lambda h: h.__setitem__("scale", 64))
    photo(300, 300).save(tmp_path / "in.png")
    code, _, err = sample_main([tmp_path / "in.png", "--ckpt", tmp_path / "x64.pt"], capsys)
    assert code == 1 and "--max-pixels" in one_line(err) and "19200x19200" in err
    assert sorted(os.listdir(tmp_path)) == ["big.png", "in.png", "x64.pt"]


PEAK = """import runpy, sys, runtime
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print("peak", runtime.peak_rss())
"""


def test_sample_memory_is_bounded_by_the_tile_not_the_image_and_within_its_plan(tmp_path, random_ckpt):
    """The same model on an image 64 times taller (64x the output pixels, the same width): peak memory grows by far
    less than the output would take in memory (it is streamed to the PNG a band at a time, never held; what a band
    holds grows with the width only), and stays within what sample.py says it will need before it starts."""
    peaks, plans = [], []
    for width, height in ((64, 32), (64, 2048)):
        photo(width, height).save(tmp_path / f"in{height}.png")
        r = run_script(["-c", PEAK, os.path.join(HERE, "sample.py"), str(tmp_path / f"in{height}.png"), "--ckpt",
                        random_ckpt, "--tile", "32", "--overlap", "2", "--dtype", "fp32", "--threads", "1"])
        assert r.returncode == 0, r.stderr[-2000:]
        peaks.append(int(r.stdout.split("peak")[-1]))
        plans.append(float(r.stdout.split("needs about ")[1].split(" MB")[0].replace(",", "")) * 2 ** 20)
    in_memory = 256 * 8192 * (3 + 4 * (3 + 3 + 1 + 2))  # the output, the input, sums, weights, noise: 77 MB
    assert peaks[1] - peaks[0] < in_memory / 2, (peaks, in_memory)  # measured 14-30 MB (allocator noise)
    assert all(peak <= plan for peak, plan in zip(peaks, plans)), (peaks, plans)  # the plan is an upper bound