"""Concept objectives J(c, w): how strongly the model with weights w expresses concept c.

Both objectives start from one guided sampling run per item (prompt, seed) and reuse every state of it:
the trajectory is sampled **once**, not from scratch for every timestep as in the official code, so an item
costs T guided sampling steps plus one batched forward/backward over its T states.

- :class:`EraseObjective`: J = mean over (t, x_t) of ‖ε(x_t, c_base, t).detach() − ε(x_t, c, t)‖²
  (mean squared error per element). High J: the concept pulls the prediction away from the base prompt's.
- :class:`AmplifyObjective`: J = −(denoising loss of the concept prompt on images of the concept; for the
  flow-matching transformers the flow-matching loss): the final
  samples of the same runs, shapes-world renders, or a folder of the user's images. High J: the model
  predicts the concept's images well.

Erasing zeroes components with high positive α = w·∂J/∂w; amplifying zeroes the most negative ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cad_lightning.backbones.backbone import DiffusionBackbone
from cad_lightning.data.world import CONCEPT_KINDS, ShapesWorld
from cad_lightning.errors import UserInputError

# the noise of state k of an item with seed s is drawn with seed s * this + k (a prime: no two (s, k) collide for k < it)
NOISE_SEED_STRIDE = 10_007


@dataclass
class ObjectiveInputs:
    """The states an objective is evaluated on, flattened over (timestep, item): x_t (N, C, h, w), t (N,),
    the concept's text embeddings (N, L, D); for amplify, the noise ε that made x_t from x_0 and the training
    target (ε, the velocity of v-prediction, or ε - x_0 for flow matching); for erase, the
    base prompt's prediction ε(x_t, c_base, t) when the sampler already computed it, else the base prompts'
    embeddings (N, L, D) when items have base prompts of their own."""

    x_t: torch.Tensor
    t: torch.Tensor
    text: torch.Tensor
    noise: torch.Tensor | None = None
    target: torch.Tensor | None = None
    base_noise: torch.Tensor | None = None
    base_text: torch.Tensor | None = None


class ConceptObjective:
    name = "objective"

    def __init__(self, base_prompt: str = "", guidance_scale: float | None = None, num_inference_steps: int | None = None):
        self.base_prompt = base_prompt
        self.guidance_scale = guidance_scale
        self.num_inference_steps = num_inference_steps

    def inputs(self, backbone: DiffusionBackbone, prompts: list[str], seeds: list[int],
               base_prompts: list[str] | None = None) -> ObjectiveInputs:
        """The states of the items' runs; ``base_prompts``: each item's base prompt (erase objective), when
        not the objective's one ``base_prompt``."""
        raise NotImplementedError

    def value(self, backbone: DiffusionBackbone, inputs: ObjectiveInputs) -> torch.Tensor:
        """J per state, shape (N,); differentiable in the UNet's weights."""
        raise NotImplementedError

    def _run(self, backbone: DiffusionBackbone, prompts: list[str], seeds: list[int]):
        run = backbone.trajectory(
            prompts, seed=seeds, guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps
        )
        steps, n = run.latents.shape[:2]
        text = backbone.encode(prompts).repeat(steps, 1, 1)
        return run, steps, n, text


class EraseObjective(ConceptObjective):
    name = "erase"

    def inputs(self, backbone: DiffusionBackbone, prompts: list[str], seeds: list[int],
               base_prompts: list[str] | None = None) -> ObjectiveInputs:
        run, steps, n, text = self._run(backbone, prompts, seeds)
        x_t = run.latents.reshape(steps * n, *run.latents.shape[2:])
        bases = list(base_prompts) if base_prompts is not None else [self.base_prompt] * n
        base_noise = base_text = None
        if run.uncond_noise is not None and all(b == run.negative_prompt for b in bases):
            # the guided sampler's unconditional branch is exactly ε(x_t, c_base, t): reuse it
            base_noise = run.uncond_noise.reshape(steps * n, *run.uncond_noise.shape[2:])
        else:
            base_text = backbone.encode(bases).repeat(steps, 1, 1)
        return ObjectiveInputs(x_t=x_t, t=run.timesteps.repeat_interleave(n), text=text, base_noise=base_noise,
                               base_text=base_text)

    def value(self, backbone: DiffusionBackbone, inputs: ObjectiveInputs) -> torch.Tensor:
        eps_base = inputs.base_noise
        if eps_base is None:
            with torch.no_grad():
                base_text = inputs.base_text
                if base_text is None:
                    base_text = backbone.encode([self.base_prompt]).expand_as(inputs.text)
                eps_base = backbone.predict_noise(inputs.x_t, inputs.t, base_text)
        eps = backbone.predict_noise(inputs.x_t, inputs.t, inputs.text)
        return (eps_base.float() - eps.float()).pow(2).flatten(1).mean(1)


class AmplifyObjective(ConceptObjective):
    """J = −denoising loss of the concept prompt on images of the concept.

    Args:
        image_source: where the images come from: ``model`` (the final samples of the model's own runs of the
            prompts), ``world`` (shapes-world renders of what each prompt names: ground truth, embedded model
            only), or a folder of the user's images (PNG/JPEG, resized to the model's resolution, cycled).
    """

    name = "amplify"

    def __init__(self, base_prompt: str = "", guidance_scale: float | None = None,
                 num_inference_steps: int | None = None, image_source: str = "model") -> None:
        super().__init__(base_prompt, guidance_scale, num_inference_steps)
        self.image_source = image_source
        if image_source not in ("model", "world"):
            folder = Path(image_source)
            files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")) if folder.is_dir() else []
            if not files:
                raise UserInputError(
                    f"model.image_source '{image_source}' is neither 'model', 'world' nor a folder holding PNG or JPEG images."
                )
            self.files = files

    def _images(self, backbone: DiffusionBackbone, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        size = backbone.image_size
        if self.image_source == "world":
            return torch.cat([render_prompt(p, s, size) for p, s in zip(prompts, seeds)])
        images = []
        for s in seeds:
            with Image.open(self.files[s % len(self.files)]) as im:
                im = im.convert("RGB").resize((size, size), Image.BICUBIC)
                images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255)
        return torch.stack(images)

    def inputs(self, backbone: DiffusionBackbone, prompts: list[str], seeds: list[int],
               base_prompts: list[str] | None = None) -> ObjectiveInputs:
        if self.image_source == "model":
            run, steps, n, text = self._run(backbone, prompts, seeds)
            x0_items, timesteps = run.final, run.timesteps
        else:
            x0_items = backbone.encode_images(self._images(backbone, prompts, seeds))
            timesteps = backbone.new_scheduler(self.num_inference_steps or backbone.num_inference_steps).timesteps
            steps, n = len(timesteps), len(prompts)
            text = backbone.encode(prompts).repeat(steps, 1, 1)
        x0 = x0_items.repeat(steps, 1, 1, 1)
        # the noise of each state is seeded by its item's seed, so an item's J does not depend on batching
        noise = torch.stack([
            torch.randn(x0_items.shape[1:], generator=torch.Generator().manual_seed(NOISE_SEED_STRIDE * s + k))
            for k in range(steps) for s in seeds
        ]).to(x0)
        t = timesteps.repeat_interleave(n)
        x_t = backbone.add_noise(x0, noise, t)
        return ObjectiveInputs(x_t=x_t, t=t, text=text, noise=noise, target=backbone.training_target(x0, noise, t))

    def value(self, backbone: DiffusionBackbone, inputs: ObjectiveInputs) -> torch.Tensor:
        eps = backbone.predict_noise(inputs.x_t, inputs.t, inputs.text)
        target = inputs.noise if inputs.target is None else inputs.target
        return -F.mse_loss(eps.float(), target.float(), reduction="none").flatten(1).mean(1)


def render_prompt(prompt: str, seed: int, resolution: int) -> torch.Tensor:
    """A shapes-world render (1, 3, H, W) of what the prompt names; unnamed kinds drawn from the seed."""
    generator = torch.Generator().manual_seed(seed)
    world = ShapesWorld(resolution)
    labels = world.sample_labels(1, generator)
    words = prompt.lower().split()
    for kind, vocab in CONCEPT_KINDS.items():
        for w in words:
            if w in vocab:
                setattr(labels, kind, torch.tensor([vocab.index(w)]))
    return world.render(labels, generator)


OBJECTIVES = {"erase": EraseObjective, "amplify": AmplifyObjective}
