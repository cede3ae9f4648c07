"""SDXL, SD3, FLUX and PixArt on tiny random folders written offline (tests/family_folders.py): the folder's
family is read from model_index.json; the backbone samples what the family's own diffusers pipeline samples;
attribution, erase edits and the regression estimator run through ``cad fit``; an edited denoiser re-opens in
the plain pipeline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli
from diffusers import (
    DDIMScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from family_folders import FAMILIES, IMAGE_SIZE, LATENT_SIZE, MAX_SEQUENCE_LENGTH, write_tiny_family_folder
from test_stable_diffusion_folder import _go_offline

from cad_lightning.attribution.components import ComponentSpace
from cad_lightning.attribution.objectives import AmplifyObjective
from cad_lightning.backbones.backbone import load_backbone, model_family
from cad_lightning.backbones.families import (
    FluxBackbone,
    PixArtBackbone,
    SD3Backbone,
    SDXLBackbone,
    pack_conditioning,
    unpack_conditioning,
)
from cad_lightning.editing import apply_edit
from cad_lightning.errors import UserInputError

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BACKBONES = {"sdxl": SDXLBackbone, "sd3": SD3Backbone, "flux": FluxBackbone, "pixart": PixArtBackbone}
PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline,
             "pixart": PixArtSigmaPipeline}
DENOISERS = {"sdxl": ("unet", UNet2DConditionModel), "sd3": ("transformer", SD3Transformer2DModel),
             "flux": ("transformer", FluxTransformer2DModel), "pixart": ("transformer", PixArtTransformer2DModel)}
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: write_tiny_family_folder(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_is_read_from_the_folder(folders, family, monkeypatch):
    _go_offline(monkeypatch)
    assert model_family(folders[family]) == family
    model = load_backbone(folders[family])
    assert type(model) is BACKBONES[family]
    assert model.image_size == IMAGE_SIZE and model.latent_shape[1:] == (LATENT_SIZE, LATENT_SIZE)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert ComponentSpace(["ff"]).names(model.denoiser)


def test_conditioning_packs_and_unpacks():
    tokens, pooled, ids = torch.randn(3, 5, 4), torch.randn(3, 6), torch.randn(3, 2)
    packed = pack_conditioning(tokens, pooled, ids)
    assert packed.shape == (3, 5 + 2, 4)  # 8 values in 2 rows of 4
    back = unpack_conditioning(packed, 5, (6, 2))
    for a, b in zip(back, (tokens, pooled, ids)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_what_the_diffusers_pipeline_samples(folders, family, monkeypatch):
    """The folder opens in the family's plain diffusers pipeline, which samples the backbone's image from the
    same seed (SDXL and PixArt with DDIM, the sampler the backbone runs for them)."""
    _go_offline(monkeypatch)
    model = load_backbone(folders[family])
    pipe = PIPELINES[family].from_pretrained(folders[family], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {}
    if family in ("sdxl", "pixart"):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if family != "sdxl":
        kwargs["max_sequence_length"] = MAX_SEQUENCE_LENGTH
    if family == "pixart":
        kwargs.update(clean_caption=False, use_resolution_binning=False)
    if family != "flux":  # FLUX's pipeline argument is the embedded guidance, left at its default (3.5) on both sides
        kwargs["guidance_scale"] = model.guidance_scale
    out = pipe(PROMPT, num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="pt",
               generator=torch.Generator().manual_seed(0), **kwargs).images
    ours = model.generate([PROMPT], seed=[0], num_inference_steps=2)
    assert ours.shape == out.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(ours, out.float(), atol=1e-4, rtol=0)
    # a prompt's image does not depend on what it is batched with
    both = model.generate([PROMPT, "a red dog"], seed=[0, 1], num_inference_steps=2)
    torch.testing.assert_close(both[:1], ours, atol=1e-5, rtol=0)


def test_the_flow_matching_amplify_objective_is_the_flow_matching_loss(folders):
    """x_t lies on the straight path (1 − σ) x_0 + σ ε, σ = t / 1000, and the target is the velocity ε − x_0."""
    model = load_backbone(folders["sd3"])
    inputs = AmplifyObjective(num_inference_steps=3).inputs(model, [PROMPT], [0])
    sigma = (inputs.t.float() / 1000).reshape(-1, 1, 1, 1)
    x0 = inputs.noise - inputs.target
    torch.testing.assert_close(inputs.x_t, (1 - sigma) * x0 + sigma * inputs.noise, atol=1e-5, rtol=0)
    assert torch.allclose(x0, x0[:1].expand_as(x0), atol=1e-5)  # every state comes from the one final sample
    j = AmplifyObjective(num_inference_steps=3).value(model, inputs)
    v = model.predict_noise(inputs.x_t, inputs.t, inputs.text)
    torch.testing.assert_close(j, -(v - inputs.target).pow(2).flatten(1).mean(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_attribute_erase_and_reopen_in_the_plain_pipeline(folders, family, tmp_path):
    """``cad fit`` with the family's shipped config: scores, an edit that zeroes exactly its weights, and the
    edited denoiser written as a diffusers folder that the plain pipeline runs."""
    config = CONFIGS / family / "erase_object.yaml"
    code = run_cli(["fit", "--config", str(config), "--model.model_path", str(folders[family]), "--model.dtype", "fp32",
                    "--model.num_inference_steps", "3", "--model.gradient_checkpointing", "false",
                    "--data.concept", "cat", "--data.samples", "2", "--data.batch_size", "2",
                    "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path),
                    "--model.editing.ratios", "[0.05]", "--model.editing.save_unet", "true"])
    assert code == 0
    run = sorted((tmp_path / "lightning_logs").glob("version_*"))[-1]
    report = json.loads((run / "report.json").read_text())
    edit = report["edits"][0]
    assert report["concept"] == "cat" and edit["ablated"] > 0

    part, cls = DENOISERS[family]
    edited = cls.from_pretrained(run / edit["unet"], local_files_only=True)
    fresh = cls.from_pretrained(folders[family] / part, local_files_only=True)
    assert apply_edit(fresh, run / edit["masks"]) == edit["ablated"]
    for (name, a), (_, b) in zip(edited.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name  # the written folder is the original with exactly the edit's weights zeroed

    pipe = PIPELINES[family].from_pretrained(folders[family], local_files_only=True, **{part: edited})
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"max_sequence_length": MAX_SEQUENCE_LENGTH} if family != "sdxl" else {}
    if family == "pixart":
        kwargs.update(clean_caption=False, use_resolution_binning=False)
    image = pipe(PROMPT, num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="pt",
                 generator=torch.Generator().manual_seed(0), **kwargs).images
    assert image.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(image).all()


def test_amplify_and_the_regression_estimator_on_a_transformer(folders, tmp_path):
    """The other two jobs on FLUX (no classifier-free guidance): amplify scores, and the regression estimator
    with the erase objective under each mask as its score."""
    code = run_cli(["fit", "--config", str(CONFIGS / "sd" / "amplify_object.yaml"), "--model.model_path",
                    str(folders["flux"]), "--model.dtype", "fp32", "--model.num_inference_steps", "3",
                    "--model.guidance_scale", "1.0", "--data.concept", "cat", "--data.samples", "2",
                    "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--trainer.default_root_dir",
                    str(tmp_path / "amplify"), "--model.editing.ratios", "[0.05]"])
    assert code == 0
    report = json.loads(next((tmp_path / "amplify" / "lightning_logs").glob("version_*/report.json")).read_text())
    assert report["edits"][0]["ablated"] > 0

    code = run_cli(["fit", "--config", str(CONFIGS / "attribute_regression.yaml"), "--model.model_path",
                    str(folders["flux"]), "--model.score", "objective", "--model.num_inference_steps", "2",
                    "--model.guidance_scale", "1.0", "--data.concept", "cat", "--data.prompt_templates",
                    '["a photo of a {concept}"]', "--data.base_word", "null", "--data.masks", "12", "--data.heldout_masks", "4",
                    "--data.samples", "1", "--data.batch_size", "4", "--trainer.accelerator", "cpu",
                    "--trainer.default_root_dir", str(tmp_path / "regression"),
                    "--trainer.callbacks.init_args.ratios", "null"])
    assert code == 0
    version = next((tmp_path / "regression" / "lightning_logs").glob("version_*"))
    from safetensors.torch import load_file

    coefficients = load_file(version / "attribution" / "component_scores.safetensors")["coefficients"]
    assert coefficients.numel() > 0 and torch.isfinite(coefficients).all()


def test_an_unsupported_pipeline_is_refused_in_one_sentence(folders, tmp_path):
    folder = tmp_path / "kandinsky"
    shutil.copytree(folders["pixart"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(UserInputError, match=r"holds a KandinskyV22Pipeline .*SDXL, SD3, FLUX"):
        load_backbone(folder)


def test_a_folder_without_its_transformer_is_refused(folders, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(folders["sd3"], folder, ignore=shutil.ignore_patterns("transformer"))
    with pytest.raises(UserInputError, match=r"has no transformer/"):
        load_backbone(folder)


def test_flow_matching_models_refuse_eta(folders):
    with pytest.raises(UserInputError, match="flow-matching"):
        load_backbone(folders["flux"]).generate([PROMPT], eta=1.0)


def test_an_edit_of_a_transformer_is_evaluated_on_a_prompt_set(folders, tmp_path):
    """``cad test --config configs/sd/evaluate.yaml`` on FLUX: the CSV's seeds, the edit applied (ablating every
    feed-forward weight changes every image; an empty edit none)."""
    import numpy as np
    from PIL import Image

    from cad_lightning.editing import save_masks

    transformer = FluxTransformer2DModel.from_pretrained(folders["flux"] / "transformer", local_files_only=True)
    params = dict(transformer.named_parameters())
    names = ComponentSpace(["ff"]).names(transformer)
    empty = save_masks(tmp_path / "empty.safetensors", {n: torch.ones_like(params[n], dtype=torch.bool) for n in names})
    ablate = save_masks(tmp_path / "ablate.safetensors", {n: torch.zeros_like(params[n], dtype=torch.bool) for n in names})
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,seed\na photo of a cat,0\na red dog,1\n")
    pixels = {}
    for name, edit in (("none", None), ("empty", empty), ("ablate", ablate)):
        code = run_cli(["test", "--config", str(CONFIGS / "sd" / "evaluate.yaml"), "--model.model_path",
                        str(folders["flux"]), "--model.dtype", "fp32", "--model.num_inference_steps", "2",
                        "--model.guidance_scale", "1.0", "--model.save_images", "true", "--data.prompts_file",
                        str(prompts), "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / name),
                        *(["--model.edit", str(edit)] if edit else [])])
        assert code == 0
        (report,) = (tmp_path / name).rglob("report.json")
        files = sorted((report.parent / "images").glob("*.png"))
        pixels[name] = np.stack([np.asarray(Image.open(f)) for f in files])
    assert len(pixels["none"]) == 2
    assert np.array_equal(pixels["none"], pixels["empty"]) and not np.array_equal(pixels["none"], pixels["ablate"])
    model = load_backbone(folders["flux"])
    expected = model.generate(["a photo of a cat", "a red dog"], seed=[0, 1], num_inference_steps=2)
    assert np.array_equal(pixels["none"], (expected * 255).round().byte().permute(0, 2, 3, 1).numpy())


@pytest.mark.slow
def test_two_processes_give_the_one_process_scores_on_a_transformer(folders, tmp_path):
    """SD3 (joint attention, flow matching) attributed on 1 and on 2 DDP processes: the same scores."""
    import subprocess
    import sys

    from distributed_runs import TOLERANCE, environment, latest_scores, max_relative_difference

    scores = {}
    for devices in (1, 2):
        root = tmp_path / f"devices_{devices}"
        args = [sys.executable, "-m", "cad_lightning.cli", "fit", "--config", str(CONFIGS / "sd3" / "erase_object.yaml"),
                "--model.model_path", str(folders["sd3"]), "--model.dtype", "fp32", "--model.num_inference_steps", "2",
                "--model.gradient_checkpointing", "false", "--data.concept", "cat", "--data.samples", "3",
                "--data.batch_size", "1", "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
                "--trainer.strategy", "ddp" if devices == 2 else "auto", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(root), "--model.editing.ratios", "[0.05]"]
        run = subprocess.run(args, env=environment(), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        scores[devices] = latest_scores(root)
    assert max_relative_difference(scores[2], scores[1]) <= TOLERANCE


PEER_REFUSALS = {"sdxl": (), "pixart": (), "sd3": ("uce", "esd_x"), "flux": ("uce", "esd_x")}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_peers_edit_the_families_whose_layers_they_need_and_refuse_the_others(folders, family):
    """UCE, ESD-x and ConceptPrune on each family: an edit of the layers the method names, or one sentence saying
    which layers it needs (SD3 and FLUX have no cross-attention: their prompt tokens share joint attention)."""
    from cad_lightning.editing.conceptprune import conceptprune_masks, ff_output_names
    from cad_lightning.editing.esd import esd_edit
    from cad_lightning.editing.text_space import reads_text_only
    from cad_lightning.editing.uce import uce_weights

    backbone = load_backbone(folders[family])
    runs = {"uce": lambda: uce_weights(backbone, [PROMPT], "", ["a red dog"]),
            "esd_x": lambda: esd_edit(backbone, [PROMPT], steps=1, lr=1e-3, progress=False),
            "conceptprune": lambda: conceptprune_masks(backbone, [PROMPT], ["a photo of a"], progress=False)}
    named = {"uce": reads_text_only, "esd_x": lambda n: ".attn2." in n,
             "conceptprune": lambda n: n in ff_output_names(backbone.denoiser)}
    for method, run in runs.items():
        if method in PEER_REFUSALS[family]:
            with pytest.raises(UserInputError) as refused:
                run()
            message = str(refused.value)
            assert message.count(". ") == 0 and ("attention" in message or "attn2" in message)
            continue
        edit = run()
        assert edit and all(named[method](n) for n in edit), (family, method)
        assert all(torch.isfinite(t.float()).all() for t in edit.values())


@pytest.mark.parametrize("family", ["sdxl", "pixart"])
def test_uce_moves_the_keys_the_cross_attention_really_reads(folders, family):
    """UCE's closed form is written for the inputs of the K/V projections; read them from the running model (a
    hook on the first key projection, PixArt's after its caption projection) and check the erased prompt's key at
    its last word moved to the guide's, while a preserved prompt's stayed."""
    from cad_lightning.editing.uce import uce_weights

    backbone = load_backbone(folders[family])
    name = next(n for n, _ in backbone.denoiser.named_parameters() if n.endswith("attn2.to_k.weight"))
    module = backbone.denoiser.get_submodule(name.removesuffix(".weight"))
    seen = []
    handle = module.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0].detach().double()))
    x = torch.zeros(1, *backbone.latent_shape)
    inputs = {}
    for prompt in (PROMPT, "", "a red dog"):
        seen.clear()
        backbone.predict_noise(x, 1, backbone.encode([prompt]))
        inputs[prompt] = seen[0][0]
    handle.remove()
    length = getattr(backbone, "text_length", None) or backbone.tokenizer.model_max_length
    last = {p: int(backbone.tokenizer([p], padding="max_length", max_length=length, truncation=True,
                                      return_tensors="pt").attention_mask.sum()) - 2 for p in inputs}
    old = module.weight.detach().double()
    new = uce_weights(backbone, [PROMPT], "", ["a red dog"], lamb=1e-3)[name].double()
    erase, guide, keep = (inputs[p][max(last[p], 0)] for p in inputs)
    assert (new @ erase - old @ guide).norm() < 0.05 * (old @ erase - old @ guide).norm()
    assert (new @ keep - old @ keep).norm() < 0.05 * (old @ keep).norm()
