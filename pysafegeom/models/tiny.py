"""Tiny random models built from configs (Llama, Mistral, Qwen2, Gemma, GPT-2 shapes), for tests and benchmarks."""

from __future__ import annotations

import torch

ARCHS = ("llama", "mistral", "qwen2", "gemma", "gpt2")


def tiny_model(arch: str = "llama", *, n_layers: int = 4, d_model: int = 64, vocab_size: int | None = None,
               tokenizer=None, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM of the given architecture (eval mode, frozen).

    When ``tokenizer`` is given, the vocabulary matches it (so real prompts can be run through the model).
    """
    import transformers as tf

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    V = vocab_size or (len(tokenizer) if tokenizer is not None else 512)
    heads = 4
    common = dict(vocab_size=V, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                  num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=512)
    if tokenizer is not None:
        common.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=d_model // heads)
    else:
        cfg = tf.GPT2Config(vocab_size=V, n_embd=d_model, n_layer=n_layers, n_head=heads, n_positions=512,
                            bos_token_id=common.get("bos_token_id", V - 1), eos_token_id=common.get("eos_token_id", V - 1))
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.to(dtype).eval().requires_grad_(False)
    return model
