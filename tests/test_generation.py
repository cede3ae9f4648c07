"""The shipped model generates deterministically, and the generation job writes its grid or fails clearly."""

from pathlib import Path

import pytest
import torch
from conftest import SHIPPED_MODEL, run_cli
from PIL import Image

GENERATE = str(Path(__file__).resolve().parent.parent / "configs" / "generate.yaml")


def test_generation_is_deterministic(tiny_backbone):
    prompts = ["a red circle", "a blue striped square", ""]
    a = tiny_backbone.generate(prompts, seed=0, num_inference_steps=10)
    b = tiny_backbone.generate(prompts, seed=0, num_inference_steps=10)
    c = tiny_backbone.generate(prompts, seed=1, num_inference_steps=10)
    assert a.shape == (3, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1
    alone = tiny_backbone.generate(prompts[1:2], seed=[1], num_inference_steps=10)
    assert torch.allclose(alone[0], a[1], atol=2e-3)  # batch size changes float summation order only


def test_trajectory(tiny_backbone):
    run = tiny_backbone.trajectory(["a green star"], seed=3, num_inference_steps=5)
    assert run.latents.shape == (5, 1, 3, 16, 16) and run.timesteps.shape == (5,)
    assert (run.timesteps[:-1] > run.timesteps[1:]).all()
    images = tiny_backbone.generate(["a green star"], seed=3, num_inference_steps=5)
    assert torch.allclose(tiny_backbone.decode(run.final), images)


def test_generate_job_writes_grid(tmp_path):
    code = run_cli(["predict", "--config", GENERATE, "--trainer.default_root_dir", str(tmp_path),
                    "--data.prompts", '["a red circle", "a yellow striped star"]', "--data.images_per_prompt", "3",
                    "--model.num_inference_steps", "5"])
    assert code == 0
    grid = Image.open(tmp_path / "samples.png")
    assert grid.height >= 2 * 16 * 4 and grid.width >= 3 * 16 * 4


def test_unknown_word_fails_with_vocabulary(tmp_path, capsys):
    code = run_cli(["predict", "--config", GENERATE, "--trainer.default_root_dir", str(tmp_path),
                    "--data.prompts", '["a purple dog"]'])
    err = capsys.readouterr().err
    assert code == 2
    assert "'purple'" in err and "vocabulary" in err and "circle" in err
    assert not (tmp_path / "samples.png").exists()


def test_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "unet").mkdir()
    code = run_cli(["predict", "--config", GENERATE, "--model.model_path", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "is not a model folder" in err and "text_encoder/" in err and "has no unet/" not in err


def test_shipped_folder_opens_in_plain_libraries():
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    UNet2DConditionModel.from_pretrained(SHIPPED_MODEL / "unet", local_files_only=True)
    CLIPTextModel.from_pretrained(SHIPPED_MODEL / "text_encoder", local_files_only=True)
    AutoTokenizer.from_pretrained(SHIPPED_MODEL / "tokenizer", local_files_only=True)
    DDIMScheduler.from_pretrained(SHIPPED_MODEL / "scheduler", local_files_only=True)
    size = sum(f.stat().st_size for f in SHIPPED_MODEL.rglob("*") if f.is_file())
    assert size <= 25 * 1024 * 1024


def test_shipped_classifier_on_held_out_renders(detector):
    from cad_lightning.data.world import ShapesWorld

    images, _, labels = ShapesWorld(16).sample(512, torch.Generator().manual_seed(2024))
    predicted = detector(images)
    for kind in ("shape", "colour", "texture"):
        acc = sum(p == t for p, t in zip(predicted[kind], labels.words(kind))) / 512
        assert acc >= 0.99, (kind, acc)


def test_ancestral_sampling_is_seeded_and_batch_independent(tiny_backbone):
    prompts = ["a red circle", "a blue striped square", "a star"]
    a = tiny_backbone.generate(prompts, seed=0, num_inference_steps=10, eta=1.0)
    b = tiny_backbone.generate(prompts, seed=0, num_inference_steps=10, eta=1.0)
    ddim = tiny_backbone.generate(prompts, seed=0, num_inference_steps=10, eta=0.0)
    assert torch.equal(a, b)
    assert (a - ddim).abs().max() > 0.1  # the per-step noise is really added
    alone = tiny_backbone.generate(prompts[2:], seed=[2], num_inference_steps=10, eta=1.0)
    assert torch.allclose(alone[0], a[2], atol=2e-3)  # each sample's step noise comes from its own seed
    run = tiny_backbone.trajectory(prompts[:1], seed=0, num_inference_steps=10, eta=1.0)
    assert torch.allclose(tiny_backbone.decode(run.final), a[:1], atol=2e-3)


@pytest.mark.parametrize("steps", [2, 4, 5, 8])
def test_ancestral_sampling_with_long_steps_stays_finite(tiny_backbone, steps):
    """At 5 steps the first step goes from t 999 (alpha_bar ~ 1e-9) to 799, where the step's
    1 - alpha_bar_prev - sigma^2 is ~1e-8: float32 coefficients round it below zero and every sample was NaN."""
    run = tiny_backbone.trajectory(["a red circle", "a striped circle"], seed=[0, 1], num_inference_steps=steps, eta=1.0)
    assert all(torch.isfinite(x).all() for x in run.latents)
    assert run.final.dtype == tiny_backbone.dtype


def test_negative_eta_is_refused(tiny_backbone):
    from cad_lightning.errors import UserInputError

    with pytest.raises(UserInputError, match="eta must be 0 or more"):
        tiny_backbone.generate(["a circle"], eta=-0.5)


@pytest.mark.parametrize("clipped", [False, True])
def test_ddim_step_pairs_clipped_x0_with_matching_noise(tiny_backbone, clipped):
    """With use_clipped_model_output, a step from x_t lands on sqrt(a')·clip(x0) + sqrt(1-a')·ε' where ε' is
    re-derived from the clipped x0; without it, the unclipped ε is kept."""
    scheduler = tiny_backbone.new_scheduler(25)
    t, t_prev = scheduler.timesteps[3], scheduler.timesteps[4]
    a, a_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_prev]
    x_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    eps = 3.0 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # x0 far outside [-1, 1]
    x0 = ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
    kept = (x_t - a.sqrt() * x0) / (1 - a).sqrt() if clipped else eps
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * kept
    old = tiny_backbone.use_clipped_model_output
    tiny_backbone.use_clipped_model_output = clipped
    try:
        out = tiny_backbone.denoise_step(scheduler, eps, t, x_t, eta=0.0)
    finally:
        tiny_backbone.use_clipped_model_output = old
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.slow
def test_shipped_model_draws_what_prompts_name(tiny_backbone, detector):
    """At the shipped default sampler, images of prompts naming a concept show it (16 per concept; the full
    measurement with 64+ per concept is benchmarks/model_quality.py)."""
    from cad_lightning.data.world import CONCEPT_KINDS, prompts_naming

    assert tiny_backbone.use_clipped_model_output  # the shipped sampler defaults are read from the folder
    generator = torch.Generator().manual_seed(7)
    hits, total = 0, 0
    for kind, words in CONCEPT_KINDS.items():
        for word in words:
            seen = detector(tiny_backbone.generate(prompts_naming(word, 16, generator), seed=500))[kind]
            correct = sum(s == word for s in seen)
            assert correct >= 13, (word, correct)
            hits, total = hits + correct, total + 16
    assert hits / total >= 0.95, hits / total


def test_the_shipped_model_loads_by_name_from_any_folder(tmp_path, monkeypatch):
    """``load_backbone('tiny-shapes')`` and ``load_concept_classifier('tiny-shapes')`` from a folder that holds no
    checkpoints/: the name resolves to the shipped model, as on the command line."""
    from cad_lightning import load_backbone, load_concept_classifier

    monkeypatch.chdir(tmp_path)
    backbone = load_backbone("tiny-shapes")
    images = backbone.generate(["a red circle"], seed=0, num_inference_steps=2)
    assert images.shape == (1, 3, 16, 16)
    assert set(load_concept_classifier("tiny-shapes")(images)) == {"shape", "colour", "texture"}
