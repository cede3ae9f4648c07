"""ConceptPrune, training-free concept erasure by pruning "skilled neurons" of the feed-forward layers (Chavhan
et al., "ConceptPrune: Concept Editing in Diffusion Models via Skilled Neuron Pruning", ICLR 2025): a peer of
CAD-Erase, for comparison.

Follows the official code, ruchikachavhan/concept-prune (commit 72927d9):

- ``neuron_receivers/wanda_receiver.py``, ``Wanda.hook_fn``, with ``utils/base_utils.py``,
  ``ColumnNormCalculator`` / ``TimeLayerColumnNorm``: at every denoising step (one UNet call, both
  classifier-free-guidance branches, as the Stable Diffusion pipeline batches them) the input of each FF output
  linear ``ff.net.2`` (the GEGLU output) is flattened to rows (batch × tokens, inner_dim), every row is scaled to
  unit L2 norm, and the column norms ‖X_j‖₂ are accumulated over all rows of all prompts, per step and layer.
- ``wanda/wanda.py``, ``main``: the Wanda score of each weight is ``|W_ij| · ‖X_j‖`` (for the concept prompts
  and for the base prompts alike); at each step a weight is *skilled* when it is among the top
  ``int(skill_ratio × in_features)`` concept scores of its row (output neuron) **and** its concept score
  exceeds its base score. Identical concept and base prompts therefore select nothing.
- ``wanda/save_union_over_time.py``, ``main``: the weights skilled at more than ``select_ratio × τ`` of the
  first τ denoising steps (the noisiest) are pruned, i.e. zeroed (``weight *= 1 - mask``).

Defaults: the official object-erasure settings (``scripts/wanda.sh``, README Table 7): ``skill_ratio`` 0.02
(here ``top_k``), τ = 10 of the pipeline's 50 steps (here ``first_steps``, by default the same fifth of the
run's steps: 5 of the shipped model's 25) and ``select_ratio`` 0.0, a plain union over those steps (here
``timestep_fraction``). The official base prompts name the context without the concept ("a room" for
"a parachute in a room", "a photo of a cat" for "a cat in the style of Van Gogh"); pair each concept prompt with
such a base prompt (in the shapes world, "a red shape" for "a red circle").

Differences: any :class:`~cad_lightning.backbones.backbone.DiffusionBackbone` and its own sampler (scheduler, eta,
guidance scale, number of steps; the official code runs the Stable Diffusion pipeline in fp16 with its default
sampler); layers are keyed by parameter name instead of the order of hook calls (which the official code aligns
with the sorted layer names); prompt i of both lists uses seed ``seeds + i`` (or ``seeds[i]``) where the
official code reuses seed 0 for every prompt; prompts are batched (the sums of squares do not depend on it);
the norms are accumulated in float64; sampling stops after the τ steps the rule reads (the official code samples
all 50 and ignores the rest); and the result is a mask dict (True = keep) for
:func:`~cad_lightning.editing.artifacts.apply_masks` instead of a pruned checkpoint.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Sequence

import torch
from tqdm.auto import tqdm

from cad_lightning.errors import UserInputError

# the FF output linear of a diffusers FeedForward: ``...ff.net.2`` (``ff.net.0`` is the GEGLU/GELU, whose
# ``proj`` the official code excludes with ``'proj' not in name``)
FF_OUTPUT = re.compile(r"(^|\.)ff\.net\.\d+$")
DEFAULT_TOP_K = 0.02  # skill_ratio of the official object erasure
OFFICIAL_TAU, OFFICIAL_STEPS = 10, 50  # the union over the first 10 of 50 steps


def ff_output_names(denoiser: torch.nn.Module) -> list[str]:
    """The weight names ConceptPrune prunes: those of the FF output linears (``ff.net.2``, whose input is the
    GEGLU output) of the denoiser's transformer blocks, in module order."""
    names = [f"{name}.weight" for name, module in denoiser.named_modules()
             if isinstance(module, torch.nn.Linear) and FF_OUTPUT.search(name) and "proj" not in name]
    if not names:
        raise UserInputError(f"ConceptPrune prunes the feed-forward output linears (ff.net.2) of transformer "
                             f"blocks, and this {type(denoiser).__name__} has none.")
    return names


def _linears(denoiser: torch.nn.Module, names: Sequence[str] | None) -> dict[str, torch.nn.Linear]:
    """{weight name: its Linear module} for ``names`` (default: :func:`ff_output_names`)."""
    names = ff_output_names(denoiser) if names is None else list(names)
    if not names:
        raise UserInputError("names is empty; give the weight names to score, e.g. ff_output_names(denoiser).")
    modules = dict(denoiser.named_modules())
    out = {}
    for name in names:
        module = modules.get(name[: -len(".weight")]) if isinstance(name, str) and name.endswith(".weight") else None
        if not isinstance(module, torch.nn.Linear):
            raise UserInputError(f"{name!r} is not the weight of a linear layer of the {type(denoiser).__name__}; "
                                 "Wanda scores a linear layer's weight, e.g. one of ff_output_names(denoiser).")
        out[name] = module
    return out


def _check_steps(backbone, num_inference_steps, first_steps) -> tuple[int, int]:
    steps = num_inference_steps or backbone.num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserInputError(f"num_inference_steps must be a positive whole number, got {steps!r}.")
    if first_steps is None:
        return steps, steps
    if isinstance(first_steps, bool) or not isinstance(first_steps, int) or not 1 <= first_steps <= steps:
        raise UserInputError(f"first_steps must be a whole number from 1 to the {steps} sampling steps, "
                             f"got {first_steps!r}.")
    return steps, first_steps


@torch.no_grad()
def activation_norms(
    backbone,
    prompts: Sequence[str],
    seeds: int | Sequence[int] = 0,
    names: Sequence[str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    first_steps: int | None = None,
    normalize_rows: bool = True,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[int, dict[str, torch.Tensor]]:
    """``{step index: {weight name: ‖X‖ (in_features,) float32, CPU}}``: the column L2 norms of each linear's
    input over the prompts' sampling runs, per denoising step (0 = the first, noisiest).

    X stacks the rows (sample × token) of every UNet call at that step, both guidance branches (the
    unconditional one too, as in the official pipeline run; with ``guidance_scale`` 1 there is only the
    conditional one), each row scaled to unit L2 norm first as the official code does (``normalize_rows``;
    False gives plain Wanda). Only the first ``first_steps`` steps are run (default: all).
    """
    prompts = list(prompts)
    if not prompts:
        raise UserInputError("ConceptPrune needs at least one prompt to collect activations from.")
    linears = _linears(backbone.denoiser, names)
    steps, first = _check_steps(backbone, num_inference_steps, first_steps)
    scale = backbone.guidance_scale if guidance_scale is None else float(guidance_scale)
    generators_all = backbone.generators(len(prompts), seeds)  # refuses a seed list of the wrong length
    backbone.check_prompts(prompts)
    batch_size = batch_size or len(prompts)
    sums = {s: {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
            for s in range(first)}
    state = {"step": 0}

    def hook(name):
        def collect(module, inputs, output):
            rows = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            if normalize_rows:
                rows = torch.nn.functional.normalize(rows, p=2, dim=1)
            sums[state["step"]][name] += rows.square().sum(dim=0).cpu()
        return collect

    handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
    batches = range(0, len(prompts), batch_size)
    bar = tqdm(total=len(batches) * first, desc="ConceptPrune activations", unit="step", disable=not progress)
    try:
        for start in batches:
            chunk = prompts[start : start + batch_size]
            generators = generators_all[start : start + batch_size]
            scheduler = backbone.new_scheduler(steps)
            cond, uncond = backbone.encode(chunk), backbone.encode([""] * len(chunk))
            x = backbone.draw_noise(generators) * getattr(scheduler, "init_noise_sigma", 1.0)
            scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
            for i, t in enumerate(scheduler.timesteps[:first]):
                state["step"] = i
                eps = backbone.guided_noise(scale_input(x, t), t, cond, uncond, scale)
                bar.update(1)
                if i + 1 < first:
                    x = backbone.denoise_step(scheduler, eps, t, x, backbone.eta, generators)
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    return {s: {name: total.sqrt().float() for name, total in per.items()} for s, per in sums.items()}


def _abs_weights(linears: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().abs().float().cpu() for name, m in linears.items()}


@torch.no_grad()
def wanda_scores(
    backbone,
    prompts: Sequence[str],
    seeds: int | Sequence[int] = 0,
    names: Sequence[str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    first_steps: int | None = None,
    normalize_rows: bool = True,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[int, dict[str, torch.Tensor]]:
    """``{step index: {weight name: |W| · ‖X‖}}`` (float32 CPU tensors of the weight's shape): the Wanda score
    of every weight of ``names`` (default: :func:`ff_output_names`) at each denoising step of the prompts'
    sampling runs, ‖X_j‖ being the norm of input feature j from :func:`activation_norms`."""
    linears = _linears(backbone.denoiser, names)
    norms = activation_norms(backbone, prompts, seeds, list(linears), num_inference_steps, guidance_scale,
                             first_steps, normalize_rows, batch_size, progress)
    weights = _abs_weights(linears)
    return {s: {name: weights[name] * norm[None, :] for name, norm in per.items()} for s, per in norms.items()}


def skilled_weights(concept_score: torch.Tensor, base_score: torch.Tensor, top_k: float) -> torch.Tensor:
    """Bool (out, in): the skilled weights of one layer at one step, ConceptPrune's rule: among the top
    ``int(top_k × in)`` concept scores of their row, and scoring higher under the concept than under the base."""
    k = int(top_k * concept_score.shape[1])
    top = torch.zeros_like(concept_score, dtype=torch.bool)
    if k > 0:
        top.scatter_(1, concept_score.topk(k, dim=1).indices, True)
    return top & (concept_score > base_score)


def _check_fraction(field: str, value, low_open: bool, high_open: bool, meaning: str) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise UserInputError(f"{field} must be a number in {interval} ({meaning}), got {value!r}.")
    return float(value)


@torch.no_grad()
def conceptprune_masks(
    backbone,
    concept_prompts: Sequence[str],
    base_prompts: Sequence[str],
    seeds: int | Sequence[int] = 0,
    top_k: float = DEFAULT_TOP_K,
    first_steps: int | None = None,
    timestep_fraction: float = 0.0,
    names: Sequence[str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    normalize_rows: bool = True,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """ConceptPrune's pruning masks ``{weight name: bool (out, in)}`` (True = keep, False = prune), the model
    left unchanged (apply them with :func:`~cad_lightning.editing.artifacts.apply_masks`).

    Concept prompt i and base prompt i are sampled from the same seed (``seeds + i`` or ``seeds[i]``). A weight
    is pruned when it is skilled (:func:`skilled_weights`, top ``top_k`` of its row) at more than
    ``timestep_fraction × first_steps`` of the first ``first_steps`` denoising steps (default: the official 10
    of 50, scaled to the run's steps).
    """
    concept_prompts, base_prompts = list(concept_prompts), list(base_prompts)
    if not concept_prompts:
        raise UserInputError("ConceptPrune needs at least one concept prompt.")
    if len(base_prompts) != len(concept_prompts):
        raise UserInputError(f"ConceptPrune pairs each concept prompt with a base prompt, got "
                             f"{len(concept_prompts)} concept prompts and {len(base_prompts)} base prompts.")
    top_k = _check_fraction("top_k", top_k, True, False, "the fraction of each row's weights a step may select")
    timestep_fraction = _check_fraction("timestep_fraction", timestep_fraction, False, True,
                                        "a weight is pruned when skilled at more than this share of the steps")
    linears = _linears(backbone.denoiser, names)
    widths = sorted({m.in_features for m in linears.values()})
    if all(int(top_k * w) == 0 for w in widths):
        raise UserInputError(f"top_k={top_k} selects int(top_k × inputs) = 0 weights per row of every layer "
                             f"(inputs: {', '.join(map(str, widths))}); raise it to at least 1/{widths[-1]}.")
    steps, _ = _check_steps(backbone, num_inference_steps, None)
    if first_steps is None:
        first_steps = max(1, round(steps * OFFICIAL_TAU / OFFICIAL_STEPS))
    _check_steps(backbone, steps, first_steps)
    backbone.check_prompts(concept_prompts + base_prompts)
    options = dict(names=list(linears), num_inference_steps=steps, guidance_scale=guidance_scale,
                   first_steps=first_steps, normalize_rows=normalize_rows, batch_size=batch_size, progress=progress)
    concept = activation_norms(backbone, concept_prompts, seeds, **options)
    base = activation_norms(backbone, base_prompts, seeds, **options)
    weights = _abs_weights(linears)
    masks = {}
    for name in tqdm(linears, desc="ConceptPrune skilled neurons", unit="layer", disable=not progress):
        counts = torch.zeros(weights[name].shape, dtype=torch.int32)
        for s in range(first_steps):
            counts += skilled_weights(weights[name] * concept[s][name][None, :],
                                      weights[name] * base[s][name][None, :], top_k)
        masks[name] = ~(counts > timestep_fraction * first_steps)
    return masks
