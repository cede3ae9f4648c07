"""Pretraining runs as a Lightning fit on CPU, its loss falls, and its export opens as a model folder."""

import lightning.pytorch as pl
import torch

from cad_lightning import load_backbone, load_concept_classifier
from cad_lightning.data.shapes_datamodule import ShapesDataModule
from cad_lightning.data.world import ShapesWorld
from cad_lightning.pretrain import ClassifierPretrain, TextToImagePretrain


def fixed_loss(module: TextToImagePretrain, images, prompts) -> float:
    torch.manual_seed(123)
    with torch.no_grad():
        return float(module.denoising_loss(images, prompts))


def trainer(tmp_path, steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, default_root_dir=tmp_path, enable_model_summary=False,
    )


def test_text_to_image_loss_falls_and_exports(tmp_path):
    pl.seed_everything(0)
    module = TextToImagePretrain(block_out_channels=(16, 32), text_width=32, text_layers=1, learning_rate=2e-3,
                                 warmup_steps=5, export_dir=str(tmp_path / "model"), guidance_scale=2.5, sample_eta=0.5)
    images, prompts, _ = ShapesWorld(16).sample(64, torch.Generator().manual_seed(99))
    before = fixed_loss(module, images, prompts)
    trainer(tmp_path, 40).fit(module, ShapesDataModule(batch_size=32, seed=0))
    after = fixed_loss(module, images, prompts)
    assert after < 0.6 * before, (before, after)
    backbone = load_backbone(tmp_path / "model")
    assert torch.equal(backbone.denoiser.conv_in.weight, module.unet.conv_in.weight)
    # the sampler the module was given travels with the model
    assert (backbone.guidance_scale, backbone.eta, backbone.use_clipped_model_output) == (2.5, 0.5, True)
    out = backbone.generate(["a red circle"], seed=0, num_inference_steps=2)
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_classifier_learns_and_exports(tmp_path):
    pl.seed_everything(0)
    module = ClassifierPretrain(width=8, learning_rate=5e-3, export_dir=str(tmp_path / "model"))
    trainer(tmp_path, 60).fit(module, ShapesDataModule(batch_size=64, seed=0))
    detector = load_concept_classifier(tmp_path / "model")
    images, _, labels = ShapesWorld(16).sample(256, torch.Generator().manual_seed(7))
    predicted = detector(images)
    colour_acc = sum(p == t for p, t in zip(predicted["colour"], labels.words("colour"))) / 256
    assert colour_acc > 0.6  # chance is 0.25


def test_min_snr_weighting():
    """γ above every SNR of the schedule weights every sample by 1 (the plain loss); a small γ down-weights the
    nearly noise-free timesteps, so the weighted loss is smaller than the plain one."""
    pl.seed_everything(0)
    plain = TextToImagePretrain(block_out_channels=(16, 32), text_width=32, text_layers=1)
    images, prompts, _ = ShapesWorld(16).sample(32, torch.Generator().manual_seed(5))
    loss = fixed_loss(plain, images, prompts)
    plain.hparams.snr_gamma = 1e12
    assert abs(fixed_loss(plain, images, prompts) - loss) <= 1e-6 * loss
    plain.hparams.snr_gamma = 1.0
    assert fixed_loss(plain, images, prompts) < 0.9 * loss
