"""One interface over text-to-image diffusion models.

A :class:`DiffusionBackbone` wraps a denoiser (a diffusers ``UNet2DConditionModel`` here; the diffusion
transformers of :mod:`cad_lightning.backbones.families`), its text encoders and tokenizers, a scheduler and,
for latent models, a VAE. The embedded tiny model is pixel-space (no VAE); Stable Diffusion 1.x/2.x, SDXL,
SD3, FLUX and PixArt folders are latent-space. All are read from a local diffusers folder by
:func:`load_backbone`, which picks the family from the folder's ``model_index.json``; nothing is ever
downloaded.

Every family turns prompts into one conditioning tensor (B, L, D) (:meth:`DiffusionBackbone.encode`), so the
objectives, the masked generation and the evaluation batch, repeat and concatenate conditionings without
knowing the family. Families whose denoiser takes more than token embeddings (SDXL's pooled text and size
conditioning, SD3's and FLUX's pooled projections, PixArt's attention mask) pack those values into trailing
rows of that tensor (:func:`pack_conditioning`); their :meth:`~DiffusionBackbone.predict_noise` unpacks them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerBase,
    T5EncoderModel,
)

from cad_lightning.backbones.tokenizer import check_prompts
from cad_lightning.errors import UserInputError, first_line
from cad_lightning.shipped import resolve_model_path

SAMPLER_DEFAULTS_FILE = "sampler_defaults.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Seeds = int | Sequence[int]


@dataclass
class Trajectory:
    """Every state of one sampling run: ``latents[i]`` is x_t at ``timesteps[i]``, shape (T, B, C, h, w).

    ``final`` is the denoised sample x_0 (B, C, h, w) in the model's space (pixels in [-1, 1] or latents).
    ``uncond_noise[i]`` is the unconditional (negative-prompt) prediction ε(x_t, c_neg, t) the guided sampler
    computed at ``latents[i]`` (None without guidance), kept so objectives can reuse it instead of recomputing.
    """

    timesteps: torch.Tensor
    latents: torch.Tensor
    final: torch.Tensor
    uncond_noise: torch.Tensor | None = None
    negative_prompt: str = ""


def _seed_list(seed: Seeds, n: int) -> list[int]:
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise UserInputError(f"Got {len(seeds)} seeds for {n} prompts; give one seed per prompt or a single int.")
    return seeds


class DiffusionBackbone(torch.nn.Module):
    """A text-to-image diffusion model with the operations attribution needs.

    Each sample's initial noise comes from its own seed, so a result does not depend on how prompts are batched.
    """

    family = "Stable Diffusion 1.x/2.x"
    part = "unet"  # the denoiser's folder in a model folder
    prediction = "epsilon"  # what the denoiser predicts: epsilon, v_prediction or flow (the velocity noise - x_0)

    def __init__(
        self,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: DDIMScheduler,
        vae: AutoencoderKL | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        name: str = "model",
        sample_size: int | None = None,
    ) -> None:
        super().__init__()
        self.denoiser = unet
        self.text_encoder = text_encoder
        self.vae = vae
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.eta = eta
        self.use_clipped_model_output = use_clipped_model_output
        self.name = name
        self.sample_size = sample_size
        if getattr(scheduler.config, "prediction_type", "epsilon") == "v_prediction":
            self.prediction = "v_prediction"

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser (kept under its Stable Diffusion name for the UNet families)."""
        return self.denoiser

    # --- shapes -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.sample_size or self.denoiser.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.latent_channels, *size)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def image_size(self) -> int:
        return self.latent_shape[1] * self.vae_scale_factor

    # --- text ---------------------------------------------------------------------------------
    def check_prompts(self, prompts: Sequence[str]) -> None:
        check_prompts(self.tokenizer, prompts)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (B, L, D) of the prompts, padded to the tokenizer's full length as in Stable Diffusion."""
        self.check_prompts(prompts)
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    # --- denoising ----------------------------------------------------------------------------
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor | int, text: torch.Tensor) -> torch.Tensor:
        """ε(x_t, c, t) for a batch: x_t (B, C, h, w), t scalar or (B,), text (B, L, D)."""
        return self.denoiser(x_t, t, encoder_hidden_states=text).sample

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t of x_0 under the training noise ``noise`` at timesteps t (N,)."""
        if self.prediction == "flow":
            sigma = self._sigma(t, x0)
            return (1 - sigma) * x0 + sigma * noise
        return self.scheduler.add_noise(x0, noise, t.to(x0.device))

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict at x_t = :meth:`add_noise` (x0, noise, t): the noise, the
        velocity of v-prediction models, or for flow matching noise - x_0."""
        if self.prediction == "flow":
            return noise - x0
        if self.prediction == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t.to(x0.device))
        return noise

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigma = t.to(like.device, torch.float32) / self.scheduler.config.num_train_timesteps
        return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def guided_noise(
        self, x_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """Classifier-free guided ε, both branches in one UNet call."""
        return self._guided(x_t, t, cond, uncond, guidance_scale)[0]

    def _guided(self, x_t, t, cond, uncond, guidance_scale) -> tuple[torch.Tensor, torch.Tensor | None]:
        if guidance_scale == 1.0:
            return self.predict_noise(x_t, t, cond), None
        eps_u, eps_c = self.predict_noise(torch.cat([x_t, x_t]), t, torch.cat([uncond, cond])).chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u), eps_u

    def generators(self, n: int, seed: Seeds) -> list[torch.Generator]:
        """One CPU generator per sample; it draws that sample's initial noise, then its sampler noise (eta > 0)."""
        return [torch.Generator().manual_seed(s) for s in _seed_list(seed, n)]

    def draw_noise(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """One standard normal latent per generator, stacked on the model's device and dtype."""
        noise = [torch.randn(self.latent_shape, generator=g) for g in generators]
        return torch.stack(noise).to(self.device, self.dtype)

    def denoise_step(
        self, scheduler: DDIMScheduler, eps: torch.Tensor, t: torch.Tensor | int, x: torch.Tensor, eta: float,
        generators: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """One DDIM step from x_t; with eta > 0 the fresh noise of sample i comes from ``generators[i]``.

        eta = 0 is deterministic DDIM; eta = 1 adds the DDPM posterior's noise at every step (ancestral sampling).
        With ``use_clipped_model_output`` (and a scheduler that clips x_0), the step re-derives ε from the
        clipped x_0, so the step's x_0 and ε agree (as DDPM's posterior does) instead of pairing a clipped x_0
        with the unclipped ε.
        """
        if self.prediction == "flow":
            return scheduler.step(eps, t, x).prev_sample
        clipped = self.use_clipped_model_output
        if eta == 0.0:
            return scheduler.step(eps, t, x, use_clipped_model_output=clipped).prev_sample
        if generators is None or len(generators) != x.shape[0]:
            raise ValueError("Sampling with eta > 0 needs one generator per sample.")
        noise = self.draw_noise(generators)
        return scheduler.step(eps, t, x, eta=eta, use_clipped_model_output=clipped, variance_noise=noise).prev_sample

    def sampler_settings(
        self, num_inference_steps: int | None = None, guidance_scale: float | None = None, eta: float | None = None
    ) -> dict:
        """The sampler a call with these arguments runs (None: the model's default), for run records."""
        return {
            "sampler": "flow-matching Euler" if self.prediction == "flow" else "DDIM",
            "num_inference_steps": num_inference_steps or self.num_inference_steps,
            "guidance_scale": self.guidance_scale if guidance_scale is None else guidance_scale,
            "eta": self.eta if eta is None else eta,
            "use_clipped_model_output": self.use_clipped_model_output,
        }

    def new_scheduler(self, num_inference_steps: int):
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        # The step's coefficients in float64: with eta > 0 and a long first step (e.g. t 999 -> 799, where
        # alpha_bar_t ~ 1e-9), 1 - alpha_bar_prev - sigma_t^2 is ~1e-8, which float32 rounds below zero, and its
        # square root turns the whole sample into NaN. The samples themselves stay in the model's dtype.
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
        return scheduler

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        seed: Seeds = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str = "",
        keep_trajectory: bool = False,
        eta: float | None = None,
    ) -> Trajectory:
        """Run DDIM from seeded noise; with ``keep_trajectory`` every x_t is kept.

        ``eta`` (default: the model's) is DDIM's stochasticity: 0 is deterministic, 1 ancestral. Sample i's
        initial and sampler noise come from its own seed, so results do not depend on batching.
        """
        steps = num_inference_steps or self.num_inference_steps
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        eta = self.eta if eta is None else eta
        if eta < 0:
            raise UserInputError(f"eta must be 0 or more (0: deterministic DDIM, 1: ancestral), got {eta}.")
        if eta > 0 and self.prediction == "flow":
            raise UserInputError(f"eta is {eta}, but {self.family} samples with the deterministic flow-matching "
                                 "Euler sampler; leave eta at 0.")
        scheduler = self.new_scheduler(steps)
        n = len(prompts)
        cond = self.encode(prompts)
        uncond = self.encode([negative_prompt] * n)
        generators = self.generators(n, seed)
        x = self.draw_noise(generators) * getattr(scheduler, "init_noise_sigma", 1.0)
        scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
        states, times, uncond_eps = [], [], []
        for t in scheduler.timesteps:
            eps, eps_u = self._guided(scale_input(x, t), t, cond, uncond, scale)
            if keep_trajectory:
                states.append(x)
                times.append(t)
                uncond_eps.append(eps_u)
            x = self.denoise_step(scheduler, eps, t, x, eta, generators)
        if keep_trajectory:
            kept_uncond = torch.stack(uncond_eps) if scale != 1.0 else None
            return Trajectory(torch.stack(times), torch.stack(states), x, kept_uncond, negative_prompt)
        return Trajectory(scheduler.timesteps, x.new_empty((0, *x.shape)), x, None, negative_prompt)

    def trajectory(self, prompts: Sequence[str], seed: Seeds = 0, **kwargs) -> Trajectory:
        """The whole denoising trajectory (every x_t with its timestep) of one sampling run."""
        return self.sample(prompts, seed=seed, keep_trajectory=True, **kwargs)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, H, W) in [0, 1] from the model's x_0."""
        if self.vae is not None:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            x0 = self.vae.decode(x0.to(self.vae.dtype) / self.vae.config.scaling_factor + shift).sample
        return ((x0.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The model's x_0 of images (B, 3, H, W) in [0, 1] (the inverse of :meth:`decode`)."""
        x = images.to(self.device) * 2 - 1
        if self.vae is not None:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            x = (self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean - shift) * self.vae.config.scaling_factor
        return x.to(self.dtype)

    def generate(
        self,
        prompts: Sequence[str],
        seed: Seeds = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int | None = None,
        eta: float | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] for the prompts; prompt i uses seed ``seed + i`` (or ``seed[i]``)."""
        prompts = list(prompts)
        seeds = _seed_list(seed, len(prompts))
        batch_size = batch_size or max(len(prompts), 1)
        out = []
        for i in range(0, len(prompts), batch_size):
            run = self.sample(
                prompts[i : i + batch_size], seeds[i : i + batch_size], num_inference_steps, guidance_scale, eta=eta
            )
            out.append(self.decode(run.final))
        return torch.cat(out) if out else torch.empty(0, 3, self.image_size, self.image_size)


SUPPORTED = "Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX.1 and PixArt-α/Σ"


def model_family(path: str | os.PathLike) -> str:
    """The family of a model folder, from the pipeline class its ``model_index.json`` names: ``sd`` (also the
    embedded model, whose folder has no model_index.json), ``sdxl``, ``sd3``, ``flux`` or ``pixart``; anything
    else is refused in one sentence naming what was found."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return "sd"
    try:
        pipeline = str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError) as error:
        raise UserInputError(f"The model folder '{path}': model_index.json does not read as JSON "
                             f"({first_line(error)}).") from error
    for prefix, family in (("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"), ("Flux", "flux"),
                           ("PixArt", "pixart"), ("StableDiffusion", "sd")):
        if pipeline.startswith(prefix):
            return family
    raise UserInputError(f"The model folder '{path}' holds a {pipeline or 'pipeline with no _class_name'} "
                         f"(model_index.json); cad-lightning reads {SUPPORTED} folders.")


# the parts each family loads beyond tokenizer/, scheduler/ and vae/: the denoiser first, then the text encoders
# and further tokenizers, each with its loader and precision (``model``: the denoiser's dtype, ``t5``: bf16 with a
# bf16 denoiser else fp32, ``fp32``); a part marked ``optional`` may be missing (SD3 without T5)
FAMILY_PARTS = {
    "sd": {"unet": (UNet2DConditionModel, "model"), "text_encoder": (CLIPTextModel, "fp32")},
    "sdxl": {"unet": (UNet2DConditionModel, "model"), "text_encoder": (CLIPTextModel, "fp32"),
             "text_encoder_2": (CLIPTextModelWithProjection, "fp32"), "tokenizer_2": (AutoTokenizer, "fp32")},
    "sd3": {"transformer": (SD3Transformer2DModel, "model"), "text_encoder": (CLIPTextModelWithProjection, "fp32"),
            "text_encoder_2": (CLIPTextModelWithProjection, "fp32"), "tokenizer_2": (AutoTokenizer, "fp32"),
            "text_encoder_3": (T5EncoderModel, "t5", "optional"), "tokenizer_3": (AutoTokenizer, "fp32", "optional")},
    "flux": {"transformer": (FluxTransformer2DModel, "model"), "text_encoder": (CLIPTextModel, "fp32"),
             "text_encoder_2": (T5EncoderModel, "t5"), "tokenizer_2": (AutoTokenizer, "fp32")},
    "pixart": {"transformer": (PixArtTransformer2DModel, "model"), "text_encoder": (T5EncoderModel, "t5")},
}


def required_parts(family: str) -> tuple[str, ...]:
    parts = [p for p, spec in FAMILY_PARTS[family].items() if "optional" not in spec]
    return (*parts[:2], "tokenizer", "scheduler", *(("vae",) if family != "sd" else ()), *parts[2:])


def check_model_folder(path: str | os.PathLike) -> Path:
    """The folder as a Path, or a UserInputError naming what makes it not a model folder of its family."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserInputError(f"The model path '{path}' is not a folder; give a diffusers model folder.")
    family = model_family(folder)
    parts = required_parts(family)
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        latent = " and, for latent models, vae/" if family == "sd" else ""
        raise UserInputError(
            f"The folder '{path}' is not a model folder: it has no {', '.join(p + '/' for p in missing)} "
            f"(a model folder holds {', '.join(p + '/' for p in parts)}{latent})."
        )
    return folder


def load_part(folder: Path, part: str, load, **kwargs):
    """``load(folder / part, **kwargs)``; a part that does not load (missing, truncated or corrupt weights, an
    empty tokenizer folder, a broken config) is refused in one sentence naming the part, its files and why."""
    try:
        return load(folder / part, **kwargs)
    except Exception as error:  # whatever a corrupt folder raises (OSError, SafetensorError, ValueError, ...)
        files = sorted(p.name for p in (folder / part).iterdir() if p.is_file()) if (folder / part).is_dir() else []
        root = error  # the loaders wrap the reason (e.g. a safetensors header error) in generic errors
        while (root.__cause__ or root.__context__) is not None:
            root = root.__cause__ or root.__context__
        raise UserInputError(
            f"The model folder '{folder}': {part}/ does not load ({first_line(root)}); it holds "
            f"{', '.join(files) if files else 'no files'}. Copy that part again from a working model folder."
        ) from error


def load_backbone(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "fp32",
) -> DiffusionBackbone:
    """Load a text-to-image model from a local diffusers folder: the embedded model, Stable Diffusion 1.x/2.x,
    SDXL, SD3, FLUX.1 or PixArt-α/Σ (the family is read from ``model_index.json``).

    ``dtype`` is the denoiser's and VAE's precision (fp32, fp16 or bf16; a VAE whose configuration asks to be
    upcast, as SDXL's does, stays in fp32); the CLIP text encoders stay in fp32, and so does T5 except in bf16
    (T5 overflows in fp16; in fp32 T5-XXL alone takes 19 GB). A ``sampler_defaults.json`` in the
    folder overrides the family's sampler defaults (steps, guidance, eta, latent ``sample_size``, ...).
    """
    folder = check_model_folder(resolve_model_path(path))  # a shipped model by name, from any folder
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserInputError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'.")
        dtype = DTYPES[dtype]
    family = model_family(folder)
    from cad_lightning.backbones import families  # the families subclass DiffusionBackbone

    kwargs = {"local_files_only": True}
    model_kwargs = {**kwargs, "low_cpu_mem_usage": False, "torch_dtype": dtype}
    t5_kwargs = {**kwargs, "torch_dtype": torch.bfloat16 if dtype == torch.bfloat16 else torch.float32}
    vae = None
    if (folder / "vae").is_dir():
        vae = load_part(folder, "vae", AutoencoderKL.from_pretrained, **model_kwargs)
        if getattr(vae.config, "force_upcast", False) and family != "sd":
            vae = vae.float()  # SDXL's VAE overflows in fp16
    tokenizer = load_part(folder, "tokenizer", AutoTokenizer.from_pretrained, **kwargs)
    scheduler_class = FlowMatchEulerDiscreteScheduler if family in ("sd3", "flux") else DDIMScheduler
    scheduler = load_part(folder, "scheduler", scheduler_class.from_pretrained, **kwargs)
    precision = {"model": model_kwargs, "t5": t5_kwargs, "fp32": kwargs}
    loaded = {part: load_part(folder, part, spec[0].from_pretrained, **precision[spec[1]])
              for part, spec in FAMILY_PARTS[family].items() if "optional" not in spec or (folder / part).is_dir()}
    denoiser, text_encoder = loaded.pop(next(iter(FAMILY_PARTS[family]))), loaded.pop("text_encoder")
    extra, defaults = loaded, FAMILY_DEFAULTS[family]
    if family == "sdxl":
        index = json.loads((folder / "model_index.json").read_text())
        extra["force_zeros_for_empty_prompt"] = bool(index.get("force_zeros_for_empty_prompt", True))
    if family == "flux" and not denoiser.config.guidance_embeds:  # FLUX.1 [schnell]: timestep-distilled, 4 steps
        defaults = {**defaults, "num_inference_steps": 4}
    cls = families.BACKBONES.get(family, DiffusionBackbone)
    defaults = dict(defaults)
    if (folder / SAMPLER_DEFAULTS_FILE).is_file():
        try:
            defaults.update(json.loads((folder / SAMPLER_DEFAULTS_FILE).read_text()))
        except (OSError, ValueError) as error:
            raise UserInputError(f"The model folder '{path}': {SAMPLER_DEFAULTS_FILE} does not read as JSON "
                                 f"({first_line(error)}).") from error
    backbone = cls(denoiser, text_encoder, tokenizer, scheduler, vae, name=folder.name, **extra, **defaults)
    backbone.requires_grad_(False)
    backbone.eval()
    if device is not None:
        backbone.to(device)
    return backbone


# each family's sampler defaults: those of its diffusers pipeline (DDIM for the UNets and PixArt)
FAMILY_DEFAULTS = {
    "sd": {"num_inference_steps": 50, "guidance_scale": 7.5, "eta": 0.0, "use_clipped_model_output": False},
    "sdxl": {"num_inference_steps": 50, "guidance_scale": 5.0},
    "sd3": {"num_inference_steps": 28, "guidance_scale": 7.0},
    "flux": {"num_inference_steps": 28, "guidance_scale": 1.0},
    "pixart": {"num_inference_steps": 20, "guidance_scale": 4.5},
}
