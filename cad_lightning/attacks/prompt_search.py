"""A discrete prompt search against an erased model: is there a prompt without the concept's word that draws it?

In the spirit of UnlearnDiffAtk (Zhang et al., ECCV 2024; official code OPTML-Group/Diffusion-MU-Attack,
``src/attackers/hard_prompt_.py`` ``HardPromptAttacker.run`` with the criterion of
``src/tasks/classifier_.py`` ``ClassifierTask.get_loss``): the attack looks for the prompt under which the erased
denoiser best denoises images of the concept drawn by the unedited model (the l2 between the noise and the erased
model's prediction at x_t of a concept image, the same noise and timestep for every candidate), then checks with
the concept classifier whether its images draw the concept. Theirs optimises k adversarial token embeddings
prepended to the concept's prompt and projects them onto the vocabulary (PEZ); on a world of a dozen words the
prompts can be searched directly, so ours scores ``budget`` random prompts of the world's words (seeded), the
erased word excluded (so none of them is the concept's prompt), keeps the ``keep`` with the lowest loss and
samples each on the search seeds; the one whose images are read as the concept most often is the attack's
prompt. It is read on the report seeds beside the unedited model's reading of the same prompt: a prompt attack
recovers the concept only by what it draws beyond what that prompt draws on the unedited model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cad_lightning.errors import UserInputError


@dataclass
class PromptSearchSettings:
    """The prompt search's budget.

    Args:
        budget: random prompts scored by the denoising loss on the concept's images.
        keep: of them, the lowest-loss prompts sampled on the search seeds.
        images: images per kept prompt on the search seeds.
        max_words: longest prompt searched (at most what the tokenizer reads).
        timesteps: (image, timestep, noise) draws the loss of a prompt averages over.
    """

    budget: int = 300
    keep: int = 8
    images: int = 16
    max_words: int = 4
    timesteps: int = 32

    def check(self, owner: str = "prompt_search") -> None:
        for name in ("budget", "keep", "images", "max_words", "timesteps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserInputError(f"{owner}.{name} must be a whole number >= 1, got {value!r}.")
        if self.keep > self.budget:
            raise UserInputError(f"{owner}.keep ({self.keep}) must be at most its budget ({self.budget}).")


def candidate_prompts(words: Sequence[str], excluded: Sequence[str], budget: int, max_words: int,
                      seed: int) -> list[str]:
    """``budget`` distinct prompts of 1..``max_words`` of ``words`` (those in ``excluded`` left out), drawn from
    ``seed``; fewer when the words cannot make that many."""
    pool = [w for w in words if w not in set(excluded)]
    if not pool:
        raise UserInputError("The prompt search has no word left to search once the concept's words are excluded.")
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, None] = {}
    tries = 0
    while len(out) < budget and tries < 50 * budget:
        tries += 1
        n = int(torch.randint(1, max_words + 1, (1,), generator=generator))
        picks = torch.randint(len(pool), (n,), generator=generator).tolist()
        out.setdefault(" ".join(pool[i] for i in picks), None)
    return list(out)


@torch.no_grad()
def denoising_losses(backbone, prompts: Sequence[str], images: torch.Tensor, draws: int, seed: int,
                     batch_size: int = 64) -> torch.Tensor:
    """The mean l2 between noise and the backbone's prediction on ``draws`` (image, timestep, noise) triples of
    ``images`` (the same triples for every prompt: common random numbers), one value per prompt."""
    generator = torch.Generator().manual_seed(seed)
    x0_all = backbone.encode_images(images)
    pick = torch.randint(len(images), (draws,), generator=generator)
    x0 = x0_all[pick]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    t = torch.randint(0, backbone.scheduler.config.num_train_timesteps, (draws,), generator=generator).to(x0.device)
    x_t = backbone.add_noise(x0, noise, t)
    target = backbone.training_target(x0, noise, t)
    losses = []
    for prompt in prompts:
        text = backbone.encode([prompt]).expand(draws, -1, -1)
        total = 0.0
        for i in range(0, draws, batch_size):
            pred = backbone.predict_noise(x_t[i:i + batch_size], t[i:i + batch_size], text[i:i + batch_size])
            total += float(F.mse_loss(pred.float(), target[i:i + batch_size].float(), reduction="sum"))
        losses.append(total / target.numel())
    return torch.tensor(losses)


def search_prompt(backbone, images: torch.Tensor, words: Sequence[str], excluded: Sequence[str],
                  rate: Callable[[str], float], settings: PromptSearchSettings | None = None, seed: int = 0,
                  progress: bool = True) -> dict:
    """The attack's prompt on the backbone's current weights: the candidates, scored by
    :func:`denoising_losses` on the concept's ``images``, the ``keep`` best read by ``rate(prompt)`` (the
    fraction of its search-seed images read as the concept). Returns ``{"prompt", "search_rate", "loss",
    "kept": [{"prompt", "loss", "search_rate"}], "candidates"}``."""
    settings = settings or PromptSearchSettings()
    settings.check()
    prompts = candidate_prompts(words, excluded, settings.budget, settings.max_words, seed)
    losses = denoising_losses(backbone, prompts, images, settings.timesteps, seed + 1)
    order = torch.argsort(losses)[: settings.keep].tolist()
    kept = []
    for i in tqdm(order, desc="Prompt search", unit="prompt", disable=not progress):
        kept.append({"prompt": prompts[i], "loss": float(losses[i]), "search_rate": rate(prompts[i])})
    best = max(kept, key=lambda k: (k["search_rate"], -k["loss"]))
    return {"prompt": best["prompt"], "search_rate": best["search_rate"], "loss": best["loss"], "kept": kept,
            "candidates": len(prompts)}
