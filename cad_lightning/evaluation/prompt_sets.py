"""Prompt sets for evaluating real models: a CSV file with one image per row.

Format (UTF-8, comma-separated, a header row naming the columns, any column order):

- ``prompt`` (required): the text prompt;
- ``seed`` (required): the integer seed of that image's initial noise, so an edited model is compared with
  the unedited one on the very same noise;
- ``label`` (optional): the class the image classifier should see: a class index of the classifier or a
  class name (matched against the classifier's ``id2label``, e.g. ``golf ball`` or ``tench``); empty for
  rows the classifier should not score;
- ``group`` (optional): a free word that groups rows in the report, e.g. ``target``, ``retain``, ``unsafe``.

Other columns are ignored. The file is read with the csv module, so prompts holding commas are quoted.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from cad_lightning.errors import UserInputError

REQUIRED_COLUMNS = ("prompt", "seed")
OPTIONAL_COLUMNS = ("label", "group")
SEED_RANGE = (0, 2**63 - 1)


@dataclass
class PromptRow:
    """One image to generate: ``row`` is its 0-based position among the data rows of the file."""

    row: int
    prompt: str
    seed: int
    label: str | None = None
    group: str | None = None


def read_prompt_set(path: str | os.PathLike, field: str = "data.prompts_file") -> list[PromptRow]:
    """The rows of a prompt-set CSV file; a UserInputError naming ``field``, the file and the line when it is bad."""
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"{field} '{path}' is not a file; give a CSV file with the columns prompt and seed.")
    with file.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        if not header:
            raise UserInputError(f"{field} '{path}' is empty; give a header row 'prompt,seed' and one row per image.")
        reader.fieldnames = header
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise UserInputError(
                f"{field} '{path}' has no column {' or '.join(missing)} in its header ({', '.join(header)}); "
                f"the columns are prompt, seed and optionally label, group.")
        rows = []
        for record in reader:
            line = reader.line_num
            values = {k: (v or "").strip() for k, v in record.items() if k is not None}
            if not any(values.values()):
                continue  # a blank line
            prompt = values["prompt"]
            if not prompt:
                raise UserInputError(f"{field} '{path}' line {line}: the prompt is empty.")
            seed_text = values["seed"]
            try:
                seed = int(seed_text)
            except ValueError as error:
                raise UserInputError(
                    f"{field} '{path}' line {line}: seed '{seed_text}' is not an integer.") from error
            if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
                raise UserInputError(
                    f"{field} '{path}' line {line}: seed {seed} is outside {SEED_RANGE[0]}..{SEED_RANGE[1]}.")
            rows.append(PromptRow(len(rows), prompt, seed, values.get("label") or None, values.get("group") or None))
    if not rows:
        raise UserInputError(f"{field} '{path}' has a header but no rows; give one row per image.")
    return rows
