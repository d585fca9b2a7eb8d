"""GPT-2 parity with Hugging Face (transformers + torch as the independent implementation)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from cvxdpo.errors import ConfigError, MissingFileError
from cvxdpo.model import generate, gpt2, hub
from hf_reference import hf_logits, write_hf_gpt2

TINY = dict(vocab_size=300, bos_token_id=299, eos_token_id=299)
# Real GPT-2 widths (vocabulary, embedding, heads, positions) with two layers.
GPT2_WIDTHS = dict(n_layer=2, n_embd=768, n_head=12, n_positions=1024)


def _batch(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = rng.integers(0, vocab, size=(len(lengths), T)).astype(np.int32)
    mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.int32)
    return ids * mask, mask


def _torch_seq_logprobs(model, ids, mask, loss_mask):
    logits = torch.as_tensor(hf_logits(model, ids, mask)).double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.as_tensor(ids[:, 1:]).long()[..., None])[..., 0]
    return (logp * torch.as_tensor(loss_mask[:, 1:]).double()).sum(-1).numpy()


@pytest.mark.parametrize("config", [TINY, GPT2_WIDTHS], ids=["tiny", "gpt2-widths"])
def test_logits_and_logprobs_match_transformers(tmp_path, mesh1, config):
    ref = write_hf_gpt2(tmp_path, **config)
    model = hub.load_pretrained(str(tmp_path), mesh=mesh1)
    vocab = model.cfg.vocab_size
    ids, mask = _batch(vocab, [12, 7, 3])
    out = model(jnp.asarray(ids), jnp.asarray(mask))
    ours = np.asarray(out.logits)
    theirs = hf_logits(ref, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ours[..., :vocab][valid] - theirs[valid]).max() < 1e-4
    assert (ours[..., vocab:] < -1e30).all()  # vocabulary padding never wins
    assert out.hidden.shape == (3, 12, model.cfg.n_embd)

    loss_mask = mask.copy()
    loss_mask[:, :2] = 0  # the first two tokens play the prompt
    ours_lp, counts = gpt2.sequence_logprobs(out.logits, jnp.asarray(ids), jnp.asarray(loss_mask))
    theirs_lp = _torch_seq_logprobs(ref, ids, mask, loss_mask)
    np.testing.assert_allclose(np.asarray(ours_lp), theirs_lp, rtol=1e-5, atol=1e-4)
    chunked_lp, _, _ = model.response_logprobs(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(loss_mask))
    assert model.cfg.logprob_chunk > 0  # the training path: no full logits
    np.testing.assert_allclose(np.asarray(chunked_lp), theirs_lp, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(counts), loss_mask.sum(1))


def test_left_padding_changes_nothing(tmp_path, mesh1):
    write_hf_gpt2(tmp_path, **TINY)
    model = hub.load_pretrained(str(tmp_path), mesh=mesh1)
    ids, _ = _batch(300, [6])
    left = np.concatenate([np.zeros((1, 4), np.int32), ids], 1)
    left_mask = np.concatenate([np.zeros((1, 4), np.int32), np.ones((1, 6), np.int32)], 1)
    a = np.asarray(model(jnp.asarray(ids)).logits)
    b = np.asarray(model(jnp.asarray(left), jnp.asarray(left_mask)).logits)[:, 4:]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_save_pretrained_round_trips_through_transformers(tmp_path, mesh1):
    model = gpt2.create(gpt2.preset("tiny", vocab_size=300, eos_token_id=299, bos_token_id=299), seed=3, mesh=mesh1)
    hub.save_pretrained(model, str(tmp_path / "out"))
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    ids, mask = _batch(300, [9, 5])
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)[..., :300]
    theirs = hf_logits(ref, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - theirs[valid]).max() < 1e-4
    again = hub.load_pretrained(str(tmp_path / "out"), mesh=mesh1)
    np.testing.assert_array_equal(np.asarray(again.wte[...])[:300], np.asarray(model.wte[...])[:300])


def test_hub_key_names_without_prefix(tmp_path, mesh1):
    """Files from the hub name tensors `h.0...`; transformers 5 writes `transformer.h.0...`. Both load."""
    ref = write_hf_gpt2(tmp_path / "prefixed", **TINY)
    tensors = safetensors.numpy.load_file(str(tmp_path / "prefixed" / "model.safetensors"))
    assert any(k.startswith("transformer.") for k in tensors)
    os.makedirs(tmp_path / "bare")
    safetensors.numpy.save_file({k.removeprefix("transformer."): v for k, v in tensors.items()},
                                str(tmp_path / "bare" / "model.safetensors"))
    (tmp_path / "bare" / "config.json").write_text((tmp_path / "prefixed" / "config.json").read_text())
    model = hub.load_pretrained(str(tmp_path / "bare"), mesh=mesh1)
    ids, mask = _batch(300, [5])
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids)).logits)[..., :300], hf_logits(ref, ids, mask),
                               atol=1e-4)


def test_greedy_generation_matches_transformers(tmp_path, mesh1):
    ref = write_hf_gpt2(tmp_path, initializer_range=0.3, **TINY)  # larger weights: varied greedy text
    model = hub.load_pretrained(str(tmp_path), mesh=mesh1)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]
    first = generate.generate(model, prompts, 10)
    # Make a token that row 0 emits at step 3 the EOS, so stopping is exercised too.
    eos = int(first.tokens[0, 3])

    def theirs(eos_id):
        width = max(map(len, prompts))
        ids = torch.tensor([[eos_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           eos_token_id=eos_id, pad_token_id=eos_id)
        return out[:, width:].numpy()

    ours = generate.generate(model, prompts, 10, eos_id=eos, pad_id=eos)
    expected = theirs(eos)
    np.testing.assert_array_equal(ours.tokens[:, :expected.shape[1]], expected)
    assert ours.lengths[0] <= 4 and ours.tokens[0, ours.lengths[0] - 1] == eos
    assert (ours.tokens[0, ours.lengths[0]:] == eos).all()  # padded after EOS


def test_sampling_filters(mesh1):
    logits = jnp.array([[3.0, 2.0, 1.0, 0.0, -1.0]] * 2000)
    keys = jax.random.key(0)
    greedy = generate.sample_logits(logits, keys, 0.0, 0, 1.0)
    assert (np.asarray(greedy) == 0).all()
    top2 = np.asarray(generate.sample_logits(logits, keys, 1.0, 2, 1.0))
    assert set(np.unique(top2)) == {0, 1}
    # softmax([3,2,1,0,-1]) = [.636,.234,.086,.032,.012]: top_p = 0.8 keeps the first two.
    top_p = np.asarray(generate.sample_logits(logits, keys, 1.0, 0, 0.8))
    assert set(np.unique(top_p)) == {0, 1}
    free = np.asarray(generate.sample_logits(logits, keys, 1.0, 0, 1.0))
    freq = np.bincount(free, minlength=5) / len(free)
    np.testing.assert_allclose(freq, jax.nn.softmax(logits[0]), atol=0.03)


def test_generation_is_seeded_and_compiles_once_per_shape(mesh1):
    model = gpt2.create(gpt2.preset("tiny", vocab_size=300, eos_token_id=299), seed=1, mesh=mesh1)
    a = generate.generate(model, [[1, 2, 3]], 8, temperature=1.0, seed=7)
    b = generate.generate(model, [[1, 2, 3]], 8, temperature=1.0, seed=7)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    compiled = generate._decode.jitted_fn._cache_size()
    generate.generate(model, [[4, 5]], 8, temperature=0.5, top_k=3, top_p=0.9, seed=1)  # same bucketed shape
    generate.generate(model, [[4, 5, 6, 7]], 8, temperature=0.0, seed=2)
    assert generate._decode.jitted_fn._cache_size() == compiled
    generate.generate(model, [[4, 5]], 9)  # a new max_new_tokens is a new shape
    assert generate._decode.jitted_fn._cache_size() == compiled + 1


def test_bfloat16_compute_stays_close(tmp_path, mesh1):
    write_hf_gpt2(tmp_path, **TINY)
    f32 = hub.load_pretrained(str(tmp_path), mesh=mesh1)
    bf16 = hub.load_pretrained(str(tmp_path), mesh=mesh1, dtype="bfloat16")
    ids, mask = _batch(300, [10])
    a = np.asarray(f32(jnp.asarray(ids)).logits[..., :300])
    out = bf16(jnp.asarray(ids))
    assert out.logits.dtype == jnp.bfloat16 and bf16.wte[...].dtype == jnp.float32
    assert np.abs(a - np.asarray(out.logits[..., :300], np.float32)).max() < 0.1


def test_param_table_describes_the_model_and_the_hub_files(mesh1):
    cfg = gpt2.preset("tiny", vocab_size=300)
    _, abstract = gpt2.abstract_model(cfg, mesh1)
    assert {path: v.get_value().shape for path, v in nnx.to_flat_state(abstract)} == \
        {p.path: p.shape(cfg) for p in gpt2.PARAMS}
    for p in gpt2.PARAMS:
        assert len(p.letters) == len(p.logical), p.name
        assert p.per_layer == (p.letters[0] == "N") == ("{i}" in p.hf_name), p.name
    assert gpt2.PARAMS[0].hf_shape(cfg) == (300, 64)  # the hub's vocabulary is unpadded
    assert gpt2.PARAMS[0].shape(cfg) == (384, 64)


def test_presets():
    assert gpt2.preset("gpt2").num_params() == 124_439_808
    assert gpt2.preset("gpt2-medium").num_params() == 354_823_168
    assert gpt2.preset("distilgpt2").n_layer == 6 and gpt2.preset("gpt2-large").n_embd == 1280
    assert gpt2.preset("gpt2").padded_vocab_size == 50304
    with pytest.raises(TypeError, match="dropout"):  # the model has no dropout; the option is gone
        gpt2.preset("tiny", dropout=0.1)


# --- bad input -------------------------------------------------------------------------------

def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'gpt5'.*known presets: distilgpt2"):
        gpt2.preset("gpt5")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MissingFileError, match="no config.json"):
        hub.load_pretrained(str(tmp_path))


def test_missing_directory():
    with pytest.raises(MissingFileError, match="does not exist"):
        hub.load_pretrained("./no/such/dir")


def _rewrite_weights(directory, change):
    path = os.path.join(directory, "model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    change(tensors)
    safetensors.numpy.save_file(tensors, path)


def test_missing_tensor(tmp_path):
    write_hf_gpt2(tmp_path, **TINY)
    _rewrite_weights(tmp_path, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(ConfigError, match=r"tensor 'h.1.mlp.c_fc.weight' is missing"):
        hub.load_pretrained(str(tmp_path))


def test_wrongly_shaped_tensor(tmp_path):
    write_hf_gpt2(tmp_path, **TINY)
    _rewrite_weights(tmp_path, lambda t: t.update({"transformer.wpe.weight": np.zeros((10, 64), np.float32)}))
    with pytest.raises(ConfigError, match=r"'wpe.weight' has shape \(10, 64\), config.json implies \(64, 64\)"):
        hub.load_pretrained(str(tmp_path))


def test_config_that_is_not_gpt2(tmp_path):
    write_hf_gpt2(tmp_path, **TINY)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type is 'llama', not 'gpt2'"):
        hub.load_pretrained(str(tmp_path))


def test_offline_hub_name_is_a_clear_error():
    with pytest.raises(MissingFileError, match="could not be fetched from the Hugging Face hub"):
        hub.load_pretrained("someone/not-cached-gpt2")
