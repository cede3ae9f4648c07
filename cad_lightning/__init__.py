"""cad-lightning: Component Attribution for Diffusion models (CAD) on PyTorch Lightning.

Python API for scripts and notebooks::

    from cad_lightning import apply_edit, load_backbone, load_concept_classifier
    model = load_backbone("tiny-shapes")                          # the shipped model, from any folder
    images = model.generate(["a red circle"], seed=0)          # (1, 3, 16, 16) in [0, 1]
    load_concept_classifier("tiny-shapes")(images)                # {"shape": ["circle"], ...}
    apply_edit(model.denoiser, "runs/attribute/lightning_logs/version_0/edits/selective-erase-0.2.safetensors")

    from cad_lightning import EraseObjective, first_order_scores
    names = ComponentSpace(["cross_attn_kv"]).names(model.denoiser)
    scores, mean_j = first_order_scores(model, EraseObjective(), names, ["a red circle"], [0])
"""

from cad_lightning.attribution.components import ComponentSpace
from cad_lightning.attribution.objectives import AmplifyObjective, EraseObjective
from cad_lightning.attribution.scoring import first_order_scores
from cad_lightning.backbones.backbone import DiffusionBackbone, Trajectory, load_backbone
from cad_lightning.editing.artifacts import apply_edit
from cad_lightning.editing.settings import EditSettings, ExamSettings
from cad_lightning.erase import erase
from cad_lightning.errors import UserInputError
from cad_lightning.evaluation.classifier import ConceptDetector, load_concept_classifier

__all__ = [
    "DiffusionBackbone",
    "Trajectory",
    "load_backbone",
    "load_concept_classifier",
    "ConceptDetector",
    "UserInputError",
    "erase",
    "apply_edit",
    "EditSettings",
    "ExamSettings",
    "ComponentSpace",
    "EraseObjective",
    "AmplifyObjective",
    "first_order_scores",
]
__version__ = "0.1.0"
