"""ESD, the fine-tuning erasure ported as a peer (cad_lightning/editing/esd.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import SHIPPED_MODEL

from cad_lightning import load_backbone, load_concept_classifier
from cad_lightning.editing.esd import apply_delta, esd_edit, esd_loss, esd_parameter_names, esd_state
from cad_lightning.errors import UserInputError

COLOURS = ["red", "green", "blue", "yellow"]
ERASE = [f"a {c} circle" for c in COLOURS] + ["a circle"]


def _originals(backbone, names):
    params = dict(backbone.denoiser.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def test_the_trained_parameters_follow_the_official_rules():
    denoiser = load_backbone(SHIPPED_MODEL).denoiser
    every = [n for n, _ in denoiser.named_parameters()]
    xattn = esd_parameter_names(denoiser, "xattn")
    assert xattn == [n for n in every if "attn2" in n]
    assert {n.split("attn2.")[1] for n in xattn} == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight",
                                                       "to_out.0.bias"}
    noxattn = set(esd_parameter_names(denoiser, "noxattn"))
    assert noxattn.isdisjoint(xattn) and any("attn1" in n for n in noxattn) and any("resnets" in n for n in noxattn)
    left_out = set(every) - noxattn - set(xattn)  # the time embedding and the output layers (CompVis ``out.``)
    assert left_out == {n for n in every if n.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))}
    assert esd_parameter_names(denoiser, "full") == every


def test_esd_loss_is_the_esd_objective_against_the_frozen_original():
    backbone = load_backbone(SHIPPED_MODEL)
    names = esd_parameter_names(backbone.denoiser)
    params = dict(backbone.denoiser.named_parameters())
    original = _originals(backbone, names)
    prompt, seed = "a red circle", 7

    # x_t is the model's own guided DDIM state (eta 0) after k of the sampler's steps, at timesteps[k]
    x_t, t, k = esd_state(backbone, prompt, seed, start_guidance=3.0)
    run = backbone.trajectory([prompt], seed=seed, guidance_scale=3.0, eta=0.0)
    assert torch.allclose(x_t, run.latents[k], atol=1e-5) and int(t) == int(run.timesteps[k])
    assert len({esd_state(backbone, prompt, s)[2] for s in range(12)}) > 3  # the step is random over seeds

    # on the unedited model the loss is (1 + η)² MSE(e_p, e_0): the target's η (e_p - e_0) is scaled exactly
    losses = [esd_loss(backbone, names, original, prompt, seed, negative_guidance=g).item() for g in (0, 1, 2)]
    assert losses[0] > 0
    assert losses[1] == pytest.approx(4 * losses[0], rel=1e-4) and losses[2] == pytest.approx(9 * losses[0], rel=1e-4)

    # edit the model; the frozen scores must be the original's: a deep copy with the old weights as reference
    frozen = copy.deepcopy(backbone)
    torch.manual_seed(0)
    with torch.no_grad():
        for name in names:
            params[name].add_(0.05 * torch.randn_like(params[name]))
    edited = {n: p.detach().clone() for n, p in params.items()}
    loss = esd_loss(backbone, names, original, prompt, seed, negative_guidance=2.0)
    with torch.no_grad():
        x_t, t, _ = esd_state(backbone, prompt, seed)  # sampled with the edited model
        cond, empty = backbone.encode([prompt]), backbone.encode([""])
        e_0, e_p = frozen.predict_noise(x_t, t, empty), frozen.predict_noise(x_t, t, cond)
        expected = F.mse_loss(backbone.predict_noise(x_t, t, cond), e_0 - 2.0 * (e_p - e_0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert all(torch.equal(p, edited[n]) for n, p in params.items())  # the edited weights are untouched
    assert esd_loss(backbone, names, original, prompt, seed, 2.0).item() == loss.item()  # deterministic
    assert esd_loss(backbone, names, original, prompt, seed + 1, 2.0).item() != loss.item()

    # the gradient reaches every trained parameter and nothing else, even after later calls (nothing was written)
    loss.backward()
    for name, p in params.items():
        if name in original:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_esd_erases_the_circle_and_keeps_the_square():
    backbone, detector = load_backbone(SHIPPED_MODEL), load_concept_classifier(SHIPPED_MODEL)
    targets = [f"a {c} circle" for c in COLOURS] * 4
    kept = [f"a {c} square" for c in COLOURS] * 4

    def accuracy(prompts, word):
        return sum(s == word for s in detector(backbone.generate(prompts, seed=200))["shape"]) / len(prompts)

    assert accuracy(targets, "circle") >= 0.9 and accuracy(kept, "square") >= 0.9
    params = dict(backbone.denoiser.named_parameters())
    unedited = {n: p.detach().clone() for n, p in params.items()}
    delta = esd_edit(backbone, ERASE, steps=200, lr=1e-3, progress=False)  # measured: circle 1.0 -> 0.0, square 0.94
    assert set(delta) == set(esd_parameter_names(backbone.denoiser, "xattn"))
    assert all(d.dtype == torch.float32 and d.device.type == "cpu" for d in delta.values())
    assert all(torch.equal(p, unedited[n]) for n, p in params.items())  # esd_edit gives the model back unchanged
    apply_delta(backbone.denoiser, delta)
    assert accuracy(targets, "circle") <= 0.25
    assert accuracy(kept, "square") >= 0.75


def test_esd_edit_gives_the_model_back_as_it_was():
    backbone = load_backbone(SHIPPED_MODEL)
    params = dict(backbone.denoiser.named_parameters())
    names = esd_parameter_names(backbone.denoiser)
    params[names[0]].requires_grad_(True)  # a flag that differs from the rest must survive too
    params["conv_in.weight"].requires_grad_(True)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in params.items()}
    delta = esd_edit(backbone, ["a blue circle"], steps=3, lr=1e-3, ddim_steps=5, progress=False)
    for name, p in params.items():
        assert torch.equal(p, before[name][0]) and p.requires_grad == before[name][1] and p.grad is None, name
    assert all(d.abs().max() > 0 for d in delta.values())
    apply_delta(backbone.denoiser, delta)
    assert not torch.equal(params[names[0]], before[names[0]][0])
    apply_delta(backbone.denoiser, delta, sign=-1)
    assert all(torch.allclose(p, before[n][0], atol=1e-6) for n, p in params.items())


def test_bad_esd_inputs_are_refused():
    backbone = load_backbone(SHIPPED_MODEL)
    names = esd_parameter_names(backbone.denoiser)
    original = _originals(backbone, names)
    with pytest.raises(UserInputError, match="train_method must be one of"):
        esd_parameter_names(backbone.denoiser, "esd-z")
    with pytest.raises(UserInputError, match="trains no parameter"):
        esd_parameter_names(torch.nn.Sequential(torch.nn.Linear(2, 2)), "xattn")
    with pytest.raises(UserInputError, match="at least one prompt"):
        esd_edit(backbone, [], steps=1, lr=1e-3)
    with pytest.raises(UserInputError, match="cannot be empty"):
        esd_edit(backbone, ["a circle", " "], steps=1, lr=1e-3)
    with pytest.raises(UserInputError, match="vocabulary"):
        esd_edit(backbone, ["a circle", "a purple circle"], steps=1, lr=1e-3)
    with pytest.raises(UserInputError, match="steps must be"):
        esd_edit(backbone, ["a circle"], steps=0, lr=1e-3)
    with pytest.raises(UserInputError, match="lr must be"):
        esd_edit(backbone, ["a circle"], steps=1, lr=0)
    with pytest.raises(UserInputError, match="ddim_steps"):
        esd_edit(backbone, ["a circle"], steps=1, lr=1e-3, ddim_steps=0)
    with pytest.raises(UserInputError, match="no parameter named"):
        esd_loss(backbone, ["nowhere.weight"], original, "a circle", 0)
    with pytest.raises(UserInputError, match="original weights"):
        esd_loss(backbone, names, {}, "a circle", 0)
    with pytest.raises(UserInputError, match="not have"):
        apply_delta(backbone.denoiser, {"nowhere.weight": torch.zeros(1)})
