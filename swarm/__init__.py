"""The blockswarm client: run a model whose transformer blocks are served by peers of the swarm."""

from swarm.config import ClientConfig
from swarm.model import (
    AutoDistributedModelForCausalLM,
    DistributedLlamaForCausalLM,
    DistributedMistralForCausalLM,
    DistributedQwen2ForCausalLM,
)
from swarm.routing import NoRouteError
from swarm.transport import PeerError

__all__ = [
    "AutoDistributedModelForCausalLM",
    "ClientConfig",
    "DistributedLlamaForCausalLM",
    "DistributedMistralForCausalLM",
    "DistributedQwen2ForCausalLM",
    "NoRouteError",
    "PeerError",
]
