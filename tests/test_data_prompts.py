"""Prompts, the vocabulary and their round trips."""
import math

import pytest
import torch

from data_pipeline.prompts import parse_prompt, prompt_for
from data_pipeline.records import CANONICAL_FINDINGS, XrayRecord
from data_pipeline.vocab import NULL_ID, PAD_ID, Vocabulary


def record(**kw):
    base = dict(image_path="/x.jpg", patient_id="p1", study_id="p1/s1", dataset="chexpert",
                findings=("pleural effusion", "support devices"), uncertain=("edema",), view="frontal",
                projection="AP", sex="female", age=63, labels=(math.nan,) * 14, extra_tokens=("tok0003",))
    base.update(kw)
    return XrayRecord(**base)


def test_prompt_text_matches_the_documented_format():
    assert prompt_for(record()) == "frontal AP chest x-ray, female, 60s: pleural effusion, support devices, uncertain edema | tok0003"
    assert prompt_for(record(findings=(), uncertain=(), extra_tokens=(), projection="", sex="unknown", age=None)) == \
        "frontal chest x-ray, unknown sex"


@pytest.mark.parametrize("kw", [{}, {"age": 95}, {"age": 4}, {"sex": "male", "projection": "PA"},
                                {"findings": (), "uncertain": ()}, {"extra_tokens": ()}, {"view": "lateral", "projection": "LL"}])
def test_prompt_token_round_trip(kw):
    r = record(**kw)
    vocab = Vocabulary.default(["tok0003"])
    ids = vocab.tokens_for(r)
    assert len(ids) == vocab.max_len and ids[-1] == PAD_ID
    assert vocab.decode(ids) == prompt_for(r)
    assert vocab.encode(prompt_for(r)) == ids


def test_every_finding_and_uncertain_finding_round_trips():
    vocab = Vocabulary.default(max_len=64)
    r = record(findings=CANONICAL_FINDINGS, uncertain=CANONICAL_FINDINGS, extra_tokens=())
    assert vocab.decode(vocab.tokens_for(r)) == prompt_for(r)
    parts = parse_prompt(prompt_for(r))
    assert parts.findings == CANONICAL_FINDINGS and parts.uncertain == CANONICAL_FINDINGS


def test_empty_prompt_is_the_null_condition():
    vocab = Vocabulary.default(max_len=8)
    assert vocab.encode("") == [NULL_ID] + [PAD_ID] * 7
    assert vocab.decode(vocab.encode("")) == ""
    null = vocab.null_tokens(3)
    assert null.dtype == torch.long and null.shape == (3, 8)
    assert torch.equal(null, torch.tensor([vocab.encode("")] * 3))


def test_token_kinds_and_ids_are_stable():
    vocab = Vocabulary.default()
    assert vocab.tokens[:2] == ["<pad>", "<null>"]
    kinds = vocab.token_kinds
    assert kinds[0] == kinds[1] == "special"
    for token, kind in [("frontal", "view"), ("AP", "projection"), ("female", "sex"), ("60s", "age"),
                        ("cardiomegaly", "finding"), ("uncertain edema", "uncertain")]:
        assert kinds[vocab.id_of(token)] == kind
    # NIH's "Effusion" and CheXpert's "Pleural Effusion" are one token; NIH-only findings exist too.
    assert "effusion" not in vocab and "pleural effusion" in vocab and "pleural thickening" in vocab
    bigger = vocab.with_extra_tokens(["plant000", "ctrl000"])
    assert bigger.tokens[: len(vocab)] == vocab.tokens
    assert bigger.token_kinds[-2:] == ["extra", "extra"]
    assert bigger.with_extra_tokens(["plant000"]) == bigger


def test_vocab_save_load(tmp_path):
    vocab = Vocabulary.default(["pt00012", "plant001"], max_len=16)
    vocab.save(str(tmp_path / "vocab.json"))
    loaded = Vocabulary.load(str(tmp_path / "vocab.json"))
    assert loaded == vocab and loaded.max_len == 16 and len(loaded) == len(vocab)
    (tmp_path / "bad.json").write_text('{"format": "memdiff-vocabulary"}')
    with pytest.raises(ValueError, match="bad.json.*max_len"):
        Vocabulary.load(str(tmp_path / "bad.json"))


def test_bad_prompts_and_tokens_are_named():
    vocab = Vocabulary.default()
    with pytest.raises(ValueError, match="'broken leg'"):
        vocab.encode("frontal chest x-ray: broken leg")
    with pytest.raises(ValueError, match="'tok9'"):
        vocab.encode("frontal chest x-ray | tok9")
    with pytest.raises(ValueError, match="collides"):
        vocab.with_extra_tokens(["frontal"])
    with pytest.raises(ValueError, match="max_len"):
        Vocabulary.default(max_len=4).encode("frontal AP chest x-ray, male, 60s: edema")
