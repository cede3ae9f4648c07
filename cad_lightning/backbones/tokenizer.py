"""Word-level tokenizer of the embedded model, saved in the plain transformers format.

It is a ``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model, so
``AutoTokenizer.from_pretrained(folder)`` opens it without any code of ours.
"""

from __future__ import annotations

from cad_lightning.errors import UserInputError

from collections.abc import Sequence

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def build_word_tokenizer(words: Sequence[str], max_length: int = 8) -> PreTrainedTokenizerFast:
    """A tokenizer with one id per word; every prompt becomes ``<bos> words <eos> <pad>...`` of ``max_length``."""
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in words if w not in specials])}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=max_length, **SPECIAL_TOKENS)


def word_vocabulary(tokenizer: PreTrainedTokenizerBase) -> list[str] | None:
    """The words of a word-level tokenizer (specials left out), or None for a subword tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "WordLevel":
        return None
    specials = set(tokenizer.all_special_tokens)
    return [w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if w not in specials]


def check_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> None:
    """Raise a ValueError naming the first prompt word a word-level tokenizer does not know."""
    vocab = word_vocabulary(tokenizer)
    if vocab is None:
        return
    known = set(vocab)
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}.")
        words = prompt.lower().split()
        if len(words) + 2 > tokenizer.model_max_length:
            raise UserInputError(
                f"The prompt '{prompt}' has {len(words)} words; this model reads at most "
                f"{tokenizer.model_max_length - 2}."
            )
        for word in words:
            if word not in known:
                raise UserInputError(
                    f"The word '{word}' in the prompt '{prompt}' is not in this model's vocabulary: "
                    f"{', '.join(vocab)}."
                )
