"""Recovery attacks on an erased model: textual inversion and a discrete prompt search, and their place in the
exam (:class:`~cad_lightning.attacks.exam.AttackExam`)."""

from cad_lightning.attacks.exam import AttackExam
from cad_lightning.attacks.inversion import InversionSettings, learn_token
from cad_lightning.attacks.prompt_search import PromptSearchSettings, search_prompt

__all__ = ["AttackExam", "InversionSettings", "PromptSearchSettings", "learn_token", "search_prompt"]
