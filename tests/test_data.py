"""Data sources and the Grain pipeline: pair rules, truncation and masks, resume, sharding, bad rows."""

import json
import logging
import os

import numpy as np
import pytest

from cvxdpo.data import hh, imdb, jsonl, pipeline, shp, tutor
from cvxdpo.data.records import Pair
from cvxdpo.data.tokenizer import load_tokenizer
from cvxdpo.errors import ConfigError, DataError, MissingFileError
from data_fixtures import SHP_CARD_ROW, shp_row, write_acl_imdb, write_jsonl

CONVERSATION = {
    "sample_id": 7, "length": 1, "temperature": 0.2, "initial_utterance": "Hello.", "n": 5,
    "agent1": "You are a tutor.", "agent2": "You are a student.",
    "utterances": [["agent1", "Hello! Ready?"], ["agent2", "What is DNA?"], ["agent1", "DNA carries genes."],
                   ["agent2", "Thanks!"], ["agent1", "Thanks!"]],
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


# --- the tutor set and the alternating strategy ------------------------------------------------

def test_alternating_pairs_exactly():
    conv = tutor.parse_conversation(CONVERSATION)
    pairs, dropped = tutor.alternating_pairs(conv)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("Hello! Ready?", "What is DNA?", "DNA carries genes.")]
    assert dropped == 0
    pairs, dropped = tutor.alternating_pairs(conv, slide=True)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Hello! Ready?", "What is DNA?", "DNA carries genes."),
        ("What is DNA?", "DNA carries genes.", "Thanks!"),
    ]
    assert dropped == 1  # position 2: chosen "Thanks!" equals rejected "Thanks!"
    pairs, _ = tutor.alternating_pairs(conv, slide=True, with_history=True)
    assert pairs[1].prompt == "Hello! Ready?\n\nWhat is DNA?"
    assert pairs[1].meta == {"position": 1, "sample_id": 7}


def test_chat_layout_gives_the_same_pairs(tmp_path):
    messages = [{"role": s, "content": t} for s, t in CONVERSATION["utterances"]]
    path = write_jsonl(str(tmp_path / "chat.jsonl"), [{"messages": messages}, messages])
    result = tutor.load_tutor_pairs(path, slide=True)
    assert result.conversations == 2
    assert [(p.prompt, p.chosen, p.rejected) for p in result.pairs[:2]] == [
        ("Hello! Ready?", "What is DNA?", "DNA carries genes."), ("What is DNA?", "DNA carries genes.", "Thanks!")]


def test_bundled_tutor_set():
    import gzip

    with gzip.open(tutor.bundled_path(), "rt") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 4000
    assert all(set(tutor.SCHEMA_FIELDS) <= set(r) for r in rows)
    assert {r["subject"] for r in rows} == set(tutor.PAPER_SUBJECTS)  # 15 entries, 14 distinct subjects
    assert all(r["n"] == len(r["utterances"]) for r in rows)
    assert all([s for s, _ in r["utterances"]][:2] == ["agent1", "agent2"] for r in rows)
    texts = [t for r in rows for _, t in r["utterances"]]
    assert len(set(texts)) / len(texts) > 0.5  # composed text, not a handful of templates
    assert len(tutor.load_tutor_pairs().pairs) == 4000


def test_tutor_held_out_shares_no_text_with_training():
    """The default run's split (slide=True, eval_fraction=0.05): held-out conversations give no training pair,
    and no held-out chosen or rejected text is a training pair's text (a plain split by conversation leaked
    83% of held-out pairs through the conversations' shared template lines)."""
    from cvxdpo.config import default_config
    from cvxdpo.train.data import load_sources

    c = default_config()
    train, held_out = load_sources(c, None, "")
    seen = {t for p in train for t in (p.prompt, p.chosen, p.rejected)}
    assert not [p for p in held_out if p.chosen in seen or p.rejected in seen]
    assert not {p.meta["sample_id"] for p in train} & {p.meta["sample_id"] for p in held_out}
    assert (len(train), len(held_out)) == (24922, 244)
    again = tutor.load_tutor_split(None, c.data.eval_fraction, slide=True)
    assert again.held_out == held_out and again.leaked == 1178


def test_tutor_split_without_sample_ids_is_by_conversation(tmp_path):
    """Chat-layout files have no sample_id: conversations are told apart by their position in the file."""
    rows = [{"messages": [{"role": s, "content": f"{t} ({k})"} for s, t in CONVERSATION["utterances"]]}
            for k in range(40)]
    split = tutor.load_tutor_split(write_jsonl(str(tmp_path / "chat.jsonl"), rows), 0.25)
    assert split.held_out_conversations == len(split.held_out) > 0 and len(split.train) > 0


# --- SHP -----------------------------------------------------------------------------------------

@pytest.fixture
def card_row(shared_data):
    with open(os.path.join(shared_data, SHP_CARD_ROW)) as f:
        return json.loads(f.readline())


def test_shp_card_row_parses_unchanged(tmp_path, shared_data, card_row):
    os.makedirs(tmp_path / "askculinary")
    with open(os.path.join(shared_data, SHP_CARD_ROW)) as src:
        (tmp_path / "askculinary" / "train.json").write_text(src.read())
    assert len(card_row) == 15 and set(card_row) == set(shp.FIELDS)
    source = shp.SHPSource(str(tmp_path))
    assert len(source) == 1 and source.bad.total == 0
    pair = source[0]
    assert pair.prompt == "\n\nHuman: " + card_row["history"] + "\n\nAssistant:"
    assert pair.chosen == " " + card_row["human_ref_A"]  # labels = 1: A preferred
    assert pair.rejected == " " + card_row["human_ref_B"]
    assert pair.sft_target == " " + card_row["human_ref_A"]  # score 340 beats 166


def test_shp_rules(tmp_path, card_row):
    rows = [
        shp_row(card_row),                                                   # kept, A preferred (340 vs 166)
        shp_row(card_row, labels=0, score_A=50, score_B=400, human_ref_A="low", human_ref_B="best"),  # B preferred
        shp_row(card_row, score_A=300, score_B=200),                         # ratio 1.5 < 2: dropped
        shp_row(card_row, score_A=90, score_B=30, human_ref_A="x", human_ref_B="y"),  # kept, but over the cap of 2
        shp_row(card_row, post_id="other", history="Another post", score_A=10, score_B=40, labels=0),
    ]
    write_jsonl(str(tmp_path / "askculinary" / "train.json"), rows)
    source = shp.SHPSource(str(tmp_path), max_pairs_per_post=2)
    pairs = [source[i] for i in range(len(source))]
    assert len(pairs) == 3
    assert (pairs[1].chosen, pairs[1].rejected) == (" best", " low")
    assert all(p.sft_target == " best" for p in pairs[:2])  # the post's best-scored response (400)
    assert pairs[2].prompt == "\n\nHuman: Another post\n\nAssistant:"
    assert pairs[2].chosen == " " + card_row["human_ref_B"]
    assert len(shp.SHPSource(str(tmp_path))) == 4  # no cap: the fourth row is back


def _shp_hub_copy(root, card_row, domains=("askbaking", "askphysics", "legaladvice"), rows=30):
    """A local copy in the hub's layout: posts of 3 rows, every 4th row under the score-ratio rule; (root, the
    (post, chosen) pairs SHPSource must keep with max_pairs_per_post=2, computed here from the rows)."""
    kept, per_post = [], {}
    for domain in domains:
        written = []
        for k in range(rows):
            post = f"{domain}-{k // 3}"
            scores = (30, 20) if k % 4 == 3 else (10 + k, 40 + 3 * k)
            written.append(shp_row(card_row, post_id=post, history=f"Question {post}", score_A=scores[0],
                                   score_B=scores[1], labels=int(scores[0] > scores[1]),
                                   human_ref_A=f"A {domain} {k}", human_ref_B=f"B {domain} {k}"))
            if k % 4 != 3 and per_post.get(post, 0) < 2:
                per_post[post] = per_post.get(post, 0) + 1
                kept.append((post, f" B {domain} {k}"))  # B always scores higher on kept rows
        write_jsonl(os.path.join(root, domain, "train.json"), written)
    return root, kept


def test_shp_on_several_processes_reads_each_pair_once_and_resumes(tmp_path, card_row, tok):
    """Three processes, each indexing its own SHPSource of the files, stream one epoch: their parts are
    disjoint, their union is every kept pair exactly once, and each one stopped after 2 batches and restored
    from its own iterator state continues exactly where it was."""
    root, expected = _shp_hub_copy(str(tmp_path / "shp"), card_row)
    cfg = pipeline.TokenizeConfig(max_length=64, max_prompt_length=32)
    processes, stop = 3, 2

    def stream(index):
        source = shp.SHPSource(root, max_pairs_per_post=2)
        return source, iter(pipeline.make_dataset(source, tok, cfg, 6, seed=5, num_epochs=1, shard_index=index,
                                                  shard_count=processes))

    def indices(batches):
        return [int(i) for b in batches for i, w in zip(b["index"], b["weight"]) if w > 0]

    parts = []
    for index in range(processes):
        source, straight = stream(index)
        whole = indices(straight)
        _, first = stream(index)
        head = [next(first) for _ in range(stop)]
        _, resumed = stream(index)
        resumed.set_state(first.get_state())
        assert indices(head) + indices(resumed) == whole
        parts.append(whole)
    assert all(not set(a) & set(b) for k, a in enumerate(parts) for b in parts[k + 1:])
    assert sorted(sum(parts, [])) == list(range(len(source)))
    assert sorted((source[i].meta["post_id"], source[i].chosen) for i in sum(parts, [])) == sorted(expected)


def test_shp_domain_filter_and_errors(tmp_path, card_row):
    write_jsonl(str(tmp_path / "askculinary" / "train.json"), [card_row])
    write_jsonl(str(tmp_path / "askbaking" / "train.json"), [shp_row(card_row, post_id="b")])
    assert len(shp.SHPSource(str(tmp_path), domains=["askbaking"])) == 1
    assert len(shp.SHPSource(str(tmp_path))) == 2
    with pytest.raises(ConfigError, match="SHP split 'dev' is unknown"):
        shp.SHPSource(str(tmp_path), split="dev")
    with pytest.raises(ConfigError, match="SHP domain\\(s\\) askcooking unknown"):
        shp.SHPSource(str(tmp_path), domains=["askcooking"])
    with pytest.raises(MissingFileError, match="has no train.json for domain\\(s\\) askvet"):
        shp.SHPSource(str(tmp_path), domains=["askvet"])
    with pytest.raises(MissingFileError, match="SHP directory .* does not exist"):
        shp.SHPSource(str(tmp_path / "nope"))


# --- IMDb and HH ---------------------------------------------------------------------------------

def test_imdb_sample_csv(shared_data):
    path = os.path.join(shared_data, "imdb_sample_1k.csv")
    train, bad = imdb.load_reviews(path, "train")
    test, _ = imdb.load_reviews(path, "test")
    assert (len(train), len(test), bad.total) == (800, 200, 0)
    assert sum(r.label for r in train + test) == 476
    assert all("<br />" not in r.text for r in train)


def test_imdb_acl_directory_and_prompts(tmp_path, tok):
    root = write_acl_imdb(str(tmp_path / "aclImdb"), {
        ("train", "pos"): ["A wonderful film.<br /><br />Loved it.", "Great acting throughout the whole movie."],
        ("train", "neg"): ["Dull and far too long.", ""], ("test", "pos"): ["Fine."], ("test", "neg"): ["Bad."]})
    reviews, bad = imdb.load_reviews(root, "train")
    assert sorted((r.text, r.label) for r in reviews) == [
        ("A wonderful film.\nLoved it.", 1), ("Dull and far too long.", 0), ("Great acting throughout the whole movie.", 1)]
    assert bad.counts == {"empty text": 1}
    prompts = imdb.prefix_prompts(reviews, tok, seed=0)
    for (prompt, label), review in zip(prompts, reviews):
        n = len(tok.encode(prompt))
        assert 2 <= n <= 8 and review.text.startswith(prompt) and label == review.label
    sft = imdb.sft_examples(reviews)
    assert sft[0].prompt == "" and sft[0].target == reviews[0].text and sft[0].rejected is None


def test_hh_prompt_is_the_shared_prefix(tmp_path):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: Paris."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: No idea."
    other = "\n\nHuman: Hey\n\nAssistant: Hi"
    path = write_jsonl(str(tmp_path / "hh.jsonl"), [{"chosen": chosen, "rejected": rejected},
                                                    {"chosen": chosen, "rejected": other}])
    source = hh.hh_source(path)
    assert len(source) == 1 and source.bad.counts == {"bad value": 1}
    pair = source[0]
    assert pair.prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" Paris.", " No idea.")


def test_gzipped_jsonl(tmp_path):
    import gzip

    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    source = jsonl.jsonl_source(str(tmp_path / "pairs.jsonl.gz"), cache_dir=str(tmp_path / "cache"))
    assert source[0] == Pair("p", "c", "r")


# --- tokenization, truncation, masks -------------------------------------------------------------

def _tokens(tok, text):
    return tok.encode(text)


def test_loss_mask_covers_exactly_response_and_eos(tok):
    pair = Pair("Question here", " an answer", " a worse one")
    cfg = pipeline.TokenizeConfig(max_length=32, max_prompt_length=16)
    out = pipeline.Tokenize(tok, cfg, "pairs").map((0, pair))
    prompt = _tokens(tok, "Question here")
    for row, response in zip(range(2), (" an answer", " a worse one")):
        expected = prompt + _tokens(tok, response) + [tok.eos_id]
        assert out["input_ids"][row].tolist() == expected
        assert out["loss_mask"][row].tolist() == [0] * len(prompt) + [1] * (len(expected) - len(prompt))


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation(tok, mode):
    prompt = list(range(100, 130))  # 30 prompt tokens
    chosen, rejected = list(range(1, 21)), list(range(21, 26))  # 20 and 5 tokens
    cfg = pipeline.TokenizeConfig(max_length=24, max_prompt_length=10, truncation=mode)
    p, (c, r) = pipeline.truncate(prompt, [chosen, rejected], cfg)
    assert p == (prompt[:10] if mode == "keep_start" else prompt[-10:])
    assert c == chosen[:14] and r == rejected  # responses cut to max_length - prompt
    p2, (c2, _) = pipeline.truncate(prompt[:3], [chosen, rejected], cfg)
    assert p2 == prompt[:3] and c2 == chosen  # 3 + 20 fits: nothing cut


def test_batches_have_bucketed_shapes(tok):
    pairs = [Pair("q" * k, " yes", " no") for k in range(1, 9)]
    cfg = pipeline.TokenizeConfig(max_length=64, max_prompt_length=32, buckets=(8, 16))
    batches = list(pipeline.make_dataset(pairs, tok, cfg, 4, shuffle=False, num_epochs=1))
    assert all(b["input_ids"].shape[:2] == (4, 2) for b in batches)
    assert {b["input_ids"].shape[2] for b in batches} <= {8, 16, 64}
    for b in batches:
        assert (b["attention_mask"].sum(-1) <= b["input_ids"].shape[2]).all()
        assert ((b["loss_mask"] == 1) <= (b["attention_mask"] == 1)).all()


def test_resume_yields_the_uninterrupted_batches(tok):
    pairs = tutor.load_tutor_pairs().pairs[:200]
    cfg = pipeline.TokenizeConfig(max_length=96, max_prompt_length=32)

    def fresh():
        return iter(pipeline.make_dataset(pairs, tok, cfg, 8, seed=3))

    straight = fresh()
    expected = [next(straight) for _ in range(40)]  # 320 examples: crosses an epoch boundary
    it = fresh()
    for _ in range(23):
        next(it)
    state = it.get_state()
    resumed = fresh()
    resumed.set_state(state)
    for want in expected[23:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_two_processes_see_disjoint_halves(tok):
    pairs = [Pair(f"prompt {i}", f" chosen {i}", f" rejected {i}") for i in range(32)]
    cfg = pipeline.TokenizeConfig(max_length=16, max_prompt_length=8)
    seen = []
    for index in range(2):
        ds = pipeline.make_dataset(pairs, tok, cfg, 8, seed=0, num_epochs=1, shard_index=index, shard_count=2)
        rows = [tok.decode(b["input_ids"][k, 0][b["loss_mask"][k, 0] == 1]) for b in ds for k in range(4)]
        assert all(b["input_ids"].shape[0] == 4 for b in ds)  # each process holds half the global batch
        seen.append(set(rows))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 32


def test_worker_processes_give_the_same_batches(tok):
    pairs = tutor.load_tutor_pairs().pairs[:64]
    cfg = pipeline.TokenizeConfig(max_length=96, max_prompt_length=32)
    plain = list(pipeline.make_dataset(pairs, tok, cfg, 8, seed=1, num_epochs=1))
    workers = list(pipeline.make_dataset(pairs, tok, cfg, 8, seed=1, num_epochs=1, worker_count=2))
    assert len(plain) == len(workers) == 8
    for a, b in zip(plain, workers):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


# --- bad rows and files --------------------------------------------------------------------------

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


@pytest.mark.parametrize("line, reason", [
    (json.dumps({"prompt": "p", "chosen": "c"}), "missing field: 'rejected'"),
    (json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"}), "wrong type: 'chosen' is int"),
    (json.dumps({"prompt": "p", "chosen": "  ", "rejected": "r"}), "empty text: 'chosen'"),
    ('{"prompt": "p", "chosen": ', "broken JSON"),
    (b'{"prompt": "p\xff", "chosen": "c", "rejected": "r"}', "not UTF-8"),
], ids=["missing-field", "wrong-type", "empty-text", "broken-json", "bad-utf8"])
def test_bad_row_is_counted_skipped_and_named(tmp_path, caplog, line, reason):
    path = tmp_path / "pairs.jsonl"
    with open(path, "wb") as f:
        for row in (json.dumps(GOOD).encode(), line.encode() if isinstance(line, str) else line, json.dumps(GOOD).encode()):
            f.write(row + b"\n")
    with caplog.at_level(logging.WARNING):
        source = jsonl.jsonl_source(str(path))
    assert len(source) == 2 and source.bad.total == 1
    assert f"{path}:2" in caplog.text and reason in caplog.text
    assert "1 rows skipped" in source.bad.summary()
    with pytest.raises(DataError, match=f"{path}:2: {reason}"):
        jsonl.jsonl_source(str(path), strict=True)


def test_missing_files_are_one_clear_error(tmp_path):
    with pytest.raises(MissingFileError, match="data file .*nope.jsonl' does not exist"):
        jsonl.jsonl_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(MissingFileError, match="conversation file .* does not exist"):
        tutor.load_tutor_pairs(str(tmp_path / "nope.jsonl"))
    with pytest.raises(MissingFileError, match="has no train/pos/ folder"):
        imdb.load_reviews(str(tmp_path), "train")
    with pytest.raises(ConfigError, match="IMDb split 'valid' is unknown"):
        imdb.load_reviews(str(tmp_path), "valid")


def test_sft_only_examples_cannot_make_pairs(tok):
    cfg = pipeline.TokenizeConfig(max_length=16, max_prompt_length=8)
    with pytest.raises(DataError, match="needs rejected responses"):
        pipeline.Tokenize(tok, cfg, "pairs").map((0, Pair("", "a review")))
