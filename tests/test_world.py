"""The shapes world: seeded rendering, labels that match the pixels, prompts and vocabulary."""

import pytest
import torch

from cad_lightning.data.world import (
    COLOURS, CONCEPT_KINDS, RGB, SHAPES, TEXTURES, VOCABULARY, Labels, ShapesWorld, concept_kind, make_prompt,
    prompts_naming,
)
from cad_lightning.errors import UserInputError


def test_render_is_seeded_and_in_range():
    world = ShapesWorld(16)
    a = world.sample(32, torch.Generator().manual_seed(3))
    b = world.sample(32, torch.Generator().manual_seed(3))
    c = world.sample(32, torch.Generator().manual_seed(4))
    assert a[0].shape == (32, 3, 16, 16)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])
    assert a[0].min() >= 0 and a[0].max() <= 1


def test_labels_match_pixels():
    """The object's pixels carry the labelled colour, and striped objects have dark rows."""
    world = ShapesWorld(16)
    g = torch.Generator().manual_seed(0)
    n = len(SHAPES) * len(COLOURS) * len(TEXTURES)
    idx = torch.arange(n)
    labels = Labels(shape=idx % len(SHAPES), colour=(idx // len(SHAPES)) % len(COLOURS), texture=idx // (len(SHAPES) * len(COLOURS)))
    images = world.render(labels, g)
    centre = images[:, :, 7:9, 7:9].reshape(n, 3, -1)  # rows 7 (a dark stripe row) and 8 (a bright one)
    palette = torch.tensor([RGB[c] for c in COLOURS])  # (C, 3)
    for i in range(n):
        distance = (centre[i].T[:, None, :] - palette[None]).norm(dim=-1).min(0).values  # (C,)
        assert distance.argmin() == labels.colour[i], (labels.words("shape")[i], labels.words("colour")[i])
        brightness = centre[i].sum(0)
        assert (brightness.max() - brightness.min() > 0.5) == (TEXTURES[labels.texture[i]] == "striped")


def test_shapes_differ():
    world = ShapesWorld(16, min_size=0.4, max_size=0.4, max_shift=0.0)
    labels = Labels(shape=torch.arange(len(SHAPES)), colour=torch.zeros(len(SHAPES), dtype=torch.long), texture=torch.zeros(len(SHAPES), dtype=torch.long))
    images = world.render(labels, torch.Generator().manual_seed(0))
    red = (images[:, 0] > 0.6) & (images[:, 1] < 0.4)
    for i in range(len(SHAPES)):
        for j in range(i + 1, len(SHAPES)):
            assert (red[i] != red[j]).sum() >= 6, (SHAPES[i], SHAPES[j])


def test_prompts_and_vocabulary():
    assert make_prompt("circle", "red", "striped") == "a red striped circle"
    assert make_prompt(colour="red") == "a red shape"
    assert make_prompt(texture="striped") == "a striped shape"
    for kind, words in CONCEPT_KINDS.items():
        for word in words:
            assert concept_kind(word) == kind
            prompts = prompts_naming(word, 20, torch.Generator().manual_seed(0))
            assert all(word in p.split() for p in prompts)
            assert all(w in VOCABULARY for p in prompts for w in p.split())
    _, prompts, labels = ShapesWorld(16).sample(64, torch.Generator().manual_seed(1))
    for prompt, s, c, t in zip(prompts, labels.words("shape"), labels.words("colour"), labels.words("texture")):
        words = prompt.split()
        assert all(w in (s, c, t, "a", "shape") for w in words)
    with pytest.raises(UserInputError, match="not a concept of the shapes world"):
        concept_kind("dog")


def test_prompt_without_its_concept():
    from cad_lightning.data.world import without_concept

    assert without_concept("a red striped circle", "circle") == "a red striped shape"
    assert without_concept("a red striped circle", "red") == "a striped circle"
    assert without_concept("a striped shape", "striped") == "a shape"
    assert without_concept("a circle", "circle", "square") == "a square"
    assert without_concept("a red circle", "red", "") == "a circle"
    with pytest.raises(UserInputError, match="not a concept"):
        without_concept("a dog", "dog")


def test_retained_accuracy_is_measured_on_the_retained_prompts():
    """Colours named in the target's prompts ('a red circle') do not count for the retained colour: after
    erasing 'circle' those images may hold no shape at all."""
    from cad_lightning.evaluation.concepts import accuracy_from_predictions, evaluation_items

    items = evaluation_items("circle", ["red", "square"], n_target=8, n_retain=16)
    predicted = {"shape": [], "colour": [], "texture": []}
    for item in items:
        if item.group == "target":  # the erased target: wrong everything
            predicted["shape"].append("star"), predicted["colour"].append("blue"), predicted["texture"].append("striped")
        else:  # retained prompts drawn exactly as named
            words = item.prompt.split()[1:]
            predicted["colour"].append(words[0]), predicted["texture"].append(words[1]), predicted["shape"].append(words[2])
    accuracy = accuracy_from_predictions(items, predicted)
    assert accuracy["circle"] == 0.0
    assert accuracy["red"] == 1.0 and accuracy["square"] == 1.0
