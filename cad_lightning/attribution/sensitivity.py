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

Row moments (cross-attention keys and values)
---------------------------------------------
The sensitivity is per weight: it cannot see that removals in *different rows* of a matrix add up. They do
when the rows' outputs move the prediction the same way, and the removals a concept's scores pick are
correlated across rows (they read the same words). For a weight W that reads the prompt (``K = W E``), the
first-order change of ``v·ε`` at one state when ``U`` is removed from W is ``⟨G_s, U⟩`` with
``G_s = Σ_t g_t e_tᵀ`` (``g_t``: the gradient at the output for token t, ``e_t``: the token's embedding).
So ``P = Σ_s G_s G_sᵀ`` (rows × rows) holds how the rows' changes combine downstream. It is summed here per
state (not per run: 25 times more samples than runs), from the gradients at the K/V outputs.
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
    row_buffers: dict[int, torch.Tensor] | None = None,
) -> int:
    """Sample each prompt's run once and add, for each run, Σ over its states of (w · ∂(v·ε)/∂w)² / elements
    to ``buffers`` (fp32, one per parameter in ``names``). ``row_buffers`` ({index in ``names``: rows × rows}),
    for parameters that read the prompt only (cross-attention keys and values), get Σ over states of
    G_s G_sᵀ / elements (see the module docstring). Returns the number of states."""
    params = dict(backbone.denoiser.named_parameters())
    modules = dict(backbone.denoiser.named_modules())
    selected = [params[n] for n in names]
    row_buffers = row_buffers or {}
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [modules[names[p].removesuffix(".weight")].register_forward_hook(
        lambda module, args, output, p=p: captured.__setitem__(p, (args[0], output))) for p in row_buffers]
    run = backbone.trajectory(prompts, seed=seeds, guidance_scale=guidance_scale,
                              num_inference_steps=num_inference_steps)
    steps, n = run.latents.shape[:2]
    text = backbone.encode(prompts)
    elements = run.latents[0, 0].numel()
    try:
        with torch.enable_grad():
            for i, seed in enumerate(seeds):
                # one run at a time: its states form one batch, its probe comes from its own seed
                captured.clear()
                x_t = run.latents[:, i]
                eps = backbone.predict_noise(x_t, run.timesteps, text[i : i + 1].expand(steps, -1, -1))
                generator = torch.Generator().manual_seed(int(seed))
                probe = (torch.randint(0, 2, eps.shape, generator=generator) * 2 - 1).to(eps)
                rows = list(row_buffers)
                grads = torch.autograd.grad((probe * eps.float()).sum(), selected + [captured[p][1] for p in rows])
                with torch.no_grad():
                    for buffer, param, grad in zip(buffers, selected, grads):
                        buffer.add_((param.float() * grad.float()).pow(2), alpha=1.0 / elements)
                    for p, grad in zip(rows, grads[len(selected):]):
                        # G_s = Σ_t g_t e_tᵀ per state, then Σ_s G_s G_sᵀ
                        per_state = torch.einsum("sti,std->sid", grad.float(), captured[p][0].float())
                        row_buffers[p].add_(torch.einsum("sid,sjd->ij", per_state, per_state), alpha=1.0 / elements)
    finally:
        for hook in hooks:
            hook.remove()
        captured.clear()
    return steps * n
