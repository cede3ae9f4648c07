"""MaskScoreStore: the finished masks' scores of a regression run, kept so a restarted run resumes.

The store is a folder: ``config.json`` holds the settings that decide a mask's score (the SHA-256 of the
model's weights, objective, components, granularity, score, sampler, concept, prompts, seeds,
keep-probability; a staged edit's later stage also the edit's digest), and every finished chunk of masks is
one ``chunk-<digest>.json`` file ``{"ids": [...], "scores": [...]}``, written atomically (temp file, then
rename), so a killed process leaves whole chunks only. A run started with the same settings reads every chunk
and computes only the missing masks (more masks than before may be asked for: mask ids are stable); a run
with other settings is refused with the differing keys named.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cad_lightning.errors import UserInputError
from cad_lightning.utils import write_json

CONFIG_FILE = "config.json"


def _normal(value):
    """JSON form of a value, so a tuple and a list of the same items compare equal."""
    return json.loads(json.dumps(value, default=str))


class MaskScoreStore:
    """Append-only scores of finished masks in ``folder``, for the settings ``fingerprint``."""

    def __init__(self, folder: str | Path, fingerprint: dict) -> None:
        self.folder = Path(folder)
        self.fingerprint = _normal(fingerprint)

    def check(self, create: bool) -> None:
        """Refuse a store made with other settings; with ``create``, write the settings of a new store."""
        path = self.folder / CONFIG_FILE
        if path.is_file():
            stored = json.loads(path.read_text())
            keys = sorted(set(stored) | set(self.fingerprint))
            differing = [k for k in keys if stored.get(k) != self.fingerprint.get(k)]
            if differing:
                details = "; ".join(f"{k}: {stored.get(k)!r} there, {self.fingerprint.get(k)!r} now" for k in differing)
                raise UserInputError(
                    f"The mask scores in '{self.folder}' were computed with a different config ({details}); resume "
                    "with the same settings, or give another model.store_dir (or trainer.default_root_dir) for a new run."
                )
        elif create:
            write_json(path, self.fingerprint)

    def load(self) -> dict[int, float]:
        """``{mask id: score}`` of every finished chunk."""
        out: dict[int, float] = {}
        for chunk in sorted(self.folder.glob("chunk-*.json")):
            data = json.loads(chunk.read_text())
            out.update(zip((int(i) for i in data["ids"]), (float(s) for s in data["scores"])))
        return out

    def add(self, ids: list[int], scores: list[float]) -> Path:
        """Record one finished chunk of masks, atomically."""
        ids = [int(i) for i in ids]
        digest = hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16]
        path = self.folder / f"chunk-{digest}.json"
        write_json(path, {"ids": ids, "scores": [float(s) for s in scores]})
        return path
