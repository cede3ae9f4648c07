"""Robust CAD-Erase: an erasure that holds against textual inversion.

The default edit ablates cross-attention key/value weights: it cuts the concept word's way into the image, and
a learned word (textual inversion, cad_lightning/attacks/inversion.py) takes another way through the weights
that remain. The robust mode adds, in adversarial rounds, the weights that *draw* the concept, wherever they are:

1. **attack**: on the current edit, learn a token from images of the concept drawn by the unedited model
   (Pham et al.'s inversion, the exam's settings), on the defender's own seeds within the search seeds;
2. **score**: every weight of the denoiser outside the edit's components (convolutions, self-attention,
   feed-forward, the projections) by how much the model's denoising of those images, under the learned token,
   depends on it, against how much its denoising of the other concepts' images, under their own prompts,
   does. Both are Optimal Brain Damage's second-order estimate of the loss a weight's ablation adds,
   ½ w² E[g²] (the diagonal Fisher information; the first-order term vanishes where the model was trained,
   so it cannot see collateral), and a weight's score is the concept's over the others' plus
   ``collateral_offset`` of their mean (the selective ranking of the default edit);
3. **grow**: the top-scored weights are added, smallest fraction first (the fraction is of the weights outside
   the edit's components), each grown edit attacked afresh as the exam will attack it (a new token from the
   initializer word, the same steps), until that token reads at most floor + ATTACK_MARGIN on the search seeds
   (the higher of its readings in the concept's prompts and in 'a <token>', as the exam reads the strongest attack)
   while every retained concept keeps ``retain`` of its unedited accuracy;
4. when no fraction holds, the largest that keeps the retained concepts is the next round's edit, attacked and
   scored again; the rounds stop when a fresh token no longer brings the concept back, or after ``rounds``.

Every decision reads the search seeds; the exam then reads the hardened edit on the report seeds beside random
ablation of the same count in every row of every matrix, and attacks it with a token of its own (other seeds).
This is the RECE / AdvUnlearn idea (attack the current model, erase what the attack found) with CAD's
ablations and a word-free objective in place of their fine-tuning.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cad_lightning.attacks.inversion import TOKEN, InversionSettings, added_token, learn_token
from cad_lightning.data.world import CONCEPT_KINDS, concept_kind, make_prompt, without_concept
from cad_lightning.errors import UserInputError

HARDEN_OFFSET = 700_000  # the defender's seeds within the search seeds: past the floor's, before the attacks'
RETAIN_OFFSET = 20_000  # the other concepts' images, after the concept's; the probes' readings after them
ALONE = 10_000  # the bare prompt 'a <token>' of a probe's reading, after its concept prompts and retained prompts


@dataclass
class RobustSettings:
    """The robust mode of the selective erase (cad_lightning/editing/robust.py).

    Args:
        enabled: harden the edit the search stopped at (``exam.evaluate_at`` goal, erase, one concept of the
            shapes world).
        fractions: the fractions of the weights outside the edit's components that a round may reach, tried
            smallest first.
        rounds: adversarial rounds at most (attack, score, grow).
        images: images of the concept the defender's token is learned from and the scores read.
        retain_images: images of the other concepts' prompts the collateral reads.
        timesteps: noise levels drawn per image for the scores.
        collateral_offset: a weight's score is its concept importance over (its collateral + this · the mean).
        retain: the retained prompts' words must keep this fraction of their unedited accuracy.
        read_images: search-seed images per reading of a probe (the token's prompts; twice as many retained).
        inversion: the defender's textual inversion (the exam's attack's settings by default).
    """

    enabled: bool = False
    fractions: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.02, 0.04])
    rounds: int = 2
    images: int = 32
    retain_images: int = 128
    timesteps: int = 16
    collateral_offset: float = 0.001
    retain: float = 0.9
    read_images: int = 32
    inversion: InversionSettings = field(default_factory=InversionSettings)

    def __post_init__(self) -> None:
        if isinstance(self.inversion, dict):
            self.inversion = InversionSettings(**self.inversion)

    def check(self, owner: str = "model.editing.robust") -> None:
        fractions = self.fractions
        if isinstance(fractions, (str, bytes)) or not hasattr(fractions, "__iter__") or not list(fractions):
            raise UserInputError(f"{owner}.fractions must be a non-empty list of numbers in (0, 1), got {fractions!r}.")
        for f in fractions:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
                raise UserInputError(f"{owner}.fractions: {f!r} is not a number in (0, 1).")
        self.fractions = sorted(set(float(f) for f in fractions))
        for name in ("rounds", "images", "retain_images", "timesteps", "read_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserInputError(f"{owner}.{name} must be a whole number >= 1, got {value!r}.")
        if not (isinstance(self.collateral_offset, (int, float)) and self.collateral_offset >= 0):
            raise UserInputError(f"{owner}.collateral_offset must be 0 or more, got {self.collateral_offset!r}.")
        if not (isinstance(self.retain, (int, float)) and 0 <= self.retain <= 1):
            raise UserInputError(f"{owner}.retain must be in [0, 1], got {self.retain!r}.")
        self.inversion.check(f"{owner}.inversion")


def beyond_names(denoiser: torch.nn.Module, edited: list[str]) -> list[str]:
    """The weights the robust rounds may add: every matrix or kernel of the denoiser outside ``edited``."""
    skip = set(edited)
    return [n for n, p in denoiser.named_parameters() if p.ndim >= 2 and n not in skip]


def importance(backbone, names: list[str], images: torch.Tensor, captions: list[str], timesteps: int, seed: int,
               chunk: int = 2) -> dict[str, torch.Tensor]:
    """E[g²] per weight of ``names``: the squared gradient of the denoising loss of ``images`` under ``captions``,
    per chunk of ``chunk`` states, over ``timesteps`` noise levels per image (drawn from ``seed``)."""
    params = dict(backbone.denoiser.named_parameters())
    wanted = [params[n] for n in names]
    was = [p.requires_grad for p in wanted]
    total = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    generator = torch.Generator().manual_seed(seed)
    x0_all = backbone.encode_images(images)
    train_steps = backbone.scheduler.config.num_train_timesteps
    count = 0
    try:
        for p in wanted:
            p.requires_grad_(True)
        with torch.no_grad():
            text_all = backbone.encode(captions)
        for _ in range(timesteps):
            noise_all = torch.randn(x0_all.shape, generator=generator).to(x0_all.device, x0_all.dtype)
            t_all = torch.randint(0, train_steps, (len(x0_all),), generator=generator).to(x0_all.device)
            for s in range(0, len(x0_all), chunk):
                x0, noise, t, text = (x[s:s + chunk] for x in (x0_all, noise_all, t_all, text_all))
                prediction = backbone.predict_noise(backbone.add_noise(x0, noise, t), t, text)
                loss = F.mse_loss(prediction.float(), backbone.training_target(x0, noise, t).float())
                grads = torch.autograd.grad(loss, wanted)
                for n, g in zip(names, grads):
                    total[n] += g.float().pow(2)
                count += 1
    finally:
        for p, w in zip(wanted, was):
            p.requires_grad_(w)
    return {n: v / count for n, v in total.items()}


class Hardener:
    """The adversarial rounds of the robust mode for one concept (see the module docstring).

    Args:
        settings: the robust settings.
        sampler: what samples the images (a ShardedSampler over every rank, or a backbone).
        detector: the concept classifier.
        concept: the erased concept (a shapes-world word).
        apply: puts an edit (masks) on the denoiser; None: the unedited model.
        original: the unedited weights ``apply`` restores; the rounds add the weights outside the edit's components.
        search_base: the search seeds' base; floor: the search seeds' floor of the concept.
        broadcast: rank 0's object on every rank (one process: the identity).
    """

    def __init__(self, settings: RobustSettings, sampler, detector, concept: str, apply: Callable,
                 original: dict[str, torch.Tensor], search_base: int, floor: float, broadcast=None,
                 progress: bool = True) -> None:
        from cad_lightning.attacks.exam import ATTACK_MARGIN

        self.settings, self.sampler, self.detector, self.concept = settings, sampler, detector, concept
        self.apply, self.original, self.floor, self.margin = apply, original, floor, ATTACK_MARGIN
        self.base = search_base + HARDEN_OFFSET
        self.read_base = search_base + HARDEN_OFFSET + 2 * RETAIN_OFFSET
        self.broadcast = broadcast or (lambda x: x)
        self.progress = progress
        self.backbone = getattr(sampler, "backbone", sampler)
        self.unedited_kept: dict[str, float] = {}  # per retained word, its accuracy on the unedited model

    # --- readings on the search seeds -------------------------------------------------------
    def _words_kept(self, items, images) -> dict[str, float]:
        """Per retained concept, the accuracy of its images (the exam's per-class accuracy)."""
        from cad_lightning.evaluation.concepts import accuracy_from_predictions

        return accuracy_from_predictions(items, self.detector(images))

    def _read(self, vector: torch.Tensor) -> dict:
        """On the current model: the token's reading (the higher of the concept's prompts with the token in the
        word's place and the bare prompt 'a <token>', as the exam's strongest attack reads it) and the worst
        retained concept relative to the unedited model."""
        from cad_lightning.evaluation.concepts import evaluation_items

        n = self.settings.read_images
        targets = evaluation_items(self.concept, [], n, 0, seed=self.read_base)
        retained = self._retained()
        kind = concept_kind(self.concept)
        alone = without_concept(make_prompt(**{kind: self.concept}), self.concept, TOKEN)
        with added_token(self.backbone, vector):  # the exam's two readings: in the concept's prompts, and alone
            images = self.sampler.generate([without_concept(i.prompt, self.concept, TOKEN) for i in targets]
                                           + [alone] * n, seed=[i.seed for i in targets] + [self.read_base + ALONE + i
                                                                                              for i in range(n)])
        read = self.detector(images)[kind]
        token = max(sum(w == self.concept for w in read[:n]) / n, sum(w == self.concept for w in read[n:]) / n)
        kept = self._words_kept(retained, self.sampler.generate([i.prompt for i in retained],
                                                                seed=[i.seed for i in retained]))
        worst = min(kept, key=lambda w: kept[w] / max(self.unedited_kept.get(w, 1.0), 1e-9))
        return {"token": token, "retained_worst": worst,
                "retained_relative": kept[worst] / max(self.unedited_kept.get(worst, 1.0), 1e-9)}

    # --- the rounds ---------------------------------------------------------------------------
    def run(self, edit: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """The hardened edit (the masks of ``edit`` and the added weights') and the rounds' record."""
        from cad_lightning.evaluation.concepts import evaluation_items

        start = time.perf_counter()
        s = self.settings
        kind = concept_kind(self.concept)
        denoiser = self.backbone.denoiser
        names = beyond_names(denoiser, list(edit))
        self.apply(None)
        params = dict(denoiser.named_parameters())
        for n in names:  # the unedited weights of everything a round may ablate, for apply to restore
            self.original.setdefault(n, params[n].detach().clone())
        # the defender's images, drawn by the unedited model: the concept's, and the other concepts'
        items = evaluation_items(self.concept, [], s.images, 0, seed=self.base)
        images = self.sampler.generate([i.prompt for i in items], seed=[i.seed for i in items])
        captions = [without_concept(i.prompt, self.concept, TOKEN) for i in items]
        others = evaluation_items(self.concept, [], 0, s.retain_images, seed=self.base + RETAIN_OFFSET)
        other_images = self.sampler.generate([i.prompt for i in others], seed=[i.seed for i in others])
        retained = self._retained()
        self.unedited_kept = self._words_kept(retained, self.sampler.generate([i.prompt for i in retained],
                                                                              seed=[i.seed for i in retained]))
        total = sum(params[n].numel() for n in names)
        current = dict(edit)
        goal = self.floor + self.margin
        record = {"settings": {**asdict(s), "inversion": asdict(s.inversion)}, "components": len(names),
                  "weights": total, "floor": self.floor, "goal": goal, "unedited_retained": self.unedited_kept,
                  "rounds": []}
        for r in range(s.rounds):
            self.apply(current)
            vector, losses = self._invert(images, captions, kind, self.base + r, f"Robust round {r + 1}: inversion")
            before = self._read(vector)
            entry = {"round": r + 1, "token_before": before["token"], "loss_last": losses[-1], "probes": []}
            record["rounds"].append(entry)
            if before["token"] <= goal:
                entry["stopped"] = "a token learned afresh on this edit reads at most floor + margin"
                break
            added = self._scores(names, current, vector, images, captions, other_images, others, r)
            chosen, held = None, False
            for fraction in tqdm(s.fractions, desc=f"Robust round {r + 1}: growing", disable=not self.progress):
                k = int(round(fraction * total))
                candidate = self._with_top(current, names, added, k)
                if candidate is None:
                    continue  # already this large
                self.apply(candidate)
                # the exam's attacker, on the defender's seeds: a token learned afresh on the grown edit
                probe, _ = self._invert(images, captions, kind, self.base + 100 * (r + 1) + len(entry["probes"]),
                                        f"Robust round {r + 1}: attacking {fraction:g}")
                reading = self._read(probe)
                entry["probes"].append({"fraction": fraction, "weights": k, **reading})
                if reading["retained_relative"] < s.retain:
                    break  # larger fractions take more of the rest
                chosen = (fraction, candidate)
                if reading["token"] <= goal:
                    held = True
                    break
            if chosen is None:
                entry["stopped"] = ("the smallest fraction tried already takes a retained concept" if entry["probes"]
                                    else "no larger fraction left to try")
                break
            entry["fraction"] = chosen[0]
            current = chosen[1]
            if held:
                entry["stopped"] = "a token learned afresh on the grown edit reads at most floor + margin"
                break
        self.apply(None)
        record["ablated_beyond"] = sum(int((~current[n]).sum()) for n in names if n in current)
        record["fraction_beyond"] = record["ablated_beyond"] / total
        record["wall_s"] = time.perf_counter() - start
        return current, record

    def _invert(self, images, captions, kind: str, seed: int, desc: str) -> tuple[torch.Tensor, list[float]]:
        """A token learned afresh on the current weights (the exam's attack, on the defender's images), rank 0's."""
        with torch.inference_mode(False), torch.enable_grad():
            vector, losses = learn_token(self.backbone, images, captions, "shape" if kind == "shape" else "a",
                                         self.settings.inversion, seed=seed, progress=self.progress, desc=desc)
        return self.broadcast(vector), losses

    def _retained(self) -> list:
        """The retained prompts each probe reads (twice ``read_images``, after the token's prompts' seeds), every
        other concept of the world named."""
        from cad_lightning.evaluation.concepts import evaluation_items

        n = self.settings.read_images
        others = [w for words in CONCEPT_KINDS.values() for w in words if w != self.concept]
        return evaluation_items(self.concept, others, 0, 2 * n, seed=self.read_base + n)

    def _scores(self, names, current, vector, images, captions, other_images, others, r) -> torch.Tensor:
        """The selective score of every weight outside the edit's components on the current model (-inf where
        already ablated), rank 0's on every rank."""
        s = self.settings
        params = dict(self.backbone.denoiser.named_parameters())
        with torch.inference_mode(False), torch.enable_grad():
            with added_token(self.backbone, vector):
                concept = importance(self.backbone, names, images, captions, s.timesteps, self.base + 10 * r + 1)
            collateral = importance(self.backbone, names, other_images, [i.prompt for i in others], s.timesteps,
                                    self.base + 10 * r + 2)
        w2 = {n: self.original[n].float().pow(2).to(params[n].device) for n in names}
        c = torch.cat([(w2[n] * concept[n]).flatten().cpu() for n in names])
        o = torch.cat([(w2[n] * collateral[n]).flatten().cpu() for n in names])
        score = c / (o + s.collateral_offset * o.mean() + 1e-30)
        ablated = torch.cat([(~current[n]).flatten().cpu() if n in current else torch.zeros(params[n].numel(),
                                                                                            dtype=torch.bool)
                             for n in names])
        score[ablated] = -float("inf")
        return self.broadcast(score)

    def _with_top(self, current, names, score, k) -> dict[str, torch.Tensor] | None:
        """``current`` with the top-scored weights added until ``k`` weights outside its components are ablated;
        None when it already has ``k``."""
        params = dict(self.backbone.denoiser.named_parameters())
        have = int((score == -float("inf")).sum())
        extra = k - have
        if extra <= 0:
            return None
        top = score.topk(extra).indices
        flat = torch.zeros(len(score), dtype=torch.bool)
        flat[top] = True
        out = dict(current)
        offset = 0
        for n in names:
            size = params[n].numel()
            add = flat[offset:offset + size].view(params[n].shape)
            offset += size
            if add.any() or n in current:
                keep = current[n].cpu() if n in current else torch.ones(params[n].shape, dtype=torch.bool)
                out[n] = keep & ~add
        return out
