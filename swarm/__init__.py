"""The blockswarm client: run a model whose transformer blocks are served by peers of the swarm.

The client classes are imported on first use (PEP 562), so that ``swarm.monitor`` and the configs load without
torch and transformers: a command that refuses a bad flag answers in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AutoDistributedModelForCausalLM": "swarm.model",
    "AutoDistributedModelForImageTextToText": "swarm.multimodal",
    "DistributedLlavaForConditionalGeneration": "swarm.multimodal",
    "DistributedLlamaForCausalLM": "swarm.model",
    "DistributedMistralForCausalLM": "swarm.model",
    "DistributedQwen2ForCausalLM": "swarm.model",
    "ClientConfig": "swarm.config",
    "NoRouteError": "swarm.routing",
    "PeerError": "swarm.transport",
    "GenerationDriftError": "swarm.remote_cache",
    "VerificationError": "swarm.verification",
}
__all__ = [
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForImageTextToText",
    "ClientConfig",
    "DistributedLlamaForCausalLM",
    "DistributedLlavaForConditionalGeneration",
    "DistributedMistralForCausalLM",
    "DistributedQwen2ForCausalLM",
    "GenerationDriftError",
    "NoRouteError",
    "PeerError",
    "VerificationError",
]

if TYPE_CHECKING:
    from swarm.config import ClientConfig
    from swarm.model import (
        AutoDistributedModelForCausalLM,
        DistributedLlamaForCausalLM,
        DistributedMistralForCausalLM,
        DistributedQwen2ForCausalLM,
    )
    from swarm.multimodal import AutoDistributedModelForImageTextToText, DistributedLlavaForConditionalGeneration
    from swarm.remote_cache import GenerationDriftError
    from swarm.routing import NoRouteError
    from swarm.transport import PeerError
    from swarm.verification import VerificationError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'swarm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
