"""Editing: select the components to ablate (erase / amplify), apply masks, read and write edit artifacts."""

from cad_lightning.editing.artifacts import (
    apply_edit,
    apply_masks,
    combine_masks,
    load_masks,
    read_mask_metadata,
    restore_weights,
    save_edited_unet,
    save_masks,
)
from cad_lightning.editing.select import (
    MODES,
    MULTI_CONCEPT,
    SCOPES,
    collateral_penalised_scores,
    count_ablated,
    joint_scores,
    random_like,
    retain_adjusted_scores,
    select_components,
    target_count,
    union_selection,
)

__all__ = [
    "MODES",
    "MULTI_CONCEPT",
    "SCOPES",
    "apply_edit",
    "apply_masks",
    "collateral_penalised_scores",
    "joint_scores",
    "combine_masks",
    "count_ablated",
    "load_masks",
    "random_like",
    "read_mask_metadata",
    "restore_weights",
    "retain_adjusted_scores",
    "save_edited_unet",
    "save_masks",
    "select_components",
    "target_count",
    "union_selection",
]
