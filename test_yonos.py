"""
Tests for yonos, the library: the model stack against diffusers and transformers, loading from a local Hub cache,
the method (schedule, conversions, DDIM, losses), and the README's reading guide and the course pack's build, which
point at it. Training is tested in test_train.py, using a model in test_sample_eval.py, hostile inputs in
test_hostile.py and test_hostile_runs.py. CPU only, offline, tiny configs; slow checks are marked `slow` and run
only with `pytest -m slow`.
"""
import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from diffusers import AutoencoderKL as RefVAE, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig as RefConfig, CLIPTextModel, CLIPTokenizer

from conftest import (AC, HERE, TINY_SD1, TINY_SD2, TINY_VAE, make_hub_cache, make_tiny_sd_repo, tiny_clip_config,
                      tiny_sr_unet, write_tokenizer)
from files import load_checked
from model import (UNET_PRESETS, CLIPTextConfig, TextEncoder, UNet, UNetConfig, empty_prompt_ids,
                   load_empty_prompt_context, widen_conv_in)
from vae import VAE_PRESETS, AutoencoderKL, VAEConfig
from yonos import (T, YonosSR, ddim_sample, ddim_timesteps, eps_from_v, make_alphas_cumprod, predict_v, q_sample,
                   scale_distillation_loss, snr, sr_loss, v_target, weighted_x0_loss, x0_from_v)

warnings.filterwarnings("ignore")
torch.set_num_threads(2)


def param_count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# -----------------------------------------------------------------------------
# model stack: parity with diffusers / transformers


@pytest.mark.parametrize("cfg", [TINY_SD1, TINY_SD2], ids=["sd1_family", "sd2_family"])
def test_unet_matches_diffusers(cfg):
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**cfg.to_diffusers()).eval()
    ours = UNet(UNetConfig.from_diffusers(dict(ref.config))).eval()
    assert ours.config == cfg
    load_checked(ours, ref.state_dict(), "diffusers")
    # odd latent sizes exercise the upsampler's size matching; two different timesteps in one batch
    x, t = torch.randn(2, 4, 12, 10), torch.tensor([7, 999])
    context = torch.randn(2, 77, cfg.cross_attention_dim)
    with torch.no_grad():
        expected, got = ref(x, t, context).sample, ours(x, t, context)
    assert expected.std() > 0.1
    assert (expected - got).abs().max() <= 1e-4


def test_vae_matches_diffusers():
    torch.manual_seed(0)
    ref = RefVAE(**TINY_VAE.to_diffusers()).eval()
    ours = AutoencoderKL(VAEConfig.from_diffusers(dict(ref.config))).eval()
    load_checked(ours, ref.state_dict(), "diffusers")
    x, z = torch.rand(2, 3, 24, 40) * 2 - 1, torch.randn(2, 4, 12, 20)
    with torch.no_grad():
        post, (mean, logvar) = ref.encode(x).latent_dist, ours.encode(x)
        expected, got = ref.decode(z).sample, ours.decode(z)
    assert (post.mean - mean).abs().max() <= 1e-4 and (post.logvar - logvar).abs().max() <= 1e-4
    assert expected.std() > 0.01 and (expected - got).abs().max() <= 1e-4


@pytest.mark.parametrize("name,dname", [("sd15", "sd15"), ("sd21", "sd21")])
def test_full_size_unet_has_diffusers_keys_and_shapes(name, dname):
    with torch.device("meta"):
        ours = UNet(UNET_PRESETS[name])
        ref = UNet2DConditionModel(**UNET_PRESETS[name].to_diffusers())
    expected_params = {"sd15": 859_520_964, "sd21": 865_910_724}[name]
    assert len(ours.state_dict()) == len(ref.state_dict()) == 686
    assert param_count(ours) == param_count(ref) == expected_params
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_full_size_vae_has_diffusers_keys_and_shapes():
    with torch.device("meta"):
        ours, ref = AutoencoderKL(VAE_PRESETS["sd"]), RefVAE(**VAE_PRESETS["sd"].to_diffusers())
    assert len(ours.state_dict()) == len(ref.state_dict()) == 248
    assert param_count(ours) == param_count(ref) == 83_653_863
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_unet_and_vae_match_diffusers_numerically(name):
    torch.manual_seed(0)
    cfg = UNET_PRESETS[name]
    ref = UNet2DConditionModel(**cfg.to_diffusers()).eval()
    ours = UNet(cfg).eval()
    load_checked(ours, ref.state_dict(), "diffusers")
    x, t, context = torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, cfg.cross_attention_dim)
    with torch.no_grad():
        assert (ref(x, t, context).sample - ours(x, t, context)).abs().max() <= 1e-4
    del ref, ours
    ref = RefVAE(**VAE_PRESETS["sd"].to_diffusers()).eval()
    ours = AutoencoderKL(VAE_PRESETS["sd"]).eval()
    load_checked(ours, ref.state_dict(), "diffusers")
    z = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        assert (ref.decode(z).sample - ours.decode(z)).abs().max() <= 1e-4


@pytest.mark.parametrize("act,pad", [("quick_gelu", "<|endoftext|>"), ("gelu", "!")], ids=["sd1", "sd2"])
def test_text_encoder_matches_transformers_on_empty_prompt(tmp_path, act, pad):
    torch.manual_seed(0)
    ref = CLIPTextModel(RefConfig(**tiny_clip_config(act))).eval()
    write_tokenizer(tmp_path, pad)
    tok = transformers_tokenizer(tmp_path)
    ids = torch.tensor([tok("", padding="max_length", max_length=77).input_ids])
    ours = TextEncoder(CLIPTextConfig.from_transformers(tiny_clip_config(act))).eval()
    state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in ref.state_dict().items()}
    load_checked(ours, state, "transformers")
    with torch.no_grad():
        expected, got = ref(ids).last_hidden_state, ours(ids)
    assert expected.std() > 0.1 and (expected - got).abs().max() <= 1e-4


# -----------------------------------------------------------------------------
# loading from a local Hub cache


def transformers_tokenizer(folder):
    special = json.load(open(os.path.join(folder, "special_tokens_map.json")))
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         pad_token=special["pad_token"])


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    return make_hub_cache(tmp_path_factory.mktemp("hub"), "org/tiny-sd", "sd2")


HUB = dict(local_files_only=True)


def test_from_pretrained_loads_from_local_hub_cache(hub_cache):
    unet = UNet.from_pretrained("org/tiny-sd", cache_dir=hub_cache, **HUB).eval()
    vae = AutoencoderKL.from_pretrained("org/tiny-sd", cache_dir=hub_cache, **HUB).eval()
    context = load_empty_prompt_context("org/tiny-sd", cache_dir=hub_cache, **HUB)
    snap = os.path.join(hub_cache, "models--org--tiny-sd", "snapshots", os.listdir(
        os.path.join(hub_cache, "models--org--tiny-sd", "snapshots"))[0])
    ref_unet = UNet2DConditionModel.from_pretrained(snap, subfolder="unet").eval()
    ref_vae = RefVAE.from_pretrained(snap, subfolder="vae").eval()
    ref_text = CLIPTextModel.from_pretrained(os.path.join(snap, "text_encoder")).eval()
    ids = torch.tensor([transformers_tokenizer(os.path.join(snap, "tokenizer"))(
        "", padding="max_length", max_length=77).input_ids])
    assert ids[0, 2].item() == 0  # sd2 family pads with "!"
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    with torch.no_grad():
        expected_context = ref_text(ids).last_hidden_state
        assert context.shape == (1, 77, TINY_SD2.cross_attention_dim)
        assert (context - expected_context).abs().max() <= 1e-4
        assert (ours := unet(x, t, context)).std() > 0.1
        assert (ours - ref_unet(x, t, expected_context).sample).abs().max() <= 1e-4
        assert (vae.decode(x) - ref_vae.decode(x).sample).abs().max() <= 1e-4


def test_from_pretrained_reads_fp16_variant_and_legacy_vae_names(tmp_path):
    torch.manual_seed(0)
    ref = RefVAE(**TINY_VAE.to_diffusers())
    half = RefVAE(**TINY_VAE.to_diffusers()).half()
    half.load_state_dict(ref.state_dict())
    half.save_pretrained(tmp_path / "vae", variant="fp16")
    assert load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors"))[
        "decoder.conv_out.weight"].dtype == torch.float16
    with pytest.raises(FileNotFoundError, match="variant='fp16'"):
        AutoencoderKL.from_pretrained(str(tmp_path))
    vae = AutoencoderKL.from_pretrained(str(tmp_path), variant="fp16")
    assert torch.equal(vae.decoder.conv_out.weight, ref.decoder.conv_out.weight.half().float())
    # the same weights under the legacy attention names (query/key/value/proj_attn)
    legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
              .replace("to_out.0.", "proj_attn."): v for k, v in ref.state_dict().items()}
    assert any(".query." in k for k in legacy)
    save_file(legacy, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    vae = AutoencoderKL.from_pretrained(str(tmp_path))
    assert torch.equal(vae.encoder.mid_block.attentions[0].to_q.weight, ref.encoder.mid_block.attentions[0].to_q.weight)


def test_from_pretrained_errors_name_the_problem(hub_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="org/missing"):
        UNet.from_pretrained("org/missing", cache_dir=hub_cache, **HUB)
    with pytest.raises(FileNotFoundError, match="no subfolder 'unet_x'"):
        UNet.from_pretrained("org/tiny-sd", subfolder="unet_x", cache_dir=hub_cache, **HUB)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        UNet.from_pretrained(str(tmp_path / "nowhere" / "at" / "all"))
    make_tiny_sd_repo(tmp_path / "repo", "sd1")
    path = tmp_path / "repo" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    bad = dict(state, **{"conv_in.weight": torch.zeros(32, 3, 3, 3)})
    save_file(bad, str(path))
    with pytest.raises(ValueError, match=r"wrong shapes: conv_in.weight \(32, 3, 3, 3\) \(expected \(32, 4, 3, 3\)\)"):
        UNet.from_pretrained(str(tmp_path / "repo"))
    save_file(dict(state, **{"extra.weight": torch.zeros(1)}), str(path))
    with pytest.raises(ValueError, match="1 unexpected keys: extra.weight"):
        UNet.from_pretrained(str(tmp_path / "repo"))
    del state["conv_out.bias"]
    save_file(state, str(path))
    with pytest.raises(ValueError, match="1 missing keys: conv_out.bias"):
        UNet.from_pretrained(str(tmp_path / "repo"))


def test_empty_prompt_ids_follow_each_family():
    assert empty_prompt_ids(998, 999, 999)[0, :4].tolist() == [998, 999, 999, 999]
    assert empty_prompt_ids(998, 999, 0)[0, :4].tolist() == [998, 999, 0, 0]


def test_widen_conv_in_leaves_output_bit_identical():
    torch.manual_seed(0)
    unet = UNet(TINY_SD1).eval()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(1, 77, 24)
    with torch.no_grad():
        before = unet(x, t, context)
        widen_conv_in(unet, 8)
        assert unet.conv_in.weight.shape == (32, 8, 3, 3) and unet.config.in_channels == 8
        for extra in (torch.zeros(2, 4, 8, 8), torch.randn(2, 4, 8, 8) * 100):
            assert torch.equal(unet(torch.cat([x, extra], 1), t, context), before)


# -----------------------------------------------------------------------------
# the method: schedule, conversions, DDIM, losses


@pytest.mark.parametrize("steps", [1, 2, 4, 50])
def test_ddim_sampler_matches_diffusers(steps):
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == ddim_timesteps(steps)
    unet = tiny_sr_unet().eval()
    z_l, context, noise = torch.randn(2, 4, 8, 8), torch.randn(1, 8, 32), torch.randn(2, 4, 8, 8)
    z = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(unet(torch.cat([z, z_l], 1), t.expand(2), context), t, z, eta=0.0).prev_sample
    ours = ddim_sample(unet, z_l, context, AC, steps, noise)
    assert z.std() > 0.1 and (z - ours).abs().max() <= 1e-4


def test_schedule_matches_sd():
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    ours = make_alphas_cumprod()
    assert ours.shape == (T,) and ours.dtype == torch.float64 and (ours.float() - ref).abs().max() < 1e-6
    assert torch.equal(ours, AC)
    assert ddim_timesteps(1) == [999] and ddim_timesteps(4) == [999, 749, 499, 249]


def test_v_parameterization_round_trips():
    torch.manual_seed(0)
    z0, eps, t = torch.randn(5, 4, 6, 6), torch.randn(5, 4, 6, 6), torch.tensor([0, 1, 250, 700, 999])
    z_t = q_sample(z0, t, eps, AC)
    v = v_target(z0, eps, t, AC)
    assert torch.allclose(x0_from_v(z_t, v, t, AC), z0, atol=1e-5)
    assert torch.allclose(eps_from_v(z_t, v, t, AC), eps, atol=1e-5)
    # and x0/eps -> v -> x0/eps through z_t again
    assert torch.allclose(v_target(x0_from_v(z_t, v, t, AC), eps_from_v(z_t, v, t, AC), t, AC), v, atol=1e-5)


def test_weighted_x0_loss_equals_v_mse():
    torch.manual_seed(0)
    z0, eps, t = torch.randn(8, 4, 4, 4), torch.randn(8, 4, 4, 4), torch.randint(0, T, (8,))
    z_t, v = q_sample(z0, t, eps, AC), v_target(z0, eps, t, AC)
    v_pred = v + 0.3 * torch.randn_like(v)
    x0_pred = x0_from_v(z_t, v_pred, t, AC)
    assert torch.allclose(weighted_x0_loss(x0_pred, z0, t, AC), ((v_pred - v) ** 2).mean(), rtol=1e-4)
    assert torch.allclose(snr(torch.tensor([500]), AC).flatten(), (AC[500] / (1 - AC[500])).float())


def test_distillation_loss_zero_for_own_teacher_and_grad_only_to_student():
    teacher = tiny_sr_unet(0)
    student = copy.deepcopy(teacher)
    z_h, z_l, context = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(1, 8, 32)
    g = lambda: torch.Generator().manual_seed(3)
    assert scale_distillation_loss(student, teacher, z_h, z_l, z_l, context, AC, g()).item() == 0.0
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    loss = scale_distillation_loss(student, teacher, z_h, z_l, torch.randn(2, 4, 8, 8), context, AC, g())
    assert loss.item() > 0
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert sr_loss(student, z_h, z_l, context, AC, g()).item() > 0


def test_shortcut_vae_starts_as_an_exact_space_to_channel_rearrangement():
    """VAEConfig.shortcut (DC-AE's residual autoencoding): a fresh small VAE encodes to the pixels rearranged into
    12 channels and decodes back exactly; after the residual branches move, both still differ from it only by them."""
    vae = AutoencoderKL(VAE_PRESETS["small"]).eval()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        mean, _ = vae.encode(x)
        assert torch.equal(mean, torch.nn.functional.pixel_unshuffle(x, 2))
        assert torch.allclose(vae.decode(mean), x, atol=1e-6)
        torch.nn.init.normal_(vae.decoder.conv_out.weight, std=0.1)
        rec = vae.decode(mean)
    assert (rec - x).abs().max() > 1e-3  # the decoder's residual is added, not ignored
    with pytest.raises(ValueError, match="shortcut"):
        VAEConfig(block_out_channels=(32, 64), latent_channels=8, norm_num_groups=16, shortcut=True)
    with pytest.raises(ValueError, match="shortcut"):
        VAE_PRESETS["small"].to_diffusers()


def test_lr_preconditioning_reads_the_output_as_a_residual_over_the_lr_latent():
    """UNetConfig.lr_prior_std (yonos.lr_preconditioning): a U-Net that outputs 0 predicts x0 = z_l at t = 999 (so a
    fresh model's one step is the bicubic input), z_t / alpha near t = 0, and what it outputs moves x0 by c_out."""
    class Constant(torch.nn.Module):
        def __init__(self, value, s=0.2):
            super().__init__()
            self.value, self.config = value, UNetConfig(in_channels=8, block_out_channels=(32,), attn_levels=(False,),
                                                        num_heads=(1,), norm_num_groups=16, lr_prior_std=s)

        def forward(self, x, t, context):
            return torch.full_like(x[:, :4], self.value)

    g = torch.Generator().manual_seed(0)
    z_l, z_t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for t, expect, away in [(999, z_l, z_t), (0, z_t / AC[0].sqrt().float(), z_l)]:
        tb = torch.full((3,), t)
        x0 = x0_from_v(z_t, predict_v(Constant(0.0), z_t, z_l, tb, None, AC), tb, AC)
        # within 3% of the way from `expect` to the other end
        assert (x0 - expect).norm() <= 0.03 * (away - expect).norm(), t
    tb = torch.full((3,), 999)
    moved = x0_from_v(z_t, predict_v(Constant(1.0), z_t, z_l, tb, None, AC), tb, AC) - \
        x0_from_v(z_t, predict_v(Constant(0.0), z_t, z_l, tb, None, AC), tb, AC)
    assert torch.allclose(moved, torch.full_like(moved, 0.2), atol=0.002)  # c_out = s at t = 999
    # one DDIM step of a fresh small-preset model lands near the LR latent, far nearer than the noise it starts from
    unet = UNet(UNET_PRESETS["small"]).eval()
    z_l = torch.randn(1, 12, 16, 16, generator=g)
    ctx = torch.randn(1, 8, 32, generator=g)
    out = ddim_sample(unet, z_l, ctx, AC, 1, torch.randn(1, 12, 16, 16, generator=g))
    assert (out - z_l).std() < 0.2 * z_l.std()
    with pytest.raises(ValueError, match="lr_prior_std"):
        UNetConfig(lr_prior_std=-1.0)


def test_checkpoint_round_trip_without_pickle(tmp_path):
    model = YonosSR(tiny_sr_unet(), AutoencoderKL(VAE_PRESETS["tiny"]), torch.randn(1, 8, 32), 4, {"note": "x"})
    path = str(tmp_path / "x4.pt")
    model.save(path)
    with open(path, "rb") as f:  # a safetensors file: 8-byte header length, then JSON
        assert f.read(9)[8:9] == b"{"
    loaded = YonosSR.load(path)
    assert loaded.scale == 4 and loaded.meta == {"note": "x"} and loaded.unet.config == model.unet.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a yonos checkpoint"):
        YonosSR.load(str(tmp_path / "bad.pt"))
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


# -----------------------------------------------------------------------------
# the README's reading guide and the course pack's build


def test_readme_reading_guide_points_at_the_code():
    """The README's table paper -> function -> file:line: every row must name the line that defines the function
    (the failure message gives the right lines, so the table is quick to mend when code moves)."""
    import re
    rows = re.findall(r"^\|[^|\n]*\|[^|\n]*\| `(\w+)` \| `(\w+\.py):(\d+)` \|$", open(os.path.join(HERE, "README.md"),
                                                                                     encoding="utf-8").read(), re.M)
    assert len(rows) >= 20
    wrong = []
    for fn, path, line in rows:
        lines = open(os.path.join(HERE, path), encoding="utf-8").read().split("\n")
        actual = [i for i, text in enumerate(lines, 1) if re.match(rf"(def|class) {fn}\b", text)]
        if actual != [int(line)]:
            wrong.append(f"{fn}: {path}:{line} should be {path}:{actual}")
    assert not wrong, "; ".join(wrong)


def test_course_build_blanks_regions_keeps_line_numbers_and_refuses_bad_markers():
    sys.path.insert(0, os.path.join(HERE, "course"))
    from build import blank_out
    src = "def f(x):\n    # BEGIN SOLUTION ddim\n    y = x + 1\n    return y\n    # END SOLUTION\n\n\ndef g():\n    return 2\n"
    out, tasks = blank_out(src, "m.py", {"ddim"})
    assert tasks == ["ddim"] and len(out.split("\n")) == len(src.split("\n"))
    assert out.split("\n")[2].strip().startswith('raise NotImplementedError("ddim: your code here')
    assert out.split("\n")[7:] == src.split("\n")[7:]  # the rest, byte for byte, at the same line numbers
    assert blank_out(out, "m.py", {"ddim"}) == (out, tasks)  # idempotent
    for bad, words in [(src.replace("    # END SOLUTION\n", ""), "never ended"),
                       (src.replace("    # BEGIN SOLUTION ddim\n", ""), "without a BEGIN"),
                       (src.replace("    y = x + 1\n", "    # BEGIN SOLUTION ddim\n"), "cannot nest"),
                       (src, "not a task")]:
        with pytest.raises(ValueError, match=words) as e:
            blank_out(bad, "m.py", {"ddim"} if words != "not a task" else {"schedule"})
        assert "\n" not in str(e.value)


def test_every_course_task_accepts_a_second_correct_implementation():
    """course/test_tasks.py with COURSE_ALTERNATIVE=1: each task's tests run on an implementation written
    differently from the solution (the timestep embedding as 1 / P ** (i / half) with torch.outer, the wavelet as two
    1-D passes, ...); all must pass, or a test accepts only the solution's exact arithmetic."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join(HERE, "course", "test_tasks.py")], cwd=HERE, capture_output=True, text=True,
                       env={**os.environ, "COURSE_ALTERNATIVE": "1"}, timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-3000:]


def test_walkthrough_notebook_runs_headless_and_is_stored_without_outputs(tmp_path):
    """walkthrough.ipynb, every cell, in a fresh kernel (nbclient), on small photos the test makes; any cell's error
    fails the test. Stored without outputs, so its diff is the code."""
    import nbformat
    from nbclient import NotebookClient
    from conftest import write_photos
    path = os.path.join(HERE, "walkthrough.ipynb")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    photos = write_photos(tmp_path / "photos", n=4, size=160)
    os.environ.update(YONOS_PHOTOS=photos, YONOS_WALKTHROUGH_STEPS="20", MPLBACKEND="Agg")
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    finally:
        for k in ("YONOS_PHOTOS", "YONOS_WALKTHROUGH_STEPS", "MPLBACKEND"):
            os.environ.pop(k)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "U-Net parameters" in text and "distilled: mean" in text and "in 20 steps" in text
