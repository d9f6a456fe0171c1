"""Make small random-weight checkpoints with transformers, saved exactly as a real Hugging Face checkpoint is.

Used by tests, benchmarks and the demo: nothing is downloaded, and the files go through the same loading code a
user's real checkpoint takes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=1024,
)
PRESETS = {
    # ~110M parameters: the benchmark's main model
    "bench-110m": dict(
        hidden_size=768,
        intermediate_size=2560,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=8000,
        max_position_embeddings=2048,
    ),
    # small and wide-vocab: per-token overhead dominates
    "bench-small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
}
_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def make_random_checkpoint(
    path: str | Path,
    family: str = "llama",
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_overrides,
) -> Path:
    """Save a random-weight model of `family` to `path` (safetensors; sharded if max_shard_size is given)."""
    config_cls, model_cls = _CLASSES[family]
    config = config_cls(**{**TINY, **config_overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Random init leaves the norms at 1.0; perturb them so that tests notice a norm that was skipped or swapped.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


# A minimal chat template (the tiny tokenizer's, and the demo's --chat-template): role headers, </s> after each turn.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def save_tiny_tokenizer(path: str | Path, vocab_size: int = TINY["vocab_size"]) -> PreTrainedTokenizerFast:
    """Save a byte-level BPE tokenizer with a chat template next to a checkpoint made by make_random_checkpoint:
    trained here on a fixed text (nothing downloaded); ids 0, 1, 2 are <unk>, <s>, </s>, as LlamaConfig expects."""
    text = " ".join(
        f"{cls.__name__}: {cls.__doc__}" for cls in (str, list, dict, set, tuple, int, float, bytes, range, object)
    )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(path)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--family", choices=sorted(_CLASSES), default="llama")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    overrides = PRESETS[args.preset] if args.preset else {}
    print(make_random_checkpoint(args.path, args.family, seed=args.seed, **overrides))


if __name__ == "__main__":
    main()
