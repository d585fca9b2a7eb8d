"""Evaluate any trained model on any split of preference pairs: accuracies with intervals, samples, survey.

    python -m launch.evaluate --model=runs/quickstart/dpo_convex --data_source=hh \\
        --data_path=helpful_base_test.jsonl.gz --out=eval_hh
    python -m launch.evaluate --model=RUN --reference=SFT_RUN --data_source=jsonl --data_path=pairs.jsonl \\
        --samples=4 --temperatures=0.25,0.5,0.75,1.0 --max_new_tokens=48 --out=eval_run
    python -m launch.evaluate --model=A --model=B --data_source=tutor --data_path=... --survey=20 --out=survey
    python -m launch.evaluate --tally=filled.csv --answer_key=survey/answer_key.json

Writes OUT/eval.json and OUT/eval.md (schema in the README, "Evaluating a model"). A file given with
--data_path is the split and is evaluated whole; `--data_path=hub` reads --split from the hub. The split is
shuffled with --seed, and --max_pairs takes a random subset of it, never the first N. Intervals are 95%
bootstrap intervals over prompts (pairs that share a conversation, post or prompt are resampled together).
"""

import json
import os

import jax
import numpy as np
from absl import flags, logging
from flax import nnx

from cvxdpo import mesh as mesh_lib
from cvxdpo.data import hh, imdb, jsonl, pipeline, shp, tutor
from cvxdpo.data.records import Subset
from cvxdpo.errors import ConfigError, DataError
from cvxdpo.eval import metrics as metrics_lib
from cvxdpo.eval import rewards as rewards_lib
from cvxdpo.eval import survey as survey_lib
from cvxdpo.model import hub
from cvxdpo.train import evaluation, objectives, sample_eval
from launch import common

MODELS = flags.DEFINE_multi_string("model", None, "A run's workdir or an exported model directory (its own "
                                   "tokenizer is used). Repeat it for --survey: every model answers.")
REFERENCE = flags.DEFINE_string("reference", None, "Reference model (e.g. the SFT run): adds reference_adjusted "
                                "accuracy and the KL of the samples.")
SOURCE = flags.DEFINE_enum("data_source", None, ["hh", "shp", "imdb", "jsonl", "tutor"], "Pair source.")
DATA_PATH = flags.DEFINE_string("data_path", None, "The split's file (or SHP/IMDb directory), or 'hub'.")
SPLIT = flags.DEFINE_string("split", "test", "Split to read from the hub (or an SHP/IMDb directory).")
MAX_PAIRS = flags.DEFINE_integer("max_pairs", 0, "Evaluate a random subset of this many pairs (0 = all).")
OUT = flags.DEFINE_string("out", None, "Output directory for eval.json and eval.md (survey files too).")
BATCH = flags.DEFINE_integer("batch_size", 16, "Pairs per forward pass.")
MAX_LENGTH = flags.DEFINE_integer("max_length", 512, "Tokens per prompt + response (truncated as in training).")
MAX_PROMPT = flags.DEFINE_integer("max_prompt_length", 256, "Prompt tokens kept.")
BETA = flags.DEFINE_float("beta", 0.1, "Scale of the reference-adjusted (implicit reward) margins.")
SEED = flags.DEFINE_integer("seed", 0, "Shuffle, subset, bootstrap and sampling seed.")
SAMPLES = flags.DEFINE_integer("samples", 0, "Completions per prompt for the sampling metrics (0 = none).")
TEMPERATURES = flags.DEFINE_list("temperatures", ["1.0"], "Sampling temperatures.")
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens per completion.")
MAX_PROMPTS = flags.DEFINE_integer("max_prompts", 64, "Prompts sampled from (a random subset of the split's).")
REWARD = flags.DEFINE_string("reward", None, f"Reward of the samples: one of {', '.join(rewards_lib.REWARDS)}.")
REWARD_MODEL = flags.DEFINE_string("reward_model", None, "Directory of the reward's model "
                                   "(tools/sentiment_reward.py train --out=DIR).")
BASELINE = flags.DEFINE_string("baseline", None, "Model whose samples (same prompts) the win rate is against.")
SURVEY = flags.DEFINE_integer("survey", 0, "Write a blinded survey of this many prompts answered by every "
                              "--model (survey.csv, survey.html; answer_key.json kept apart).")
TALLY = flags.DEFINE_multi_string("tally", None, "Filled survey CSV(s) to count (with --answer_key).")
ANSWER_KEY = flags.DEFINE_string("answer_key", None, "The survey's answer_key.json, for --tally.")
flags.adopt_module_key_flags(common)  # --help lists --mesh, --debug and the multi-host flags too


def load_split(source: str, path: str, split: str, tokenizer, cache_dir: str, seed: int):
    """(pairs, skipped reasons) of one whole split."""
    if source == "tutor":
        loaded = tutor.load_tutor_pairs(path, slide=True)
        return loaded.pairs, {**loaded.bad.counts, "chosen equals rejected": loaded.dropped_equal}
    if source == "shp":
        root = shp.download(cache_dir, split) if path == "hub" else path
        pairs = shp.SHPSource(root, split, None, None)
        return pairs, dict(pairs.bad.counts)
    if source == "imdb":
        reviews, bad = imdb.load_reviews(path, split, False, cache_dir)
        return imdb.labeled_pairs(reviews, tokenizer, seed), dict(getattr(bad, "counts", {}))
    if source == "hh":
        pairs = hh.hh_from_hub(cache_dir, split) if path == "hub" else hh.hh_source(path, False, cache_dir)
    else:
        pairs = jsonl.jsonl_source(path, False, cache_dir)
    return pairs, dict(pairs.bad.counts)


def shuffled(pairs, max_pairs: int, seed: int) -> Subset:
    """The split in a seeded random order; with `max_pairs`, a random subset of that many."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    return Subset(pairs, order[:max_pairs] if max_pairs else order)


def load_model(spec: str, mesh):
    directory = common.model_directory(spec)
    return hub.load_pretrained(directory, mesh), common.model_tokenizer(directory)


def fitted_lengths(n_positions: int) -> pipeline.TokenizeConfig:
    """--max_length and --max_prompt_length, capped to the model's `n_positions` with a one-line warning.

    A longer sequence would not fail: JAX clamps an out-of-range position lookup, so every token past the
    last position would be scored with that position's embedding. Capping rather than refusing keeps the
    default --max_length=512 usable on the quickstart model (256 positions), as the README runs it. A prompt
    length that no longer fits under the capped length becomes half of it, the ratio of the flags' defaults.
    """
    max_length, max_prompt = MAX_LENGTH.value, MAX_PROMPT.value
    if max_length > n_positions:
        max_length = n_positions
        max_prompt = max_prompt if max_prompt < max_length else max_length // 2
        logging.warning("--max_length=%d is longer than the model's %d positions: evaluating with --max_length=%d "
                        "--max_prompt_length=%d", MAX_LENGTH.value, n_positions, max_length, max_prompt)
    return pipeline.TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt)


def score_pairs(policy, reference, pairs, tokenizer, tok_cfg: pipeline.TokenizeConfig, mesh) -> dict:
    """Per-pair log-probs and lengths under the policy (and the reference)."""
    graphdef, params = nnx.split(policy)
    ref_params = None if reference is None else nnx.split(reference)[1]

    def forward(batch):
        logps, counts, _ = objectives.pair_forward(graphdef, params, batch)
        out = {"logps_chosen": logps[:, 0], "logps_rejected": logps[:, 1], "lengths_chosen": counts[:, 0],
               "lengths_rejected": counts[:, 1]}
        if ref_params is not None:
            ref, _, _ = objectives.pair_forward(graphdef, ref_params, batch)
            out.update(ref_logps_chosen=ref[:, 0], ref_logps_rejected=ref[:, 1])
        return out

    return evaluation.per_example(jax.jit(forward), pairs, tokenizer, tok_cfg, BATCH.value, mesh)


def sampling_report(policy, reference, tokenizer, pairs, max_prompt: int, mesh) -> dict:
    """Per temperature: length, distinct-1/2, repeated 3-grams, KL to the reference, reward and win rate."""
    prompts = sorted({pairs[k].prompt for k in range(len(pairs))})
    rng = np.random.default_rng(SEED.value)
    prompts = [prompts[i] for i in rng.permutation(len(prompts))[:MAX_PROMPTS.value]]
    encoded = [tokenizer.encode(p)[-max_prompt:] or [tokenizer.eos_id] for p in prompts]
    reward = rewards_lib.get_reward(REWARD.value, REWARD_MODEL.value) if REWARD.value else None
    baseline = load_model(BASELINE.value, mesh)[0] if BASELINE.value else None
    report = {"prompts": len(prompts), "samples_per_prompt": SAMPLES.value, "max_new_tokens": MAX_NEW.value}
    for temperature in map(float, TEMPERATURES.value):
        s = sample_eval.sample(policy, tokenizer, encoded, SAMPLES.value, temperature, MAX_NEW.value, SEED.value,
                               reference)
        clusters = s.prompt_index
        row = {"length": metrics_lib.bootstrap_mean([len(t) for t in s.tokens], clusters, seed=SEED.value),
               "distinct_1": metrics_lib.distinct_n(s.tokens, 1), "distinct_2": metrics_lib.distinct_n(s.tokens, 2),
               "repeated_3gram_rate": metrics_lib.bootstrap_mean(metrics_lib.repeated_ngram_rates(s.tokens), clusters,
                                                                  seed=SEED.value),
               "examples": [{"prompt": prompts[i], "sample": t} for i, t in zip(s.prompt_index[:3], s.texts[:3])]}
        if s.reference_logps is not None:
            row["kl"] = metrics_lib.bootstrap_mean(s.policy_logps - s.reference_logps, clusters, seed=SEED.value)
        if reward is not None:
            scores = reward(s.texts)
            row["reward"] = metrics_lib.bootstrap_mean(scores, clusters, seed=SEED.value)
            if baseline is not None:
                b = sample_eval.sample(baseline, tokenizer, encoded, SAMPLES.value, temperature, MAX_NEW.value,
                                       SEED.value)
                row["win_rate"] = metrics_lib.win_rate(scores, reward(b.texts), clusters, seed=SEED.value)
        report[f"temperature_{temperature:g}"] = row
    return report


def _ci(x: dict) -> str:
    return f"{x['mean']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}]"


def markdown(result: dict) -> str:
    """eval.md: the headline numbers of eval.json as tables."""
    lines = [f"# Evaluation of {result['model']}", "",
             f"{result['data']['source']} `{result['data']['path']}` ({result['data']['split']}): "
             f"{result['n_pairs']} pairs, {result['n_skipped']} skipped; 95% bootstrap intervals over prompts.", "",
             "| accuracy | mean [95% CI] | margin |", "|---|---|---|"]
    for name, ci in result["accuracy"].items():
        lines.append(f"| {name} | {_ci(ci)} | {_ci(result['margin'][name])} |")
    lines += ["", f"Mean log-probs: chosen {_ci(result['logps']['chosen'])}, rejected {_ci(result['logps']['rejected'])};"
              f" response lengths: chosen {_ci(result['length']['chosen'])}, rejected {_ci(result['length']['rejected'])}."]
    for title, key in (("response length", "accuracy_by_length"), ("SHP score ratio", "accuracy_by_score_ratio")):
        if key in result:
            lines += ["", f"| raw accuracy by {title} | pairs | accuracy |", "|---|---|---|"]
            lines += [f"| [{b['bin'][0]:g}, {b['bin'][1]:g}) | {b['n']} | {_ci(b['accuracy'])} |" for b in result[key]]
    for name, row in result.get("sampling", {}).items():
        if name.startswith("temperature_"):
            extra = "".join(f", {k} {_ci(row[k])}" for k in ("kl", "reward", "win_rate") if k in row)
            lines += ["", f"Samples at {name.replace('_', ' ')}: length {_ci(row['length'])}, distinct-1 "
                      f"{row['distinct_1']:.3f}, distinct-2 {row['distinct_2']:.3f}, repeated 3-grams "
                      f"{_ci(row['repeated_3gram_rate'])}{extra}."]
    return "\n".join(lines) + "\n"


def evaluate(mesh) -> dict:
    if not (MODELS.value and SOURCE.value and DATA_PATH.value and OUT.value):
        raise ConfigError("--model, --data_source, --data_path and --out are required (or --tally with --answer_key)")
    policy, tokenizer = load_model(MODELS.value[0], mesh)
    reference = load_model(REFERENCE.value, mesh)[0] if REFERENCE.value else None
    tok_cfg = fitted_lengths(min(m.cfg.n_positions for m in (policy, reference) if m is not None))
    cache_dir = os.path.join(OUT.value, "cache")
    pairs, skipped = load_split(SOURCE.value, DATA_PATH.value, SPLIT.value, tokenizer, cache_dir, SEED.value)
    if len(pairs) == 0:
        raise DataError(f"--data_path={DATA_PATH.value} (--data_source={SOURCE.value}) gave no usable pairs; "
                        f"skipped: {skipped or 'none'}")
    pairs = shuffled(pairs, MAX_PAIRS.value, SEED.value)
    tables = score_pairs(policy, reference, pairs, tokenizer, tok_cfg, mesh)
    result = {"model": MODELS.value[0], "reference": REFERENCE.value,
              "data": {"source": SOURCE.value, "path": DATA_PATH.value, "split": SPLIT.value, "seed": SEED.value,
                       "max_pairs": MAX_PAIRS.value},
              "n_skipped": int(sum(skipped.values())), "skipped": skipped,
              **evaluation.pair_report(tables, evaluation.pair_keys(pairs), BETA.value, SEED.value)}
    if SAMPLES.value:
        result["sampling"] = sampling_report(policy, reference, tokenizer, pairs, tok_cfg.max_prompt_length, mesh)
    if SURVEY.value:
        prompts = [pairs[k].prompt for k in range(min(SURVEY.value, len(pairs)))]
        answers = {}
        for spec in MODELS.value:
            model, tok = load_model(spec, mesh)
            encoded = [tok.encode(p)[-tok_cfg.max_prompt_length:] for p in prompts]
            answers[spec] = sample_eval.sample(model, tok, encoded, 1, float(TEMPERATURES.value[0]), MAX_NEW.value,
                                               SEED.value).texts
        result["survey"] = survey_lib.export_survey(prompts, answers, OUT.value, None, SEED.value)
    return result


def main(argv):
    del argv
    if TALLY.value:
        if not ANSWER_KEY.value:
            raise ConfigError("--tally needs --answer_key")
        print(survey_lib.format_table(survey_lib.tally(TALLY.value, ANSWER_KEY.value)))
        return
    result = evaluate(mesh_lib.make_mesh(common.MESH.value))
    os.makedirs(OUT.value, exist_ok=True)
    with open(os.path.join(OUT.value, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(OUT.value, "eval.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    print(f"wrote {os.path.join(OUT.value, 'eval.json')} and eval.md")


if __name__ == "__main__":
    common.run(main)
