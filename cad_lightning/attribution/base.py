"""AttributionModule: what both estimators' LightningModules share, and nothing either of them empties.

The two estimators (``CADModule``: first-order scores accumulated in fp32 buffers; ``RegressionCADModule``:
one concept score per random ablation mask, fitted at the end) share the model and its components, the
concept objective, and the run's handling of process-wide state. Neither trains anything: no optimizer, the
frozen model stays in eval mode, and the settings a run changes (exact fp32 on CUDA, one warning filter) are put
back at ``teardown``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from cad_lightning.attribution.components import ComponentSpace
from cad_lightning.attribution.objectives import OBJECTIVES, ConceptObjective
from cad_lightning.backbones.backbone import DiffusionBackbone, load_backbone
from cad_lightning.editing.artifacts import restore_weights
from cad_lightning.errors import UserInputError
from cad_lightning.generation import resolve_model_path
from cad_lightning.utils import file_sha256

EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


def use_ieee_fp32(device: torch.device) -> tuple[str, str] | None:
    """Make fp32 convolutions and matrix products on a CUDA device exact fp32 (no TF32). Returns the previous
    process-wide settings to put back with :func:`restore_fp32` (None when nothing changed: not a CUDA device).

    The erase objective is the squared difference of two nearly equal noise predictions, so the 10-bit
    mantissa of TF32 (PyTorch's default for cuDNN convolutions) is amplified into the scores: on an H200 the
    default attribution run's scores correlated only 0.83 with the CPU scores under TF32, 0.99999 without.
    """
    if device.type != "cuda":
        return None
    previous = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    return previous


def restore_fp32(previous: tuple[str, str] | None) -> None:
    if previous is not None:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = previous


class AttributionModule(pl.LightningModule):
    """The model, its components and the concept objective of an attribution run (either estimator).

    Args:
        model_path / objective / components / guidance_scale / num_inference_steps / dtype / chunk_size / edit /
            image_source / gradient_checkpointing: see ``CADModule``.

    A subclass calls ``save_hyperparameters()`` after ``super().__init__`` (its own arguments are the run's) and
    sets ``estimator``.
    """

    estimator: str = ""
    synchronizes_gradients = False  # nothing is trained: ranks reduce or gather their results explicitly, once

    def __init__(self, model_path: str, objective: str, components, guidance_scale: float | None,
                 num_inference_steps: int | None, dtype: str, chunk_size: int, edit: str | None, image_source: str,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise UserInputError(f"model.objective must be one of {', '.join(OBJECTIVES)}, got '{objective}'.")
        if chunk_size < 1:
            raise UserInputError(f"model.chunk_size must be at least 1, got {chunk_size}.")
        self.automatic_optimization = False
        self.model_folder = resolve_model_path(model_path)
        self.backbone: DiffusionBackbone = load_backbone(self.model_folder, dtype=dtype)
        if gradient_checkpointing:
            self.backbone.denoiser.enable_gradient_checkpointing()
        self.space = ComponentSpace(components)
        self.component_names = self.space.names(self.backbone.denoiser)
        if edit:
            from cad_lightning.editing import apply_edit

            apply_edit(self.backbone.denoiser, edit)
        self.concepts: list[str] = []
        self.n_targets = 1
        self.objective: ConceptObjective | None = None
        self._fp32_before: tuple[str, str] | None = None  # TF32 settings to put back, see teardown
        self._quiet = None  # the warning filters of this run, see quiet_eval_mode_warning

    def make_objective(self, base_prompt: str) -> ConceptObjective:
        """The run's concept objective (``model.objective``) against ``base_prompt``, with the run's sampler."""
        h = self.hparams
        kwargs = {"image_source": h.image_source} if h.objective == "amplify" else {}
        self.objective = OBJECTIVES[h.objective](base_prompt=base_prompt, guidance_scale=h.guidance_scale,
                                                 num_inference_steps=h.num_inference_steps, **kwargs)
        return self.objective

    def prepare_run(self, allow_tf32: bool = False) -> None:
        """The process-wide settings of a run, put back at :meth:`teardown`: exact fp32 on CUDA (unless
        ``allow_tf32``) and the eval-mode warning silenced."""
        if self.hparams.dtype == "fp32" and not allow_tf32 and self._fp32_before is None:
            self._fp32_before = use_ieee_fp32(self.trainer.strategy.root_device)
        self.quiet_eval_mode_warning()

    def quiet_eval_mode_warning(self) -> None:
        """Attribution trains nothing: the frozen model is in eval mode on purpose, which Lightning warns about at
        the start of training. The warning is silenced for this run only (until :meth:`teardown`)."""
        if self._quiet is None:
            self._quiet = warnings.catch_warnings()
            self._quiet.__enter__()
            warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING)

    def teardown(self, stage: str) -> None:
        """Put back the process-wide settings this run changed (TF32, warning filters)."""
        restore_fp32(self._fp32_before)
        self._fp32_before = None
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None

    def keep_original_weights(self) -> None:
        """Keep the unedited weights of the components, which every edit is put on (:meth:`apply_edit`)."""
        params = dict(self.backbone.denoiser.named_parameters())
        self.original_weights = {n: params[n].detach().clone() for n in self.component_names}

    def apply_edit(self, masks: dict[str, torch.Tensor] | None) -> None:
        """Put an edit (masks per parameter, True = keep) on the unedited weights; None: the unedited model."""
        restore_weights(self.backbone.denoiser, self.original_weights, masks)

    @property
    def targets(self) -> list[str]:
        """The concepts one edit is attributed for (``data.concepts``, or the one ``data.concept``)."""
        return self.concepts[: self.n_targets]

    def configure_optimizers(self):
        return None

    @property
    def model_id(self) -> str:
        return str(Path(self.model_folder).resolve())

    def weights_sha256(self) -> str | None:
        """The SHA-256 of the denoiser's weights file (None where the folder holds no single such file), read once."""
        if not hasattr(self, "_weights_sha256"):
            weights = Path(self.model_folder) / self.backbone.part / "diffusion_pytorch_model.safetensors"
            self._weights_sha256 = file_sha256(weights) if weights.is_file() else None
        return self._weights_sha256
