"""Independent reference: GPT-2 checkpoints written and run by transformers + torch on the CPU."""

import numpy as np
import torch
import transformers


def write_hf_gpt2(directory, seed=0, **config):
    """Writes a randomly initialized GPT2LMHeadModel with transformers' own save_pretrained."""
    torch.manual_seed(seed)
    defaults = dict(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_config = transformers.GPT2Config(**{**defaults, **config})
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # GPT-2 starts with zero biases and unit norms; perturb them so parity means something
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "ln_" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def hf_logits(model, input_ids, attention_mask):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids)),
                    attention_mask=torch.as_tensor(np.asarray(attention_mask)))
    return out.logits.numpy()
