"""The ``cad`` console script: LightningCLI over every module and data module of the project.

``cad fit --config configs/attribute.yaml`` runs attribution, ``cad fit --config configs/pretrain_tiny.yaml``
trains the embedded model, ``cad predict --config configs/generate.yaml`` generates images.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from cad_lightning.errors import UserInputError


class CADCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(pl.LightningModule, pl.LightningDataModule, *args, **kwargs)


def user_error_in(error: BaseException) -> UserInputError | None:
    """The UserInputError behind an exception (jsonargparse and Lightning wrap errors raised while building
    or running the objects), or None for a genuine failure, which keeps its traceback."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserInputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def main(args: list[str] | None = None) -> None:
    try:
        CADCLI(args=args)
    except Exception as error:
        user_error = user_error_in(error)
        if user_error is None:
            raise
        print(f"cad: error: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
