"""Pretraining of the embedded model on the shapes world, as Lightning fits.

``TextToImagePretrain`` trains a pixel-space diffusers ``UNet2DConditionModel`` jointly with a small
transformers ``CLIPTextModel`` (word-level tokenizer), with prompt dropout for classifier-free guidance.
EMA weights come from Lightning's ``EMAWeightAveraging`` callback (see configs/pretrain_tiny.yaml);
at the end of training they are exported as a diffusers model folder.

``ClassifierPretrain`` trains the concept classifier that ships beside it.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics.classification import MulticlassAccuracy
from transformers import CLIPTextConfig, CLIPTextModel, get_cosine_with_min_lr_schedule_with_warmup

from cad_lightning.backbones.backbone import SAMPLER_DEFAULTS_FILE, DiffusionBackbone
from cad_lightning.backbones.tokenizer import build_word_tokenizer
from cad_lightning.data.world import CONCEPT_KINDS, VOCABULARY, prompts_naming
from cad_lightning.evaluation.classifier import ConceptClassifier, load_concept_classifier
from cad_lightning.utils import atomic_folder, image_grid, log_image, write_json




class TextToImagePretrain(pl.LightningModule):
    """Trains the embedded text-to-image model (ε-prediction, DDPM noise, cosine β schedule).

    Args:
        resolution: image side in pixels (pixel-space model).
        block_out_channels: UNet widths per resolution level.
        layers_per_block: ResNet/transformer layers per UNet block.
        attention_head_dim: width of each attention head.
        cross_attention_levels: which levels (from the highest resolution) get transformer blocks.
        text_width / text_layers / text_heads: size of the CLIP text encoder.
        prompt_dropout: probability of training on the empty prompt (classifier-free guidance).
        snr_gamma: Min-SNR-γ loss weighting (Hang et al. 2023): each sample's loss is weighted by
            min(SNR(t), γ) / SNR(t), so the nearly noise-free timesteps stop dominating the gradient and the
            model learns the content decided at high noise (shape, colour) sooner; None: the plain ε loss.
        learning_rate / warmup_steps: AdamW peak rate, linear warm-up, then cosine decay over ``max_steps`` to 5% of it.
        export_dir: folder the EMA model is written to at the end of training (diffusers folder format).
        sample_steps / guidance_scale / sample_eta / use_clipped_model_output: the default sampler (DDIM steps,
            classifier-free guidance, DDIM's eta, and whether each step re-derives ε from the clipped x_0; see
            ``DiffusionBackbone.denoise_step``), used for validation grids and saved with the model.
        classifier_path: a concept classifier used to score validation samples (optional).
    """

    def __init__(
        self,
        resolution: int = 16,
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        cross_attention_levels: tuple[int, ...] = (1,),
        text_width: int = 64,
        text_layers: int = 2,
        text_heads: int = 4,
        prompt_dropout: float = 0.1,
        snr_gamma: float | None = None,
        learning_rate: float = 1e-3,
        warmup_steps: int = 200,
        num_train_timesteps: int = 1000,
        export_dir: str | None = None,
        sample_steps: int = 25,
        guidance_scale: float = 2.0,
        sample_eta: float = 0.0,
        use_clipped_model_output: bool = True,
        classifier_path: str | None = None,
        val_samples_per_concept: int = 16,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        levels = len(block_out_channels)
        down = [
            "CrossAttnDownBlock2D" if i in cross_attention_levels else "DownBlock2D" for i in range(levels)
        ]
        up = ["CrossAttnUpBlock2D" if (levels - 1 - i) in cross_attention_levels else "UpBlock2D" for i in range(levels)]
        self.tokenizer = build_word_tokenizer(VOCABULARY)
        self.unet = UNet2DConditionModel(
            sample_size=resolution,
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=text_width,
            attention_head_dim=attention_head_dim,
            norm_num_groups=8,
        )
        self.text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=text_width,
                intermediate_size=4 * text_width,
                num_hidden_layers=text_layers,
                num_attention_heads=text_heads,
                max_position_embeddings=self.tokenizer.model_max_length,
                pad_token_id=self.tokenizer.pad_token_id,
                bos_token_id=self.tokenizer.bos_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        )
        self.noise_scheduler = DDIMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule="squaredcos_cap_v2",
            clip_sample=True,
            set_alpha_to_one=False,
            timestep_spacing="trailing",
            prediction_type="epsilon",
        )
        self._classifier = None

    def backbone(self) -> DiffusionBackbone:
        """The model being trained, seen through the common backbone interface."""
        return DiffusionBackbone(
            self.unet, self.text_encoder, self.tokenizer, self.noise_scheduler,
            num_inference_steps=self.hparams.sample_steps, guidance_scale=self.hparams.guidance_scale,
            eta=self.hparams.sample_eta, use_clipped_model_output=self.hparams.use_clipped_model_output,
        )

    def denoising_loss(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x0 = images * 2 - 1
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=self.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        text = self.text_encoder(ids)[0]
        prediction = self.unet(x_t, t, encoder_hidden_states=text).sample
        if self.hparams.snr_gamma is None:
            return F.mse_loss(prediction, noise)
        snr = compute_snr(self.noise_scheduler, t)
        weight = snr.clamp(max=self.hparams.snr_gamma) / snr
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        return (weight * per_sample).mean()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, prompts, _ = batch
        drop = torch.rand(len(prompts)) < self.hparams.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        loss = self.denoising_loss(images, prompts)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, prompts, _ = batch
        # the same noise at every validation, so the curve is comparable; the training noise after it goes on as
        # if there had been no validation (the CPU's and this GPU's generators are put back)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(batch_idx)
            loss = self.denoising_loss(images, prompts)
        self.log("val/loss", loss, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        backbone = self.backbone()
        grid_prompts = [f"a {c} {t} {s}" for s in CONCEPT_KINDS["shape"] for c in CONCEPT_KINDS["colour"] for t in CONCEPT_KINDS["texture"]]
        images = backbone.generate(grid_prompts[::2], seed=0)
        log_image(self.logger, "val/samples", image_grid(images, ncol=len(CONCEPT_KINDS["colour"])), self.global_step)
        if self.hparams.classifier_path:
            self._classifier = self._classifier or load_concept_classifier(self.hparams.classifier_path).to(self.device)
            generator = torch.Generator().manual_seed(0)
            n = self.hparams.val_samples_per_concept
            for kind, words in CONCEPT_KINDS.items():
                hits = 0
                for word in words:
                    predicted = self._classifier(backbone.generate(prompts_naming(word, n, generator), seed=0))[kind]
                    hits += sum(p == word for p in predicted)
                self.log(f"val/accuracy_{kind}", hits / (n * len(words)))

    def configure_optimizers(self):
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=0.0)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 10_000
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, self.hparams.warmup_steps, total, min_lr_rate=0.05)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        # Callbacks run first, so EMAWeightAveraging has already copied the average into these weights.
        if self.hparams.export_dir:
            self.export(self.hparams.export_dir)

    @rank_zero_only
    def export(self, folder: str | Path) -> None:
        """Write the model as a diffusers folder: unet/, text_encoder/, tokenizer/, scheduler/ and sampler defaults."""
        folder = Path(folder)
        for name, part in (("unet", self.unet), ("text_encoder", self.text_encoder), ("tokenizer", self.tokenizer),
                           ("scheduler", self.noise_scheduler)):
            with atomic_folder(folder / name) as tmp:  # a crash never leaves half a model part
                part.save_pretrained(tmp)
        defaults = {
            "num_inference_steps": self.hparams.sample_steps,
            "guidance_scale": self.hparams.guidance_scale,
            "eta": self.hparams.sample_eta,
            "use_clipped_model_output": self.hparams.use_clipped_model_output,
        }
        write_json(folder / SAMPLER_DEFAULTS_FILE, defaults)


class ClassifierPretrain(pl.LightningModule):
    """Trains the concept classifier on shapes-world renders, with noise and blur so it also reads generated images.

    Args:
        resolution / width: size of the classifier.
        learning_rate: AdamW rate (cosine decay over ``max_steps``).
        noise_std: largest standard deviation of the Gaussian noise added to training images.
        export_dir: model folder whose ``classifier/`` receives the trained classifier.
    """

    def __init__(
        self,
        resolution: int = 16,
        width: int = 32,
        learning_rate: float = 2e-3,
        noise_std: float = 0.08,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classifier = ConceptClassifier(
            concepts={k: list(v) for k, v in CONCEPT_KINDS.items()}, resolution=resolution, width=width
        )
        self.accuracy = torch.nn.ModuleDict(
            {kind: MulticlassAccuracy(num_classes=len(words), average="micro") for kind, words in CONCEPT_KINDS.items()}
        )

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        mix = 0.6 * torch.rand(n, 1, 1, 1, device=images.device)
        images = (1 - mix) * images + mix * blurred
        noise = torch.randn_like(images) * self.hparams.noise_std * torch.rand(n, 1, 1, 1, device=images.device)
        return (images + noise).clamp(0, 1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, _, labels = batch
        logits = self.classifier(self.augment(images))
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in logits)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, _, labels = batch
        logits = self.classifier(images)
        for kind, metric in self.accuracy.items():
            metric(logits[kind], labels[kind])
            self.log(f"val/accuracy_{kind}", metric, prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.classifier.parameters(), lr=self.hparams.learning_rate)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 2_000
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 50, total, min_lr_rate=0.01)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            with atomic_folder(Path(self.hparams.export_dir) / "classifier") as tmp:
                self.classifier.save_pretrained(tmp)
