"""ESD, concept erasure by fine-tuning against the model's own negatively guided score (Gandikota et al.,
"Erasing Concepts from Diffusion Models", ICCV 2023): a peer of CAD-Erase, for comparison. ESD-x trains the
cross-attention (``xattn``), ESD-u everything but the cross-attention (``noxattn``).

Follows the official code, rohitgandikota/erasing, the paper's script ``train-scripts/train-esd.py`` (last
version at commit b8aeab6), function ``train_esd``; each iteration, for a prompt c of the concept:

1. x_t: sample with the model being edited from fresh noise, prompt c at guidance ``start_guidance`` against the
   empty prompt, with deterministic DDIM (eta 0) over ``ddim_steps`` steps, stopping after a random number k of
   steps (k uniform in 0 … ddim_steps - 1);
2. e_0 = ε*(x_t, "", t) and e_p = ε*(x_t, c, t) from the frozen original model;
3. loss = MSE(ε_θ(x_t, c, t), e_0 - negative_guidance · (e_p - e_0)), one Adam step on the trained parameters.

The parameter rules are that function's, in diffusers names: ``xattn`` every parameter whose name contains
``attn2``; ``noxattn`` every one except those, the time embedding (``time_embed``) and the output layers (the
CompVis ``out.``: ``conv_norm_out`` and ``conv_out``); ``selfattn`` those containing ``attn1``; ``full`` all.
Defaults are the script's: start_guidance 3, negative_guidance 1, DDIM sampling with eta 0, Adam, MSE. Its
ddim_steps 50, 1000 iterations and lr 1e-5 are Stable Diffusion's (the later diffusers script ``esd_sd.py``
trains 200 iterations at lr 5e-5 with negative_guidance 2), so ``ddim_steps`` defaults to the model's own number
of sampler steps and ``steps`` and ``lr`` are always given (see :func:`esd_edit`).

Differences:

* No second copy of the denoiser: the frozen model's e_0 and e_p are computed by putting the original weights
  of the trained parameters back for that forward pass (under ``torch.no_grad``), since only they change; they
  are swapped in with :func:`torch.func.functional_call`, not copied into the parameters, so the parameters'
  autograd versions do not move and a loss built before another call can still backpropagate.
* The timestep: the official script queries the scores at a DDPM step drawn in the bucket
  [1000·k/ddim_steps, 1000·(k+1)/ddim_steps), two to three DDIM steps above the noise level of the sample its
  sampler's ``till_T`` stopped at; here they are taken at the scheduler timestep x_t sits at, ``timesteps[k]``,
  as the diffusers port ``esd_sd.py`` does (which, unlike the paper's script, samples x_t with the frozen
  model). The two e_0/e_p calls are one batched call.
* The random step and the initial noise come from ``generator_seed`` (the official script uses the global RNG),
  so one iteration's loss is reproducible; :func:`esd_edit` cycles through its prompts instead of drawing one at
  random each iteration, and gives iteration i the seed ``seed + i``.
* The erase-from variant (``--erase_from`` of ``esd_sd.py``) is left out; the model's train/eval mode is left as
  it is (the official ``model.train()`` only matters for dropout, which Stable Diffusion and the tiny model
  set to 0).
* The result is the weight change ``{name: delta}`` (float32, CPU), the model is given back unchanged, and any
  :class:`~cad_lightning.backbones.backbone.DiffusionBackbone` works (its ``predict_noise``, scheduler and
  ``denoise_step``), not only Stable Diffusion 1.4.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cad_lightning.errors import UserInputError

TRAIN_METHODS = ("xattn", "noxattn", "selfattn", "full")
OUTPUT_LAYERS = ("conv_norm_out.", "conv_out.")  # the CompVis UNet's ``out.`` (its final norm and conv)


def _trains(name: str, method: str) -> bool:
    if method == "xattn":
        return "attn2" in name
    if method == "noxattn":
        return not (name.startswith(OUTPUT_LAYERS) or "attn2" in name or "time_embed" in name)
    if method == "selfattn":
        return "attn1" in name
    return True  # full


def esd_parameter_names(denoiser: torch.nn.Module, train_method: str = "xattn") -> list[str]:
    """The names of the denoiser's parameters ESD trains under ``train_method`` (the official ``train_esd``
    rules: ``xattn`` is ESD-x, ``noxattn`` ESD-u, also ``selfattn`` and ``full``), in the model's order."""
    if train_method not in TRAIN_METHODS:
        raise UserInputError(f"ESD train_method must be one of {', '.join(TRAIN_METHODS)} (xattn is ESD-x, "
                             f"noxattn ESD-u), got {train_method!r}.")
    names = [name for name, _ in denoiser.named_parameters() if _trains(name, train_method)]
    if not names:
        raise UserInputError(f"ESD train_method {train_method!r} trains no parameter of this model (xattn needs "
                             "cross-attention layers named attn2, selfattn self-attention layers named attn1).")
    return names


class _Scorer(torch.nn.Module):
    """The backbone's ``predict_noise`` as a module call, so :func:`torch.func.functional_call` can run it with
    some of the denoiser's weights swapped for other tensors."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x_t: torch.Tensor, t, text: torch.Tensor) -> torch.Tensor:
        return self.backbone.predict_noise(x_t, t, text)


@torch.no_grad()
def _original_noise(backbone, weights: Mapping[str, torch.Tensor], x_t: torch.Tensor, t, text: torch.Tensor):
    """ε(x_t, text, t) of the model with ``weights`` in place of its parameters of those names. The tensors are
    swapped in for the call, not copied into the parameters, so a loss built earlier can still backpropagate."""
    swapped = {f"backbone.denoiser.{name}": value for name, value in weights.items()}
    return torch.func.functional_call(_Scorer(backbone), swapped, (x_t, t, text), strict=False)


def _check_steps(ddim_steps) -> int:
    if isinstance(ddim_steps, bool) or not isinstance(ddim_steps, int) or ddim_steps < 1:
        raise UserInputError(f"ESD ddim_steps must be a whole number of sampler steps, 1 or more, got {ddim_steps!r}.")
    return ddim_steps


def _prompt_list(prompt: str | Sequence[str], what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise UserInputError(f"ESD needs at least one {what} naming the concept to erase.")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise UserInputError(f"ESD {what}s name the concept to erase and cannot be empty, got {p!r}.")
    return prompts


@torch.no_grad()
def esd_state(backbone, prompt: str | Sequence[str], generator_seed: int, start_guidance: float = 3.0,
              ddim_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ESD's training input (x_t, t, k): the current model's guided DDIM sample (eta 0) of the prompts from the
    noise of seeds ``generator_seed + i`` after k steps (k drawn from ``generator_seed``, 0 … ddim_steps - 1),
    and the timestep it sits at, ``timesteps[k]`` — the state ``backbone.trajectory(..., eta=0)`` keeps at k."""
    prompts = _prompt_list(prompt, "prompt")
    steps = _check_steps(backbone.num_inference_steps if ddim_steps is None else ddim_steps)
    k = int(torch.randint(steps, (1,), generator=torch.Generator().manual_seed(generator_seed)))
    scheduler = backbone.new_scheduler(steps)
    cond, uncond = backbone.encode(prompts), backbone.encode([""] * len(prompts))
    x = backbone.draw_noise(backbone.generators(len(prompts), generator_seed))
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    for t in scheduler.timesteps[:k]:
        eps = backbone.guided_noise(scale_input(x, t), t, cond, uncond, start_guidance)
        x = backbone.denoise_step(scheduler, eps, t, x, eta=0.0)
    return x, scheduler.timesteps[k], k


def _check_names(backbone, names: Sequence[str], original: Mapping[str, torch.Tensor]) -> dict:
    params = dict(backbone.denoiser.named_parameters())
    if not names:
        raise UserInputError("ESD needs at least one parameter to train (see esd_parameter_names).")
    for name in names:
        if name not in params:
            raise UserInputError(f"ESD: the model has no parameter named {name!r}.")
        if name not in original or tuple(original[name].shape) != tuple(params[name].shape):
            raise UserInputError(f"ESD: the original weights have no tensor of shape {tuple(params[name].shape)} "
                                 f"for {name!r}.")
    return params


def esd_loss(backbone, names: Sequence[str], original: Mapping[str, torch.Tensor], prompt: str | Sequence[str],
             generator_seed: int, negative_guidance: float = 1.0, start_guidance: float = 3.0,
             ddim_steps: int | None = None, base_prompt: str = "") -> torch.Tensor:
    """One ESD iteration's loss, MSE(ε_θ(x_t, c, t), e_0 - negative_guidance · (e_p - e_0)), a scalar whose
    gradient reaches the parameters ``names`` (their ``requires_grad`` is switched on).

    x_t and t are :func:`esd_state`'s (the current model's sample of the prompts, deterministic given
    ``generator_seed``); e_0 = ε(x_t, base_prompt, t) and e_p = ε(x_t, c, t) are the original model's, computed
    with ``original`` (``{name: weight}`` for at least ``names``) swapped in for those parameters for the call;
    the parameters themselves are not written, so losses of several calls can each be backpropagated.
    ``ddim_steps`` defaults to the model's number of sampler steps.
    """
    params = _check_names(backbone, names, original)
    prompts = _prompt_list(prompt, "prompt")
    x_t, t, _ = esd_state(backbone, prompts, generator_seed, start_guidance, ddim_steps)
    with torch.no_grad():
        cond, base = backbone.encode(prompts), backbone.encode([base_prompt] * len(prompts))
        frozen = {name: original[name].to(params[name].device, params[name].dtype) for name in names}
        e_0, e_p = _original_noise(backbone, frozen, torch.cat([x_t, x_t]), t, torch.cat([base, cond])).chunk(2)
        target = e_0 - negative_guidance * (e_p - e_0)
    for name in names:
        params[name].requires_grad_(True)
    e_n = backbone.predict_noise(x_t, t, cond)
    return F.mse_loss(e_n.float(), target.float())


@torch.no_grad()
def apply_delta(denoiser: torch.nn.Module, delta: Mapping[str, torch.Tensor], sign: float = 1) -> None:
    """Add ``sign · delta`` (``{name: weight change}``, as :func:`esd_edit` returns) to the denoiser's weights."""
    params = dict(denoiser.named_parameters())
    missing = [name for name in delta if name not in params]
    if missing:
        raise UserInputError(f"The weight change names a parameter this model does not have: {missing[0]!r}.")
    for name, change in delta.items():
        params[name].add_(change.to(params[name].device, params[name].dtype), alpha=sign)


def esd_edit(backbone, prompts: Sequence[str], steps: int, lr: float, train_method: str = "xattn",
             negative_guidance: float = 1.0, start_guidance: float = 3.0, ddim_steps: int | None = None,
             seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """Fine-tune the model to erase the concept of ``prompts`` with ESD and return the weight change
    ``{name: new - original}`` (float32, CPU) of the trained parameters (:func:`esd_parameter_names`).

    ``steps`` Adam iterations at learning rate ``lr``; iteration i uses prompt ``prompts[i % len(prompts)]`` and
    seed ``seed + i`` (:func:`esd_loss`). The model's weights, ``requires_grad`` flags and gradients are as they
    were when the call returns (apply the change with :func:`apply_delta`).

    The official runs on Stable Diffusion take 1000 iterations at lr 1e-5 (``train_esd``) or 200 at 5e-5
    (``esd_sd.py``). Such a step barely moves the shipped tiny model, whose weights are few, large and trained
    briefly: there 200 steps move 'circle' towards its floor from lr 1e-4 (the peer job's default, ESDSettings),
    so scale the learning rate with the model.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserInputError(f"ESD steps must be a whole number of iterations, 1 or more, got {steps!r}.")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise UserInputError(f"ESD lr must be a positive learning rate, got {lr!r}.")
    prompts = _prompt_list(prompts, "prompt")
    backbone.check_prompts(prompts)  # an unknown word is refused before any training, not at its iteration
    _check_steps(backbone.num_inference_steps if ddim_steps is None else ddim_steps)
    names = esd_parameter_names(backbone.denoiser, train_method)
    params = dict(backbone.denoiser.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    grads = {name: p.grad for name, p in params.items()}
    original = {name: params[name].detach().clone() for name in names}
    trained = [params[name] for name in names]
    try:
        for name, p in params.items():  # gradients for the trained parameters only
            p.requires_grad_(name in original)
            p.grad = None
        optimizer = torch.optim.Adam(trained, lr=lr)
        bar = tqdm(range(steps), desc=f"ESD ({train_method})", disable=not progress)
        for i in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = esd_loss(backbone, names, original, prompts[i % len(prompts)], seed + i, negative_guidance,
                            start_guidance, ddim_steps)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4g}")
        with torch.no_grad():
            return {name: (params[name].detach().float() - original[name].float()).cpu() for name in names}
    finally:
        with torch.no_grad():
            for name, weight in original.items():
                params[name].copy_(weight)
        for name, p in params.items():
            p.requires_grad_(flags[name])
            p.grad = grads[name]
