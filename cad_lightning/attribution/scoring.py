"""First-order attribution in plain torch: CAD's scores α = w·∂J/∂w, apart from the Lightning module.

:func:`accumulate_first_order` adds the scores of a batch of items to running fp32 sums (what CADModule does at
every training step, over its shard of the items); :func:`first_order_scores` is the whole recipe for a script
or a notebook on one process: the named parameters take gradients for the call, every state of every item's
trajectory is scored once, and the mean α per parameter comes back.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cad_lightning.attribution.objectives import ConceptObjective
from cad_lightning.backbones.backbone import DiffusionBackbone

# Attention kernels for the gradient passes: all but cuDNN's, whose backward fails on FLUX.1's shapes on an H200
# (torch 2.11, "mha_graph.execute(...) is_good()", then an illegal memory access); the others give the same
# gradients, and the choice holds only inside the passes.
GRADIENT_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def accumulate_first_order(
    backbone: DiffusionBackbone,
    objective: ConceptObjective,
    names: list[str],
    prompts: list[str],
    seeds: list[int],
    buffers: list[torch.Tensor],
    chunk_size: int = 128,
    base_prompts: list[str] | None = None,
) -> tuple[float, int]:
    """Sample each item's trajectory once, then add Σ over its states of w·∂J/∂w (fp32) to ``buffers``
    (one per parameter in ``names``). ``base_prompts``: each item's base prompt, if not the objective's.
    Returns (Σ J, number of states)."""
    params = dict(backbone.denoiser.named_parameters())
    selected = [params[n] for n in names]
    inputs = objective.inputs(backbone, prompts, seeds, base_prompts)
    n = inputs.x_t.shape[0]
    total_j = 0.0
    with torch.enable_grad(), sdpa_kernel(GRADIENT_ATTENTION):
        for start in range(0, n, chunk_size):
            part = slice(start, start + chunk_size)
            chunk = type(inputs)(**{k: (v[part] if v is not None else None) for k, v in vars(inputs).items()})
            j = objective.value(backbone, chunk)
            grads = torch.autograd.grad(j.sum(), selected)
            with torch.no_grad():
                for buffer, param, grad in zip(buffers, selected, grads):
                    buffer.add_(param.float() * grad.float())
            total_j += float(j.detach().sum())
    return total_j, n


def first_order_scores(
    backbone: DiffusionBackbone,
    objective: ConceptObjective,
    names: list[str],
    prompts: list[str],
    seeds: list[int],
    chunk_size: int = 128,
    base_prompts: list[str] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Mean α = w·∂J/∂w over every state of the items' trajectories, ``{parameter name: fp32 tensor}``, and the
    mean J. Only the parameters in ``names`` take gradients during the call; every parameter's
    ``requires_grad`` is put back afterwards."""
    params = dict(backbone.denoiser.named_parameters())
    before = {name: p.requires_grad for name, p in params.items()}
    try:
        for name, param in params.items():
            param.requires_grad_(name in names)
        buffers = [torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device) for n in names]
        total_j, states = accumulate_first_order(backbone, objective, names, prompts, seeds, buffers, chunk_size,
                                                 base_prompts)
    finally:
        for name, param in params.items():
            param.requires_grad_(before[name])
    return {n: b / states for n, b in zip(names, buffers)}, total_j / states
