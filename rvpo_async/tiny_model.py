"""Build a tiny, deterministic Qwen2-architecture causal LM and byte-level BPE tokenizer, offline.

The model is randomly initialised from a seed (hidden 128, 2 layers, 4 heads of 32, vocabulary 512);
the tokenizer is trained with `tokenizers` on a small built-in corpus. Both are saved with
`save_pretrained` (safetensors) and load with transformers' Auto classes and with vLLM. The same seed
gives the same bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SUBJECTS = ["the cat", "a robot", "the river", "my friend", "the model", "a bird", "the city", "our team",
             "the garden", "a teacher", "the ship", "the sun"]
_VERBS = ["sees", "likes", "builds", "finds", "moves", "writes", "keeps", "checks", "helps", "answers"]
_OBJECTS = ["a safe plan", "the blue door", "green tea", "a short story", "the answer", "many stars",
            "a quiet room", "the red ball", "clean water", "a json object", "the final list", "a kind note"]
_EXTRA = ['{"name": "search", "arguments": {"query": "weather"}}', "Answer: 42.", "Yes.", "No.",
          "please be safe and kind.", "ok done.", "1 2 3 4 5 6 7 8 9 10", "tool call: search(query)"]


def corpus(seed: int = 0, n_sentences: int = 2000) -> list[str]:
    """A small deterministic English-like corpus covering the built-in task's words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
        if rng.random() < 0.15:
            s += " " + rng.choice(_EXTRA)
        lines.append(s.capitalize())
    return lines + _EXTRA


def build_tokenizer(seed: int = 0):
    """A byte-level BPE tokenizer wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, eos_token_id: int, pad_token_id: int, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32",
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None, use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    # a wider init than the default 0.02 gives the untrained model a less uniform next-token distribution
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def make_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny model and tokenizer into `out_dir`; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(seed)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    model = build_model(len(tok), eos, pad, seed)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "rvpo_tiny_model.json").write_text(json.dumps({"seed": seed, "vocab_size": len(tok)}) + "\n")
    return out


def ensure_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny model at `path` unless a complete one is already there."""
    p = Path(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file() and (p / "tokenizer.json").is_file():
        return p
    return make_tiny_model(p, seed)


# The middle rung of the speed ladder (`rvpo-async bench trl --model 25m`): the tiny model's tokenizer and
# the same architecture, 8 layers of hidden 512 (8 heads of 64, 2 KV heads): about 25M parameters, where
# the arithmetic of a step, not per-call overhead, takes most of the time.
LADDER_25M = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 64}


def make_qwen2_25m(out_dir: str | Path, seed: int = 0) -> Path:
    """Build and save a random Qwen2 of about 25M parameters with the tiny model's tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(seed)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                      tie_word_embeddings=True, torch_dtype="float32", eos_token_id=eos, pad_token_id=pad,
                      bos_token_id=None, use_sliding_window=False, **LADDER_25M)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def ensure_qwen2_25m(path: str | Path, seed: int = 0) -> Path:
    p = Path(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file() and (p / "tokenizer.json").is_file():
        return p
    return make_qwen2_25m(p, seed)
