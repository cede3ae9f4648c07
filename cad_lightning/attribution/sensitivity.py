"""Output sensitivity: how much removing each weight moves the model's predictions on prompts to preserve.

CAD's erase objective is the gap between two branches (the concept prompt and its base prompt) at the same
state, so damage common to both branches (a colour cast, a contrast change) costs it nothing. The sensitivity
sees that damage: for weight i,

    s_i = E_{x_t, t, c} mean_k (w_i · ∂ε_k(x_t, c, t)/∂w_i)²

the squared first-order change of the noise prediction, per element, when w_i is zeroed, averaged over the
states of sampling runs of prompts that must stay as they are (the target prompts without the concept, and
prompts of the retained concepts). It is in the units of the erase objective (a squared ε difference per
element), and it is the leading term of ‖ε_w' − ε_w‖² for w' = w without w_i, whose first-order term vanishes.

The sum over output elements is estimated with one Rademacher probe v per state (Hutchinson):
E_v[(w · ∂(v·ε)/∂w)²] = Σ_k (w · ∂ε_k/∂w)², one backward pass per run instead of one per output element. Each
run's probe is drawn from its own seed, so the sums do not depend on batching or on the number of processes.
"""

from __future__ import annotations

import torch

from cad_lightning.backbones.backbone import DiffusionBackbone


def accumulate_sensitivity(
    backbone: DiffusionBackbone,
    names: list[str],
    prompts: list[str],
    seeds: list[int],
    buffers: list[torch.Tensor],
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
) -> int:
    """Sample each prompt's run once and add, for each run, Σ over its states of (w · ∂(v·ε)/∂w)² / elements
    to ``buffers`` (fp32, one per parameter in ``names``). Returns the number of states."""
    params = dict(backbone.unet.named_parameters())
    selected = [params[n] for n in names]
    run = backbone.trajectory(prompts, seed=seeds, guidance_scale=guidance_scale,
                              num_inference_steps=num_inference_steps)
    steps, n = run.latents.shape[:2]
    text = backbone.encode(prompts)
    elements = run.latents[0, 0].numel()
    with torch.enable_grad():
        for i, seed in enumerate(seeds):
            # one run at a time: its states form one batch, its probe comes from its own seed
            x_t = run.latents[:, i]
            eps = backbone.predict_noise(x_t, run.timesteps, text[i : i + 1].expand(steps, -1, -1))
            generator = torch.Generator().manual_seed(int(seed))
            probe = (torch.randint(0, 2, eps.shape, generator=generator) * 2 - 1).to(eps)
            grads = torch.autograd.grad((probe * eps.float()).sum(), selected)
            with torch.no_grad():
                for buffer, param, grad in zip(buffers, selected, grads):
                    buffer.add_((param.float() * grad.float()).pow(2), alpha=1.0 / elements)
    return steps * n
