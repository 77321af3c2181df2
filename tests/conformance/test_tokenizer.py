"""Tests for uio.tokenizer against the conformance oracle (tokenizer/cases.json)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from uio.tokenizer import T5Tokenizer, clean_up_tokenization, load_tokenizer

# Same location rule as conftest's ``conformance`` fixture; only used to build parameters.
_DEFAULT = Path(__file__).resolve().parents[3] / "shared" / "conformance"
CASES_FILE = Path(os.environ.get("UIO_CONFORMANCE", _DEFAULT)) / "tokenizer" / "cases.json"


def _cases(key: str) -> list:
    """Entries of ``cases.json[key]`` for parametrization (empty when the oracle is absent)."""
    if not CASES_FILE.is_file():
        return []
    data = json.loads(CASES_FILE.read_text())[key]
    return list(data.items()) if isinstance(data, dict) else data


def _id(case) -> str:
    text = case.get("text") if isinstance(case, dict) else case[0]
    return repr(text if isinstance(text, str) else case.get("ids"))[:40]


ENCODE = _cases("encode_cases")
DECODE = _cases("decode_cases")
BATCH = _cases("batch_cases")


@pytest.fixture(scope="module")
def spiece(conformance) -> Path:
    return conformance / "tokenizer" / "spiece.model"


@pytest.fixture(scope="module")
def tok(spiece) -> T5Tokenizer:
    return T5Tokenizer(spiece, extra_ids=1100, model_max_length=256)


# ---------------------------------------------------------------- oracle cases
def test_header(tok, conformance):
    header = json.loads((conformance / "tokenizer" / "cases.json").read_text())
    assert header["spiece_model"]["num_pieces"] == tok.sp_model.GetPieceSize()
    assert len(tok) == header["primary"]["len(tokenizer)"] == 33100
    assert len(ENCODE) > 0 and len(DECODE) > 0


@pytest.mark.parametrize("case", ENCODE, ids=_id)
def test_encode(tok, case):
    assert tok.encode(case["text"]) == case["input_ids"]
    assert tok.tokenize(case["text"]) == case["pieces"]


@pytest.mark.parametrize("case", ENCODE, ids=_id)
def test_runner_call(tok, case):
    out = tok([case["text"]], max_length=64, truncation=True, padding="longest")
    assert out.dtype == np.int32 and out.shape == (1, len(case["runner_call_ids"]))
    assert out[0].tolist() == case["runner_call_ids"]


@pytest.mark.parametrize("case", ENCODE, ids=_id)
def test_encode_other_versions_agree(tok, case):
    """Versions that differ from primary must not exist (only legacy=False differs)."""
    for key in ("transformers_4_20_1_input_ids", "transformers_5_24_0_input_ids"):
        if key in case:
            assert tok.encode(case["text"]) == case[key]
    if "legacy_false_input_ids" in case:  # we implement legacy=True: these must differ
        assert case["legacy_false_input_ids"] != case["input_ids"]


@pytest.mark.parametrize("name,case", BATCH, ids=[name for name, _ in BATCH])
def test_batch(tok, name, case):
    padding = "max_length" if "padding='max_length'" in case["call"] else "longest"
    out = tok.batch_encode(case["texts"], max_length=64, truncation=True, padding=padding)
    assert out.dtype == np.int32
    assert out.tolist() == case["input_ids"]


def _is_error(value) -> bool:
    return isinstance(value, dict) and "error" in value


@pytest.mark.parametrize("case", DECODE, ids=_id)
def test_decode_matches_4_20_1(tok, case):
    """The reference's goldens were made with transformers 4.20.1: that is the text we give."""
    expected = case["transformers_4_20_1_text"]
    assert tok.decode(case["ids"], skip_special_tokens=False) == expected
    assert tok.decode(np.asarray(case["ids"], dtype=np.int32)) == expected


@pytest.mark.parametrize("case", DECODE, ids=_id)
def test_decode_primary_text_understood(tok, case):
    """4.57.6 (primary ``text``) differs from 4.20.1 only by spaces around special tokens and
    the clean-up; it raises on ids >= 33100, where 4.20.1 gives '<extra_id_-N>'."""
    primary, old = case["text"], case["transformers_4_20_1_text"]
    if _is_error(primary):
        assert "out of range" in primary["error"]
        assert all(i >= len(tok) for i in case["ids"])
        assert old == "".join(f"<extra_id_{len(tok) - 1 - i}>" for i in case["ids"])
        return
    assert _squash(primary) == _squash(old)
    if primary != old:  # a special token is involved or a clean-up applied
        assert any(i in tok.all_special_ids for i in case["ids"]) or clean_up_tokenization(primary) != primary


def _squash(text: str) -> str:
    return clean_up_tokenization(text).replace(" ", "")


@pytest.mark.parametrize("case", DECODE, ids=_id)
def test_decode_skip_special_tokens(tok, case):
    expected = case["text_skip_special_tokens"]
    if _is_error(expected):
        return
    assert tok.decode(case["ids"], skip_special_tokens=True, clean_up_tokenization_spaces=False) == expected
    assert tok.decode(case["ids"], skip_special_tokens=True) == clean_up_tokenization(expected)


def test_batch_decode(tok):
    rows = [c["ids"] for c in DECODE]
    assert tok.batch_decode(rows) == [c["transformers_4_20_1_text"] for c in DECODE]


# ---------------------------------------------------------------- layout / unit tests
def test_special_ids(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<pad>", "</s>", "<unk>"]) == [0, 1, 2]
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 33099
    assert tok.convert_tokens_to_ids("<extra_id_1099>") == 32000
    assert tok.convert_ids_to_tokens(32999 - 7) == "<extra_id_107>"
    assert len(tok.all_special_ids) == 1103


def test_location_tokens_round_trip(tok):
    """The runner writes and parses '<extra_id_{100+q}>' location strings."""
    for q in (0, 1, 499, 998, 999):
        token = f"<extra_id_{100 + q}>"
        assert tok.encode(token) == [32999 - q, 1]
        assert tok.decode([32999 - q]) == token


def test_text_round_trip(tok):
    text = "what color is the sofa"
    assert tok.decode(tok.encode(text)[:-1]) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_literal_eos_not_doubled(tok):
    ids = tok.encode("a </s>")
    assert ids[-1] == 1 and ids.count(1) == 1


def test_truncation_keeps_eos(tok):
    long = " ".join(["word"] * 300)
    ids = tok.encode(long, max_length=10, truncation=True)
    assert len(ids) == 10 and ids[-1] == 1
    assert len(tok.encode(long, truncation=True)) == 256  # model_max_length


def test_padding_strategies(tok):
    out = tok(["a", "a cat"], max_length=8, padding="max_length")
    assert out.shape == (2, 8) and out[0, 2:].tolist() == [0] * 6
    assert tok("a").shape == (1, 2)
    assert tok(["a", "A"], padding=False).shape == (1 + 1, 2)
    with pytest.raises(ValueError):
        tok(["a", "a cat"], padding=False)
    with pytest.raises(ValueError):
        tok(["a"], padding="bogus")


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError):
        tok.decode([-1])
    with pytest.raises(ValueError):
        tok.decode([[1, 2]])
    assert tok.decode([]) == ""


def test_folder_source(spiece):
    assert len(T5Tokenizer(spiece.parent)) == 33100
    assert len(load_tokenizer(spiece)) == 33100


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        T5Tokenizer(tmp_path / "nope" / "spiece.model")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        T5Tokenizer(tmp_path)  # folder without spiece.model


def test_invalid_model(tmp_path):
    bad = tmp_path / "spiece.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="spiece.model"):
        T5Tokenizer(bad)
