"""The closed sets of values the config's fields take, as ``Literal`` types: the command line lists them in
``--help`` and refuses any other value when it parses the config, before any weights load; :func:`check_choice`
refuses them in one sentence for calls from Python."""

from __future__ import annotations

from typing import Literal, get_args

from cad_lightning.errors import UserInputError

Scope = Literal["row", "matrix", "global"]
Selection = Literal["cad", "selective", "retain", "iterative", "random"]
CollateralSpace = Literal["auto", "text", "states"]
EvaluateAt = Literal["all", "goal", "floor"]
RandomAt = Literal["all", "largest"]
MultiConcept = Literal["joint", "union"]
Objective = Literal["erase", "amplify"]
Precision = Literal["fp32", "fp16", "bf16"]
RegressionMethod = Literal["ridge", "lasso"]
Spread = Literal["auto", "even", "text"]
RegressionSelection = Literal["auto", "top", "selective"]
RowWeights = Literal["ablation", "uniform"]
RegressionEvaluateAt = Literal["all", "goal"]
Attack = Literal["inversion", "prompt_search"]


def choices(kind) -> tuple[str, ...]:
    """The values of a ``Literal`` type."""
    return get_args(kind)


def check_choice(owner: str, field: str, value, kind) -> str:
    """``value`` when it is one of ``kind``'s values; else a UserInputError naming ``owner``'s ``field`` and
    what it accepts."""
    accepted = choices(kind)
    if not isinstance(value, str) or value not in accepted:
        raise UserInputError(f"{owner} {field} must be one of {', '.join(accepted)}, got {value!r}.")
    return value
