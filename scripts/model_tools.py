"""Make small random-weight checkpoints with transformers, saved exactly as a real Hugging Face checkpoint is.

Used by tests, benchmarks and the demo: nothing is downloaded, and the files go through the same loading code a
user's real checkpoint takes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

if TYPE_CHECKING:
    from transformers import LlavaProcessor

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
    return _save_random(model_cls(config).eval(), path, max_shard_size)


def _save_random(model: torch.nn.Module, path: str | Path, max_shard_size: str | None) -> Path:
    """Save a freshly initialized model. Random init leaves the norms at 1.0: perturb them first, so that tests
    notice a norm that was skipped or swapped."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


# A tiny CLIP vision tower: 16x16 images in 4x4 patches, so an image is 16 placeholder tokens (its CLS is dropped).
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=4,
    projection_dim=32,
)
TINY_IMAGE_TOKEN_ID = TINY["vocab_size"] - 1  # the id of LLaVA's <image> placeholder in the tiny models


def make_random_llava_checkpoint(
    path: str | Path, text_family: str = "llama", *, seed: int = 0, max_shard_size: str | None = None, **text_overrides
) -> Path:
    """Save a random-weight LlavaForConditionalGeneration (a tiny CLIP vision tower, a projector and a tiny
    `text_family` language model) to `path`, as transformers' save_pretrained stores it."""
    text_config = _CLASSES[text_family][0](**{**TINY, **text_overrides})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION),
        text_config=text_config,
        image_token_id=text_config.vocab_size - 1,
        image_seq_length=(TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2,
    )
    torch.manual_seed(seed)
    return _save_random(LlavaForConditionalGeneration(config).eval(), path, max_shard_size)


# A minimal chat template (the tiny tokenizer's, and the demo's --chat-template): role headers, </s> after each turn.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _train_tiny_bpe(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens, trained here on a fixed text (nothing downloaded); ids 0, 1,
    2 are <unk>, <s>, </s>, as LlamaConfig expects."""
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
    return tok


def save_tiny_tokenizer(path: str | Path, vocab_size: int = TINY["vocab_size"]) -> PreTrainedTokenizerFast:
    """Save a byte-level BPE tokenizer with a chat template next to a checkpoint made by make_random_checkpoint:
    trained here on a fixed text (nothing downloaded); ids 0, 1, 2 are <unk>, <s>, </s>, as LlamaConfig expects."""
    tok = _train_tiny_bpe(vocab_size)
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


def save_tiny_llava_processor(path: str | Path) -> LlavaProcessor:
    """Save a LlavaProcessor next to a checkpoint made by make_random_llava_checkpoint, so that
    `AutoProcessor.from_pretrained(path)` turns images and text into the model's inputs: a CLIP image processor
    sized to the checkpoint's vision tower and a tiny BPE tokenizer (as save_tiny_tokenizer's, no chat template)
    whose <image> is the config's image_token_id. Each <image> in a text expands to exactly the placeholders the
    model fills with one image's features. Returns the processor."""
    # pillow is a dev dependency only: imported here, so that making text checkpoints never needs it
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    config = LlavaConfig.from_pretrained(path)
    vision = config.vision_config
    if vision.model_type != "clip_vision_model":
        raise ValueError(f"vision_config.model_type: only a CLIP vision tower is supported, got {vision.model_type!r}")
    tok = _train_tiny_bpe(config.image_token_id)
    tok.add_special_tokens(["<image>"])  # the next free id: image_token_id, if the BPE filled every id below it
    if tok.token_to_id("<image>") != config.image_token_id:
        raise ValueError(
            f"image_token_id: the tiny tokenizer cannot put <image> at {config.image_token_id} "
            f"(it has {tok.get_vocab_size() - 1} tokens before it)"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        padding_side="left",  # a padded batch of prompts is generated from its end
        clean_up_tokenization_spaces=False,
    )
    side = vision.image_size
    processor = LlavaProcessor(
        # the PIL backend: the default one needs torchvision, which blockswarm does not install
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        # CLIP's CLS token comes out of the tower too; the "default" strategy drops it again
        num_additional_image_tokens=1,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token="<image>",
    )
    processor.save_pretrained(path)
    return processor


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
