"""The word-level tokenizer opens with plain transformers and rejects unknown words with the vocabulary."""

import pytest
from transformers import AutoTokenizer

from cad_lightning.backbones.tokenizer import build_word_tokenizer, check_prompts, word_vocabulary
from cad_lightning.data.world import VOCABULARY
from cad_lightning.errors import UserInputError


def test_round_trip(tmp_path):
    build_word_tokenizer(VOCABULARY).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ids = tok(["a red circle", "A Red Circle"], padding="max_length", max_length=tok.model_max_length).input_ids
    assert ids[0] == ids[1]
    assert ids[0][0] == tok.bos_token_id and ids[0][4] == tok.eos_token_id and ids[0][-1] == tok.pad_token_id
    assert len(set(ids[0][1:4])) == 3 and tok.unk_token_id not in ids[0]
    assert word_vocabulary(tok) == list(VOCABULARY)


def test_unknown_word_lists_vocabulary():
    tok = build_word_tokenizer(VOCABULARY)
    check_prompts(tok, ["a red striped circle", ""])
    with pytest.raises(UserInputError) as err:
        check_prompts(tok, ["a purple circle"])
    assert "'purple'" in str(err.value) and "circle, square" in str(err.value)
    with pytest.raises(UserInputError, match="at most 6"):
        check_prompts(tok, ["a red striped circle a red striped"])
