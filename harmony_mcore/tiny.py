"""Tiny Hugging Face models built on the spot: random weights and a byte-level BPE tokenizer trained locally.

Nothing is downloaded. Tests, benchmarks and the CPU demo use these; head_dim >= 32 because vLLM's CPU attention
rejects smaller heads, and the default vocab of 1000 is deliberately not a multiple of the Megatron padding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def default_corpus() -> list[str]:
    """A small deterministic corpus covering digits, arithmetic, LaTeX answers and everyday English words."""
    words = ["the", "a", "has", "buys", "gives", "away", "more", "how", "many", "does", "have", "left", "apples",
             "coins", "books", "each", "total", "then", "Tom", "Ann", "Sam", "Lia", "Ben", "Eva", "she", "he", "they",
             "I", "we", "sells", "finds", "loses", "gets", "problem", "solution", "strategy", "rewritten", "answer",
             "step", "so", "is", "are", "of", "and", "to", "in", "with", "by", "from", "for", "at", "every", "box",
             "bag"]
    lines = []
    for i in range(400):
        a, b = (i * 7) % 97, (i * 13) % 89
        w = " ".join(words[(i * k) % len(words)] for k in range(1, 9))
        lines.append(f"{w}. {a} + {b} = {a + b}. {a} - {b} = {a - b}. {a} * 3 = {a * 3}. \\boxed{{{a + b}}}")
        lines.append(f"STRATEGY: Domain Shift\nREWRITTEN PROBLEM: {w}?\nSOLUTION: {a} + {b} = {a + b}.")
    return lines


def train_tokenizer(out_dir: str | Path, *, vocab_size: int = 1000, corpus: Iterable[str] | None = None,
                    chat_template: str | None = CHATML_TEMPLATE, split_digits: bool = False):
    """Train a byte-level BPE tokenizer (at most `vocab_size` entries) and save it as an HF fast tokenizer.

    split_digits: every digit is its own token (as in Llama/Qwen tokenizers), which makes arithmetic learnable for
    tiny models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus or default_corpus()), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_hf_model(out_dir: str | Path, family: str = "qwen3", *, vocab_size: int = 1000, hidden: int = 128,
                       layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 32, ffn: int = 256,
                       tied: bool = False, seed: int = 0, llama3_rope: bool = False,
                       tokenizer_corpus: Iterable[str] | None = None, dtype: str = "float32",
                       split_digits: bool = False, perturb_norms: bool = True) -> Path:
    """Save a random-weight HF causal LM of `family` (llama, qwen2, qwen3) with a locally trained tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out, vocab_size=vocab_size, corpus=tokenizer_corpus, split_digits=split_digits)
    common = {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": ffn,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": tied,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    if family == "llama":
        rope = {"rope_type": "default", "rope_theta": 500000.0}
        if llama3_rope:
            rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
            common["max_position_embeddings"] = 16384
        config = LlamaConfig(head_dim=head_dim, rope_parameters=rope, **common)
    elif family == "qwen2":
        if head_dim != hidden // heads:
            raise ValueError("qwen2 has head_dim = hidden / heads")
        config = Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)
    elif family == "qwen3":
        config = Qwen3Config(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                             **common)
    else:
        raise ValueError(f"family {family!r}: expected llama, qwen2 or qwen3")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if perturb_norms:  # HF zero-inits biases and ones-inits norms; randomise so every mapping is exercised
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


SHAPE_ARGS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab")


def add_shape_args(parser, *, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int,
                   vocab: int) -> None:
    """--layers/--hidden/--heads/--kv-heads/--head-dim/--ffn/--vocab of a random Qwen3 (the benchmarks' model)."""
    defaults = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                "ffn": ffn, "vocab": vocab}
    for name in SHAPE_ARGS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])


def make_qwen3_from_args(out_dir: str | Path, args, **kwargs) -> Path:
    """make_tiny_hf_model("qwen3") with the shape parsed by add_shape_args."""
    return make_tiny_hf_model(out_dir, "qwen3", vocab_size=args.vocab, hidden=args.hidden, layers=args.layers,
                              heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, ffn=args.ffn,
                              **kwargs)
