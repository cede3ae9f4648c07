"""MaskDataModule: the (ablation-mask, prompts) items of a regression attribution run.

:meth:`items` are the sampling runs every mask is scored on (the ``samples`` prompts of the concept with their
seeds and base prompts, as in AttributionDataModule). What the loader yields (:meth:`loader_items`) is one
ablation mask with those prompts: ``{"item_id", "concept", "mask": mask id, "mask_seed", "keep_prob",
"prompts", "seeds", "base_prompts"}``; the module regenerates the mask from (``mask_seed``, mask id) and scores
the masked model on the item's prompts. Training masks
have ids 0, 1, …; held-out masks (fidelity) have ids from ``HELDOUT_BASE`` on, so asking for more training
masks later never changes an existing mask. Items are a map-style dataset: Lightning's DistributedSampler
shards the masks across processes.
"""

from __future__ import annotations

from cad_lightning.data.attribution_datamodule import AttributionDataModule
from cad_lightning.errors import UserInputError

HELDOUT_BASE = 1_000_000_000


class MaskDataModule(AttributionDataModule):
    """Ablation masks for the regression estimator.

    Args:
        concept / base_prompt / base_word / prompt_templates / prompts_file / seed: as in AttributionDataModule
            (with ``base_word``, each prompt's presence is read against the same prompt without the concept).
        samples: evaluation prompts (sampling runs) per mask.
        masks: training masks (rows of the regression).
        heldout_masks: held-out masks of the same density for the fidelity check (0: no check).
        keep_prob: probability that a component is kept, independently per component (COAR uses 0.9–0.95).
        mask_seed: seed of the masks.
        batch_size: masks per training step (all scored in one batched pass).
    """

    def __init__(
        self,
        concept: str = "circle",
        base_prompt: str = "",
        base_word: str | None = None,
        prompt_templates: list[str] | None = None,
        prompts_file: str | None = None,
        samples: int = 4,
        seed: int = 0,
        masks: int = 400,
        heldout_masks: int = 100,
        keep_prob: float = 0.95,
        mask_seed: int = 0,
        batch_size: int = 16,
    ) -> None:
        super().__init__(concept=concept, base_prompt=base_prompt, base_word=base_word, samples=samples, retain_samples=0,
                         prompt_templates=prompt_templates, prompts_file=prompts_file, seed=seed, batch_size=batch_size)
        if masks < 2:
            raise UserInputError(f"data.masks must be at least 2, got {masks}.")
        if heldout_masks < 0 or heldout_masks == 1:
            raise UserInputError(f"data.heldout_masks must be 0 or at least 2, got {heldout_masks}.")
        if not isinstance(keep_prob, (int, float)) or not 0 < keep_prob < 1:
            raise UserInputError(f"data.keep_prob must be a number in (0, 1), got {keep_prob!r}.")
        self.masks, self.heldout_masks = masks, heldout_masks
        self.keep_prob, self.mask_seed = float(keep_prob), mask_seed

    def train_ids(self) -> list[int]:
        return list(range(self.masks))

    def heldout_ids(self) -> list[int]:
        return [HELDOUT_BASE + k for k in range(self.heldout_masks)]

    def loader_items(self) -> list[dict]:
        """One item per mask (training masks, then held-out ones), each with the runs it is scored on."""
        runs = self.items()
        prompts, seeds = [i["prompt"] for i in runs], [int(i["seed"]) for i in runs]
        bases = [i["base_prompt"] for i in runs]
        return [{"item_id": k, "concept": self.concept, "mask": i, "mask_seed": self.mask_seed,
                 "keep_prob": self.keep_prob, "prompts": prompts, "seeds": seeds, "base_prompts": bases}
                for k, i in enumerate(self.train_ids() + self.heldout_ids())]
