"""Sample continuations from a GPT-2: a preset (random weights), a hub name, or a local directory.

    python -m launch.sample --model=gpt2 --prompt="The tutor said" --temperature=0.7 --top_p=0.9
"""

from absl import flags

from cvxdpo import mesh as mesh_lib
from cvxdpo.data.tokenizer import load_tokenizer
from cvxdpo.model import generate, gpt2, hub
from launch import common

MODEL = flags.DEFINE_string("model", "tiny", "Preset name (random init), hub name, or local model directory.")
TOKENIZER = flags.DEFINE_string("tokenizer", "gpt2", "'gpt2' (offline), a tokenizer directory, or a hub name.")
PROMPTS = flags.DEFINE_multi_string("prompt", ["What is the structure of a Shakespearean sonnet?"], "Prompt(s).")
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
SEED = flags.DEFINE_integer("seed", 0, "Sampling and init seed.")


def load_model(spec: str, mesh, vocab_size: int):
    """A preset gets fresh weights sized to the tokenizer; anything else is loaded as pretrained."""
    if spec in gpt2.PRESETS and spec not in hub.HUB_REPOS:
        return gpt2.create(gpt2.preset(spec, vocab_size=vocab_size), seed=SEED.value, mesh=mesh)
    return hub.load_pretrained(spec, mesh=mesh)


def main(argv):
    del argv
    mesh = mesh_lib.make_mesh(common.MESH.value)
    tokenizer = load_tokenizer(TOKENIZER.value)
    model = load_model(MODEL.value, mesh, tokenizer.vocab_size)
    replies = generate.generate_text(model, tokenizer, PROMPTS.value, MAX_NEW.value, temperature=TEMPERATURE.value,
                                     top_k=TOP_K.value, top_p=TOP_P.value, seed=SEED.value)
    for prompt, reply in zip(PROMPTS.value, replies):
        print(f"> {prompt}\n{reply}\n")


if __name__ == "__main__":
    common.run(main)
