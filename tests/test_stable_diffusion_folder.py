"""The Stable Diffusion (latent, with VAE) path of the backbone, on a tiny random SD folder written offline."""

from __future__ import annotations

import shutil
import socket

import pytest
import torch
from sd_folder import IMAGE_SIZE, LATENT_SIZE

from cad_lightning.backbones.backbone import Trajectory, load_backbone
from cad_lightning.errors import UserInputError

PROMPTS = ["a photo of a cat", "a photo of a dog"]
STEPS = 3
SCALE = 5.0


def _go_offline(mp: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 and no network at all: any connection attempt fails the test."""
    import huggingface_hub.constants

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    mp.setattr(socket.socket, "connect", no_network)
    mp.setattr(socket, "create_connection", no_network)


@pytest.fixture(scope="module")
def backbone(tiny_sd_folder):
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp)
        return load_backbone(tiny_sd_folder)


@pytest.fixture(scope="module")
def images(backbone):
    return backbone.generate(PROMPTS, seed=0, num_inference_steps=STEPS, guidance_scale=SCALE)


def test_loads_offline_with_vae(tiny_sd_folder, monkeypatch):
    _go_offline(monkeypatch)
    model = load_backbone(tiny_sd_folder)
    assert model.vae is not None
    assert model.latent_shape == (4, LATENT_SIZE, LATENT_SIZE)
    assert model.image_size == IMAGE_SIZE == 2 * LATENT_SIZE
    assert model.dtype == torch.float32
    sched = model.scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (sched.steps_offset, sched.clip_sample, sched.set_alpha_to_one) == (1, False, False)
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_generate_shape_range_finite(images):
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert images.dtype == torch.float32
    assert torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    assert images.std() > 0  # not a constant (e.g. fully clamped) image
    assert not torch.equal(images[0], images[1])


def test_generate_is_deterministic_in_the_seed(backbone, images):
    again = backbone.generate(PROMPTS, seed=0, num_inference_steps=STEPS, guidance_scale=SCALE)
    assert torch.equal(images, again)
    other = backbone.generate(PROMPTS, seed=5, num_inference_steps=STEPS, guidance_scale=SCALE)
    assert (images - other).abs().max() > 1e-3


def test_per_prompt_seeds_make_batching_irrelevant(backbone, images):
    listed = backbone.generate(PROMPTS, seed=[0, 1], num_inference_steps=STEPS, guidance_scale=SCALE)
    torch.testing.assert_close(listed, images, atol=1e-5, rtol=0)  # int seed s means seeds s, s+1, ...
    alone = [
        backbone.generate([p], seed=[s], num_inference_steps=STEPS, guidance_scale=SCALE)
        for p, s in zip(PROMPTS, [0, 1])
    ]
    torch.testing.assert_close(torch.cat(alone), listed, atol=1e-5, rtol=0)
    one_by_one = backbone.generate(PROMPTS, seed=[0, 1], num_inference_steps=STEPS, guidance_scale=SCALE, batch_size=1)
    torch.testing.assert_close(one_by_one, listed, atol=1e-5, rtol=0)


def test_trajectory(backbone, images):
    run = backbone.trajectory(PROMPTS, seed=0, num_inference_steps=STEPS, guidance_scale=SCALE)
    assert isinstance(run, Trajectory)
    assert run.timesteps.shape == (STEPS,)
    assert run.latents.shape == (STEPS, 2, 4, LATENT_SIZE, LATENT_SIZE)
    assert run.final.shape == (2, 4, LATENT_SIZE, LATENT_SIZE)
    assert (run.timesteps[1:] < run.timesteps[:-1]).all()
    assert 0 <= int(run.timesteps.min()) and int(run.timesteps.max()) < backbone.scheduler.config.num_train_timesteps
    assert torch.isfinite(run.latents).all() and torch.isfinite(run.final).all()
    # the first state is each prompt's own seeded noise, and decoding x_0 gives generate's images
    shape = (4, LATENT_SIZE, LATENT_SIZE)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    torch.testing.assert_close(run.latents[0], noise)
    torch.testing.assert_close(backbone.decode(run.final), images, atol=1e-5, rtol=0)


def test_matches_diffusers_pipeline(tiny_sd_folder, backbone, monkeypatch):
    """The folder loads in a plain StableDiffusionPipeline, which samples the same image as the backbone."""
    from diffusers import StableDiffusionPipeline

    _go_offline(monkeypatch)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPTS[0],
        num_inference_steps=2,
        guidance_scale=SCALE,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert out.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(out).all()
    ours = backbone.generate(PROMPTS[:1], seed=[0], num_inference_steps=2, guidance_scale=SCALE)
    torch.testing.assert_close(ours, out.float(), atol=1e-4, rtol=0)


def test_bf16(tiny_sd_folder):
    model = load_backbone(tiny_sd_folder, dtype="bf16")
    assert model.unet.dtype == torch.bfloat16
    assert model.vae.dtype == torch.bfloat16
    assert model.dtype == torch.bfloat16
    out = model.generate(PROMPTS, seed=0, num_inference_steps=2, guidance_scale=SCALE)
    assert out.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1


def test_unknown_dtype_is_a_user_error(tiny_sd_folder):
    with pytest.raises(UserInputError, match="dtype"):
        load_backbone(tiny_sd_folder, dtype="fp64")


def test_folder_without_text_encoder(tiny_sd_folder, tmp_path):
    broken = tmp_path / "no-text-encoder"
    shutil.copytree(tiny_sd_folder, broken, ignore=shutil.ignore_patterns("text_encoder"))
    assert (broken / "unet").is_dir() and not (broken / "text_encoder").exists()
    with pytest.raises(UserInputError) as err:
        load_backbone(broken)
    assert "has no text_encoder/" in str(err.value)


def test_path_that_is_a_file(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"not a model folder")
    with pytest.raises(UserInputError):
        load_backbone(file)
    with pytest.raises(UserInputError):
        load_backbone(tmp_path / "does-not-exist")


def test_folder_is_deterministic_in_the_seed(tiny_sd_folder, tmp_path):
    from sd_folder import write_tiny_sd_folder

    parts = ("unet", "vae", "text_encoder")
    same = write_tiny_sd_folder(tmp_path / "same", seed=0)
    other = write_tiny_sd_folder(tmp_path / "other", seed=1)
    for part in parts:
        (weights,) = (tiny_sd_folder / part).glob("*.safetensors")
        assert (same / part / weights.name).read_bytes() == weights.read_bytes(), part
        assert (other / part / weights.name).read_bytes() != weights.read_bytes(), part
    for meta in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json"):
        assert (same / meta).read_text() == (tiny_sd_folder / meta).read_text()
