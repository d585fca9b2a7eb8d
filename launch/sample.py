"""Sample continuations from a GPT-2: a run's workdir or exported model directory, a hub name, or a preset.

    python -m launch.sample --model=runs/quickstart/dpo_convex --prompt="Can you explain ethics?" --temperature=0.7

The tokenizer is the model directory's own (what the run trained with) unless
`--tokenizer` names another; a preset gets random weights and GPT-2's tokenizer.
"""

from absl import flags

from cvxdpo import mesh as mesh_lib
from cvxdpo.model import generate, gpt2, hub
from launch import common

MODEL = flags.DEFINE_string("model", "tiny", "A run's workdir, a model directory, a hub name, or a preset name "
                            "(random init).")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "'gpt2' (offline), a tokenizer directory, or a hub name. "
                                "Default: the model directory's own tokenizer, else 'gpt2'.")
PROMPTS = flags.DEFINE_multi_string("prompt", ["What is the structure of a Shakespearean sonnet?"], "Prompt(s).")
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
SEED = flags.DEFINE_integer("seed", 0, "Sampling and init seed.")
flags.adopt_module_key_flags(common)  # --help lists --mesh, --debug and the multi-host flags too


def load_model(spec: str, mesh, vocab_size: int):
    """A preset gets fresh weights sized to the tokenizer; anything else is loaded as pretrained."""
    if spec in gpt2.PRESETS and spec not in hub.HUB_REPOS:
        return gpt2.create(gpt2.preset(spec, vocab_size=vocab_size), seed=SEED.value, mesh=mesh)
    return hub.load_pretrained(spec, mesh=mesh)


def main(argv):
    del argv
    mesh = mesh_lib.make_mesh(common.MESH.value)
    spec = common.model_directory(MODEL.value)
    tokenizer = common.model_tokenizer(spec, TOKENIZER.value)
    model = load_model(spec, mesh, tokenizer.vocab_size)
    replies = generate.generate_text(model, tokenizer, PROMPTS.value, MAX_NEW.value, temperature=TEMPERATURE.value,
                                     top_k=TOP_K.value, top_p=TOP_P.value, seed=SEED.value)
    for prompt, reply in zip(PROMPTS.value, replies):
        print(f"> {prompt}\n{reply}\n")


if __name__ == "__main__":
    common.run(main)
