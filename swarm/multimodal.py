"""Multimodal models whose language model's decoder blocks run in the swarm.

The client keeps what is small: the vision tower, the projector, the embeddings, the final norm and the LM head.
Images are encoded and merged into the text's embeddings by transformers' own LlavaModel code (get_image_features,
the placeholder merge); only the merged embeddings go to the language model, whose blocks are the swarm's (a
RemoteDecoderModel, as for text models). So generation, inference sessions, failover, push and training of the
client's prompts and LoRA adapters take the same paths as for a text model.

Peers serve a multimodal checkpoint as it is: blocks.checkpoint opens it as a view of its language model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, LlavaConfig, LlavaForConditionalGeneration
from transformers.initialization import no_init_weights
from transformers.models.llava.modeling_llava import LlavaModel, LlavaMultiModalProjector, LlavaPreTrainedModel

from blocks.checkpoint import Checkpoint, open_checkpoint
from blocks.families import family_of
from swarm.model import DistributedCausalLMMixin, RemoteDecoderModel
from swarm.sequence import RemoteSequence


class RemoteLlavaModel(LlavaModel):
    """transformers' LlavaModel with the swarm's language model: its forward (image features, placeholder merge)
    is LlavaModel's own; only the construction differs, so that no local decoder layers are ever built."""

    def __init__(self, config: LlavaConfig, sequence: RemoteSequence):
        LlavaPreTrainedModel.__init__(self, config)
        # Built on the CPU even inside from_pretrained's meta device, uninitialized (the checkpoint's weights replace
        # its parameters): its non-persistent buffers (e.g. CLIP's position ids) are in no checkpoint.
        with torch.device("cpu"), no_init_weights():
            self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        text = config.text_config
        self.language_model = RemoteDecoderModel(text, family_of(text), sequence)
        self.post_init()


class DistributedLlavaForConditionalGeneration(DistributedCausalLMMixin, LlavaForConditionalGeneration):
    """transformers' LlavaForConditionalGeneration (a Llama, Mistral or Qwen2 language model), its language model's
    decoder blocks served by the swarm."""

    def __init__(self, config: LlavaConfig, sequence: RemoteSequence):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = RemoteLlavaModel(config, sequence)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self._local = threading.local()  # the open inference session is per thread
        self.post_init()

    @classmethod
    def _check_checkpoint(cls, ckpt: Checkpoint) -> None:
        model_type = ckpt.full_config.model_type if ckpt.multimodal else ckpt.config.model_type
        if model_type != "llava":
            raise ValueError(f"{cls.__name__} cannot load a {model_type} checkpoint")

    @property
    def decoder(self) -> RemoteDecoderModel:
        return self.model.language_model


# model_type of a multimodal checkpoint -> its client class
MULTIMODAL_CLASSES: dict[str, type[DistributedCausalLMMixin]] = {"llava": DistributedLlavaForConditionalGeneration}


class AutoDistributedModelForImageTextToText:
    """Picks the distributed class of a multimodal checkpoint from its config (like transformers' Auto classes)."""

    @classmethod
    def from_pretrained(cls, model_name_or_path: str | Path, **kwargs: Any) -> DistributedCausalLMMixin:
        ckpt = open_checkpoint(model_name_or_path)
        if not ckpt.multimodal:
            raise ValueError(
                f"{model_name_or_path} is a text-only ({ckpt.config.model_type}) checkpoint: load it with "
                "swarm.AutoDistributedModelForCausalLM"
            )
        model_class = MULTIMODAL_CLASSES.get(ckpt.full_config.model_type)
        if model_class is None:
            raise ValueError(
                f"multimodal model_type {ckpt.full_config.model_type!r} is not supported; supported: "
                f"{sorted(MULTIMODAL_CLASSES)}"
            )
        return model_class.from_pretrained(model_name_or_path, **kwargs)
