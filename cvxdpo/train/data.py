"""From the config's `data` and `tokenizer` sections to train/held-out sources and a tokenizer."""

from __future__ import annotations

import itertools
import os

from absl import logging

from cvxdpo.data import hh, imdb, jsonl, pipeline, shp, tutor
from cvxdpo.data.records import split_by_hash
from cvxdpo.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from cvxdpo.errors import ConfigError, MissingFileError

BPE_TRAINING_TEXTS = 20_000  # pairs whose texts train a from-scratch tokenizer


def tokenize_config(c) -> pipeline.TokenizeConfig:
    return pipeline.TokenizeConfig(max_length=c.data.max_length, max_prompt_length=c.data.max_prompt_length,
                                   truncation=c.data.truncation, buckets=tuple(c.data.buckets))


def _need_path(c) -> str:
    if not c.data.path:
        raise ConfigError(f"data.path is required for data.source={c.data.source!r}")
    return c.data.path


def _split_or_eval_file(c, source, load_file):
    """(train, held-out): the eval file when given, else a hash split of the training source."""
    if c.data.eval_path:
        return source, load_file(c.data.eval_path)
    return split_by_hash(source, c.data.eval_fraction)


def _tutor_sources(c):
    """(train, held-out) tutor pairs: the eval file's pairs when given, else the pairs of held-out conversations
    that share no chosen or rejected text with training (`tutor.load_tutor_split` gives the sizes)."""
    d = c.data
    options = dict(slide=d.slide, with_history=d.with_history, strict=d.strict)
    if d.eval_path:
        train = tutor.load_tutor_pairs(d.path or None, **options)
        logging.info("tutor: %s", train.summary())
        return train.pairs, tutor.load_tutor_pairs(d.eval_path, **options).pairs
    split = tutor.load_tutor_split(d.path or None, d.eval_fraction, **options)
    logging.info("tutor: %s", split.summary())
    return split.train, split.held_out


def load_sources(c, tokenizer: Tokenizer | None, cache_dir: str):
    """(train source, held-out source) of Pair records. IMDb pairs need the tokenizer (prefix prompts)."""
    d, strict = c.data, c.data.strict
    if d.source == "tutor":
        return _tutor_sources(c)
    if d.source == "shp":
        root = shp.download(cache_dir, d.split, d.domains) if d.path == "hub" else _need_path(c)
        eval_root = shp.download(cache_dir, d.eval_split, d.domains) if d.path == "hub" else root
        cap = d.max_pairs_per_post or None
        return (shp.SHPSource(root, d.split, d.domains, cap, strict=strict),
                shp.SHPSource(eval_root, d.eval_split, d.domains, cap, strict=strict))
    if d.source == "imdb":
        train, _ = imdb.load_reviews(_need_path(c), d.split, strict, cache_dir)
        if d.eval_path or d.path == "hub" or os.path.isdir(d.path):
            held, _ = imdb.load_reviews(d.eval_path or d.path, d.eval_split, strict, cache_dir)
        else:  # one CSV: hold out a hash split of its reviews (never the file's own test rows)
            train, held = (list(part) for part in split_by_hash(train, d.eval_fraction, key=lambda i: train[i].text))
        if c.train.method == "sft":
            return imdb.sft_examples(train), imdb.sft_examples(held)
        return (imdb.labeled_pairs(train, tokenizer, c.train.seed), imdb.labeled_pairs(held, tokenizer, c.train.seed))
    if d.source == "hh":
        if d.path == "hub":
            return hh.hh_from_hub(cache_dir, d.split, strict), hh.hh_from_hub(cache_dir, d.eval_split, strict)
        return _split_or_eval_file(c, hh.hh_source(_need_path(c), strict, cache_dir),
                                   lambda p: hh.hh_source(p, strict, cache_dir))
    return _split_or_eval_file(c, jsonl.jsonl_source(_need_path(c), strict, cache_dir),
                               lambda p: jsonl.jsonl_source(p, strict, cache_dir))


def _saved_tokenizer(c, workdir: str) -> Tokenizer | None:
    """A BPE trained earlier: the one exported by the `init_from` run (so SFT and DPO share a vocabulary),
    or this workdir's own from a previous start."""
    for directory in (os.path.join(c.train.init_from, "hf") if c.train.init_from else None,
                      os.path.join(workdir, "tokenizer")):
        if directory and os.path.exists(os.path.join(directory, "tokenizer.json")):
            return load_tokenizer(directory)
    return None


def load_data(c, workdir: str) -> tuple[Tokenizer, object, object]:
    """(tokenizer, train source, held-out source), each source loaded once.

    `tokenizer.spec="train"` fits a byte-level BPE on the training texts, once
    per workdir; downloads and decompressed copies go to `data.cache_dir`
    (default <workdir>/cache).
    """
    cache_dir = c.data.cache_dir or os.path.join(workdir, "cache")
    tokenizer = load_tokenizer(c.tokenizer.spec) if c.tokenizer.spec != "train" else _saved_tokenizer(c, workdir)
    if tokenizer is not None:
        return (tokenizer, *load_sources(c, tokenizer, cache_dir))
    if c.data.source == "imdb" and c.train.method != "sft":
        raise ConfigError("tokenizer.spec='train' for IMDb pairs needs the SFT run's tokenizer (its prompts are "
                          "token prefixes): set train.init_from to that run")
    train, held_out = load_sources(c, None, cache_dir)
    texts = (t for p in itertools.islice(iter(train), BPE_TRAINING_TEXTS)
             for t in (p.prompt, p.chosen, p.rejected or "") if t)
    tokenizer = train_bpe(texts, c.tokenizer.vocab_size, os.path.join(workdir, "tokenizer"))
    logging.info("trained a byte-level BPE of %d tokens on the training texts", tokenizer.vocab_size)
    return tokenizer, train, held_out


def init_from_dir(path: str) -> str:
    """The exported model directory of a finished run named by `train.init_from`."""
    hf_dir = os.path.join(path, "hf")
    if not os.path.isdir(path):
        raise MissingFileError(f"train.init_from={path!r} does not exist")
    if not os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        raise MissingFileError(f"train.init_from={path!r} holds no finished run's model ({hf_dir}/model.safetensors); "
                               "run that training to its end first")
    return hf_dir
