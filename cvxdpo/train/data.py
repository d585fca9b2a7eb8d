"""From the config's `data` and `tokenizer` sections to train/held-out sources and a tokenizer.

`data.eval_fraction=0` (with no `data.eval_path`) asks for no held-out split:
the held-out source is then empty and training runs without held-out
evaluation.
"""

from __future__ import annotations

import itertools
import os

from absl import logging

from cvxdpo.data import hh, imdb, jsonl, pipeline, shp, tutor
from cvxdpo.data.records import split_by_hash
from cvxdpo.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from cvxdpo.errors import ConfigError, DataError, MissingFileError

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


def _tutor_sources(c, cache_dir: str):
    """(train, held-out) tutor pairs: the eval file's pairs when given, else the pairs of held-out conversations
    that share no chosen or rejected text with training (`tutor.load_tutor_split` gives the sizes)."""
    d = c.data
    options = dict(slide=d.slide, with_history=d.with_history, strict=d.strict, cache_dir=cache_dir,
                   max_row_bytes=d.max_row_bytes)
    if d.eval_path:
        train = tutor.load_tutor_pairs(d.path or None, **options)
        logging.info("tutor: %s", train.summary())
        return train.pairs, tutor.load_tutor_pairs(d.eval_path, **options).pairs
    split = tutor.load_tutor_split(d.path or None, d.eval_fraction, **options)
    logging.info("tutor: %s", split.summary())
    return split.train, split.held_out


def load_sources(c, tokenizer: Tokenizer | None, cache_dir: str):
    """(train source, held-out source) of Pair records. IMDb pairs need the tokenizer (prefix prompts)."""
    d, strict, row_cap = c.data, c.data.strict, c.data.max_row_bytes
    if d.source == "tutor":
        return _tutor_sources(c, cache_dir)
    if d.source == "shp":
        root = shp.download(cache_dir, d.split, d.domains) if d.path == "hub" else _need_path(c)
        eval_root = shp.download(cache_dir, d.eval_split, d.domains) if d.path == "hub" else root
        cap = d.max_pairs_per_post or None
        return (shp.SHPSource(root, d.split, d.domains, cap, strict=strict, max_row_bytes=row_cap),
                shp.SHPSource(eval_root, d.eval_split, d.domains, cap, strict=strict, max_row_bytes=row_cap))
    if d.source == "imdb":
        train, _ = imdb.load_reviews(_need_path(c), d.split, strict, cache_dir, row_cap)
        if d.eval_path or d.path == "hub" or os.path.isdir(d.path):
            held, _ = imdb.load_reviews(d.eval_path or d.path, d.eval_split, strict, cache_dir, row_cap)
        else:  # one CSV: hold out a hash split of its reviews (never the file's own test rows)
            train, held = (list(part) for part in split_by_hash(train, d.eval_fraction, key=lambda i: train[i].text))
        if c.train.method == "sft":
            return imdb.sft_examples(train), imdb.sft_examples(held)
        return (imdb.labeled_pairs(train, tokenizer, c.train.seed),
                imdb.labeled_pairs(held, tokenizer, c.train.seed) if held else [])
    if d.source == "hh":
        if d.path == "hub":
            return hh.hh_from_hub(cache_dir, d.split, strict, row_cap), hh.hh_from_hub(cache_dir, d.eval_split,
                                                                                      strict, row_cap)
        return _split_or_eval_file(c, hh.hh_source(_need_path(c), strict, cache_dir, row_cap),
                                   lambda p: hh.hh_source(p, strict, cache_dir, row_cap))
    return _split_or_eval_file(c, jsonl.jsonl_source(_need_path(c), strict, cache_dir, row_cap),
                               lambda p: jsonl.jsonl_source(p, strict, cache_dir, row_cap))


def _check_sizes(c, train, held_out) -> None:
    """No training examples is an error naming the data; no held-out ones is what eval_fraction=0 asks for,
    and worth a warning when it was not asked for."""
    d = c.data
    where = f"data.path={d.path!r}" if d.path else "the bundled tutor conversations"
    if len(train) == 0:
        raise DataError(f"{where} (data.source={d.source}) gave no usable training examples (skipped rows are "
                        "named in the warnings above)")
    if len(held_out) == 0:
        if d.eval_path:
            raise DataError(f"data.eval_path={d.eval_path!r} (data.source={d.source}) gave no usable examples")
        if d.eval_fraction > 0:
            logging.warning("data.eval_fraction=%g held out none of the %d examples of %s; training without "
                            "held-out evaluation", d.eval_fraction, len(train), where)


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
    tokenize_config(c)  # impossible lengths, buckets or truncation: said before any data is read
    cache_dir = c.data.cache_dir or os.path.join(workdir, "cache")
    tokenizer = load_tokenizer(c.tokenizer.spec) if c.tokenizer.spec != "train" else _saved_tokenizer(c, workdir)
    if tokenizer is not None:
        train, held_out = load_sources(c, tokenizer, cache_dir)
        _check_sizes(c, train, held_out)
        return tokenizer, train, held_out
    if c.data.source == "imdb" and c.train.method != "sft":
        raise ConfigError("tokenizer.spec='train' for IMDb pairs needs the SFT run's tokenizer (its prompts are "
                          "token prefixes): set train.init_from to that run")
    train, held_out = load_sources(c, None, cache_dir)
    _check_sizes(c, train, held_out)
    texts = (t for p in itertools.islice(iter(train), BPE_TRAINING_TEXTS)
             for t in (p.prompt, p.chosen, p.rejected or "") if t)
    tokenizer = train_bpe(texts, c.tokenizer.vocab_size, os.path.join(workdir, "tokenizer"))
    logging.info("trained a byte-level BPE of %d tokens on the training texts", tokenizer.vocab_size)
    return tokenizer, train, held_out


def init_from_dir(path: str) -> str:
    """The exported model directory of a finished run named by `train.init_from`."""
    hf_dir = os.path.join(path, "hf")
    if not os.path.isdir(path):
        raise MissingFileError(f"train.init_from={path!r} " + ("is not a run's directory" if os.path.exists(path)
                                                                 else "does not exist"))
    if not os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        raise MissingFileError(f"train.init_from={path!r} holds no finished run's model ({hf_dir}/model.safetensors); "
                               "run that training to its end first")
    return hf_dir
