"""Hugging Face-compatible model classes whose decoder blocks run in the swarm.

The client holds the embeddings, the final norm and the LM head; `model.model.layers` is replaced by the
swarm. Everything else (sampling, logits processors, stopping criteria, streamers) is transformers' own
``generate``: the remote KV caches are presented to it as a Cache object whose length is the session's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList, PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from blocks.adapters import Adapters, check_prompt_positions, run_span
from blocks.checkpoint import Checkpoint, model_name_of, open_checkpoint, read_client_state
from blocks.families import FAMILIES, ModelFamily, family_of
from blocks.fingerprint import model_weights
from blocks.span import BlockSpan, load_span
from privacy.defence import ResidualNoise
from privacy.exposure import ExposureLedger, split_local_blocks
from swarm.config import ClientConfig
from swarm.inference import InferenceSession
from swarm.remote_cache import RemoteCache, StepCheck
from swarm.sequence import RemoteSequence
from swarm.tuning import ClientTuning
from swarm.verification import VerificationError

logger = logging.getLogger(__name__)


class RemoteDecoderModel(nn.Module):
    """Stands where transformers' LlamaModel / Qwen2Model stands: embeddings -> swarm blocks -> final norm."""

    def __init__(self, config: PretrainedConfig, family: ModelFamily, sequence: RemoteSequence):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.sequence = sequence
        self.tuning = ClientTuning(config)
        # blocks the client runs itself (ClientConfig.local_blocks), so that no peer sees their activations
        self.local_first: BlockSpan | None = None
        self.local_last: BlockSpan | None = None
        # ClientConfig.privacy: noise on what is sent to the swarm, removed from what comes back (privacy.defence)
        self.privacy: ResidualNoise | None = None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if "past_key_values" in kwargs:  # transformers < 5.24 spelled it so; silently ignoring it gave wrong text
            raise TypeError("past_key_values is not accepted: pass the cache as cache=")
        if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            raise NotImplementedError(
                "padding (attention_mask with zeros) is not supported yet: pass sequences of equal length"
            )
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if isinstance(cache, RemoteCache):
            session = cache.session
            cache.check_step(hidden.shape[1], hidden.shape[0], position_ids)
            if self.tuning.shallow_prompts() is not None:
                raise NotImplementedError(
                    "generation with shallow prompts is not supported through the swarm (deep prompts and LoRA are)"
                )
            cache.record_step(session.position, input_ids)
            hidden = self._run_in_session(session, hidden)
        else:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("a local KV cache cannot be used with remote blocks; use model.inference_session()")
            cache = None
            hidden = self._run_whole(hidden)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache)

    def _run_whole(self, hidden: torch.Tensor) -> torch.Tensor:
        """All blocks on whole sequences, differentiable w.r.t. the input and the client's trainables."""
        prompts = self.tuning.shallow_prompts()
        if prompts is not None:  # shallow prompts: a prefix of trainable embeddings, dropped from the outputs
            prefix = prompts.expand(hidden.shape[0], -1, -1) if prompts.dim() == 2 else prompts
            hidden = torch.cat([prefix.to(hidden.dtype), hidden], dim=1)
        adapters = self.tuning.adapters()
        hidden = self._run_local(self.local_first, hidden, adapters)
        if self.sequence.remote_start < self.sequence.remote_end:
            hidden = self._through_swarm(hidden, lambda sent: self.sequence.forward(sent, adapters))
        hidden = self._run_local(self.local_last, hidden, adapters)
        return hidden if prompts is None else hidden[:, prompts.shape[-2] :]

    def _run_in_session(self, session: InferenceSession, hidden: torch.Tensor) -> torch.Tensor:
        position = session.position
        for key, span in (("first", self.local_first), ("last", self.local_last)):
            if span is not None and key not in session.local_caches:
                session.local_caches[key] = span.new_cache()
        adapters = session.adapters
        if adapters.prompt_length:  # checked before any peer refuses it: a refusal would look like a failing peer
            check_prompt_positions(adapters.prompt_length, position, hidden.shape[1])
        hidden = self._run_local(self.local_first, hidden, adapters, session.local_caches.get("first"), position)
        if self.sequence.remote_start < self.sequence.remote_end:
            hidden = self._through_swarm(hidden, session.step)
        else:
            session.position = position + hidden.shape[1]
        return self._run_local(self.local_last, hidden, adapters, session.local_caches.get("last"), position)

    def _through_swarm(self, hidden: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`run` (the remote blocks) on `hidden`: the one place where hidden states leave the client. With
        ClientConfig.privacy, what is sent carries fresh noise that is removed from the answer (privacy.defence)."""
        if self.privacy is None:
            return run(hidden)
        sent, noise = self.privacy.send(hidden)
        return self.privacy.receive(run(sent), noise)

    @staticmethod
    def _run_local(
        span: BlockSpan | None,
        hidden: torch.Tensor,
        adapters: Adapters,
        cache: DynamicCache | None = None,
        position: int = 0,
    ) -> torch.Tensor:
        if span is None:
            return hidden
        sub = adapters.select(span.start, span.end)
        return run_span(span, hidden, span.start, span.end, sub, cache, position)


class DistributedCausalLMMixin:
    """Turns a transformers *ForCausalLM class into one whose blocks run in the swarm (see subclasses)."""

    config: PretrainedConfig
    model: RemoteDecoderModel

    def __init__(self, config: PretrainedConfig, sequence: RemoteSequence):
        family = family_of(config)
        family.pretrained_base.__init__(self, config)
        self.model = RemoteDecoderModel(config, family, sequence)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._local = threading.local()  # the open inference session is per thread
        self.post_init()

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | Path,
        *,
        initial_peers: list[str] | None = None,
        dht_prefix: str | None = None,
        dtype: torch.dtype = torch.float32,
        client_config: ClientConfig | None = None,
        **client_options: Any,
    ):
        """Load the client's part of a checkpoint (embeddings, final norm, LM head) and join the swarm.

        Any ClientConfig field can be given as a keyword (e.g. ``request_timeout=30``).
        """
        if client_config is None:
            client_config = ClientConfig(
                initial_peers=list(initial_peers or []), dht_prefix=dht_prefix, **client_options
            )
        elif initial_peers or dht_prefix or client_options:
            raise ValueError("pass either client_config or individual client options, not both")
        if not client_config.initial_peers:
            raise ValueError("initial_peers is required: multiaddrs of at least one peer in the swarm")
        ckpt = open_checkpoint(model_name_or_path)
        cls._check_checkpoint(ckpt)
        config = ckpt.config  # the language model's, whose blocks the swarm serves
        prefix = client_config.dht_prefix or model_name_of(str(model_name_or_path))
        remote = split_local_blocks(config.num_hidden_layers, *client_config.local_split)[1]
        # Only peers that announce the same block weights as this checkpoint's are used (blocks.fingerprint).
        weights = model_weights(ckpt)
        if weights is None:
            logger.warning("the checkpoint's block files are not here: peers of any weights under the prefix are used")
        sequence = RemoteSequence(
            client_config, prefix, config.num_hidden_layers, config.hidden_size, remote, weights=weights
        )
        try:
            return cls.assemble(ckpt, sequence, client_config, dtype)
        except BaseException:
            sequence.shutdown()
            raise

    @classmethod
    def assemble(cls, ckpt: Checkpoint, sequence: Any, client_config: ClientConfig, dtype: torch.dtype):
        """The client's model around `sequence` (its remote blocks): the client's part of `ckpt`, its local blocks
        and its privacy defence. Opens no connection itself: from_pretrained passes a RemoteSequence, and
        privacy.audit a stand-in that runs the remote blocks in-process and keeps what a peer would receive."""
        cls._check_checkpoint(ckpt)
        config = copy.copy(ckpt.full_config if ckpt.multimodal else ckpt.config)
        first, _, last = split_local_blocks(ckpt.num_blocks, *client_config.local_split)
        with torch.device("meta"):  # no throwaway random init of (possibly huge) embeddings and LM head
            model = cls(config, sequence)
        model._load_client_state(ckpt, dtype)
        model.requires_grad_(False)  # the model is frozen: what trains is model.tuning's parameters
        for blocks, attr in ((first, "local_first"), (last, "local_last")):
            if len(blocks):
                span = load_span(ckpt, blocks.start, blocks.stop, dtype, progress=False)
                setattr(model.decoder, attr, span)
        if client_config.defence is not None:
            model.decoder.privacy = ResidualNoise(client_config.defence)
        if (ckpt.path / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(ckpt.path)
        return model.eval()

    @classmethod
    def _check_checkpoint(cls, ckpt: Checkpoint) -> None:
        """Refuse a checkpoint this class cannot load, with the class that can."""
        if ckpt.multimodal:
            raise ValueError(
                f"{ckpt.path} is a {ckpt.full_config.model_type} (multimodal) checkpoint: load it with "
                "swarm.AutoDistributedModelForImageTextToText"
            )
        if family_of(ckpt.config).causal_lm not in cls.__mro__:
            raise ValueError(f"{cls.__name__} cannot load a {ckpt.config.model_type} checkpoint")

    @property
    def decoder(self) -> RemoteDecoderModel:
        """The language model whose blocks run in the swarm (a multimodal model's language_model)."""
        return self.model

    def _load_client_state(self, ckpt, dtype: torch.dtype) -> None:
        state = read_client_state(ckpt, dtype)
        missing, unexpected = self.load_state_dict(state, strict=False, assign=True)
        if getattr(self.decoder.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.decoder.embed_tokens.weight
            missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"client weights do not match the model: missing {missing}, unexpected {unexpected}")
        self.to(dtype)
        on_meta = [name for name, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if on_meta:
            raise ValueError(f"the checkpoint left these client tensors unset: {on_meta}")

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[InferenceSession]:
        """Keep the peers' KV caches across generate() calls: each call continues where the last one ended."""
        if self.active_session is not None:
            raise RuntimeError("an inference session is already open on this model in this thread")
        # The session uses the tuned tensors as they are now: train, then open a session to generate with them.
        session = InferenceSession(
            self.decoder.sequence,
            max_length,
            batch_size,
            adapters=self.tuning.adapters(),
        ).open()
        self._local.session = session
        try:
            yield session
        finally:
            self._local.session = None
            session.close()

    @property
    def tuning(self) -> ClientTuning:
        """The client's trainable prompts / LoRA adapters (empty until added)."""
        return self.decoder.tuning

    @property
    def exposure_ledger(self) -> ExposureLedger:
        """Which peer saw which blocks' activations, for how many tokens, over this model's lifetime."""
        return self.decoder.sequence.ledger

    def shutdown(self) -> None:
        """Leave the swarm: stop this client's DHT node and network thread."""
        self.decoder.sequence.shutdown()

    @property
    def active_session(self) -> InferenceSession | None:
        return getattr(self._local, "session", None)

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        """transformers' generate, with the blocks in the swarm.

        Inside ``inference_session()``, ``inputs`` (if any) are appended to what the session already holds and
        generation continues from there; the returned sequences include the session's earlier tokens, so two
        calls return the same as one longer call.

        ``inputs_embeds`` (any front-end's embeddings, instead of input ids) start a generation or a session: as
        with transformers, only the new tokens are returned, and such a session cannot be continued by generate.
        """
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            if inputs is not None:
                raise ValueError("pass either input ids or inputs_embeds, not both")
            if embeds.ndim != 3:
                raise ValueError(f"inputs_embeds must be [batch, length, hidden], got shape {list(embeds.shape)}")
        for key in ("cache", "past_key_values"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key} cannot be passed: the KV cache lives on the peers")
        mask = kwargs.pop("attention_mask", None)
        if mask is not None and not bool(mask.all()):
            raise NotImplementedError("padding (attention_mask with zeros) is not supported yet")
        gen_config = copy.deepcopy(kwargs.get("generation_config") or self.generation_config)
        for key in ("num_beams", "num_return_sequences", "max_new_tokens", "max_length"):
            if key in kwargs:
                setattr(gen_config, key, kwargs[key])
        if (gen_config.num_beams or 1) > 1:
            raise NotImplementedError("beam search is not supported through the swarm yet")

        session = self.active_session
        if session is not None:
            history = session.token_ids
            if history is None and session.position > 0:
                raise NotImplementedError("a session that began with inputs_embeds cannot be continued by generate()")
            if embeds is not None:
                if session.position > 0:
                    raise NotImplementedError("inputs_embeds can only start an inference session, not continue one")
                return self._generate_in_session(session, None, *args, **kwargs)
            if inputs is None:
                if history is None:
                    raise ValueError("this session holds no tokens yet: pass input ids to the first generate()")
                inputs = history
            elif history is not None:
                inputs = torch.cat([history, inputs.to(history.device)], dim=1)
            return self._generate_in_session(session, inputs, *args, **kwargs)

        prompt = inputs if inputs is not None else embeds
        if prompt is None:
            raise ValueError("input ids or inputs_embeds are required outside an inference session")
        new_tokens = gen_config.max_new_tokens
        max_length = prompt.shape[1] + new_tokens if new_tokens is not None else gen_config.max_length
        batch = prompt.shape[0] * (gen_config.num_return_sequences or 1)
        retries = self.decoder.sequence.config.verification_retries
        while True:
            try:
                with self.inference_session(max_length=max_length, batch_size=batch) as session:
                    return self._generate_in_session(session, inputs, *args, **kwargs)
            except VerificationError as e:
                # A spot check caught a peer lying: everything this session computed is suspect. The liar is banned
                # now, so a fresh session avoids it (an unresolved disagreement is not retried: no one was banned).
                if retries == 0 or e.evidence.liar is None:
                    raise
                retries -= 1
                logger.warning(f"generation redone without the peer caught lying ({e.evidence.liar})")

    def _generate_in_session(self, session: InferenceSession, inputs: torch.Tensor | None, *args: Any, **kwargs: Any):
        """transformers' generate through `session`, from input ids or (inputs None) from kwargs' inputs_embeds."""
        if inputs is not None and inputs.ndim != 2:
            raise ValueError(f"input ids must be [batch, length], got shape {list(inputs.shape)}")
        prompt = inputs if inputs is not None else kwargs["inputs_embeds"]
        # An embeddings prompt is held by the peers but is no part of the token sequence generate sees.
        prefix = 0 if inputs is not None else prompt.shape[1]
        cache = RemoteCache(session, self.decoder.config.num_hidden_layers, prefix=prefix)
        processors = LogitsProcessorList([*(kwargs.pop("logits_processor", None) or []), StepCheck(cache)])
        try:
            with self.decoder.sequence.loop.borrowed():  # no thread hop per token
                output = super().generate(
                    inputs,
                    *args,
                    cache=cache,
                    attention_mask=torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device),
                    logits_processor=processors,
                    **kwargs,
                )
        except BaseException:
            # The peers' caches may now hold tokens that token_ids lacks: continuing would be silently wrong.
            session.close()
            raise
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        # After an embeddings prompt the session holds more than its tokens: generate cannot continue it.
        session.token_ids = sequences if inputs is not None else None
        return output


def _distributed_class(family: ModelFamily) -> type[DistributedCausalLMMixin]:
    """`Distributed<family's *ForCausalLM>`: that class with its blocks in the swarm, a class of this module (so
    that it pickles and reprs by its name here)."""
    name = f"Distributed{family.causal_lm.__name__}"

    def body(namespace: dict[str, Any]) -> None:
        namespace.update(
            __module__=__name__,
            __qualname__=name,
            __doc__=f"transformers' {family.causal_lm.__name__}, its decoder blocks served by the swarm.",
        )

    return types.new_class(name, (DistributedCausalLMMixin, family.causal_lm), exec_body=body)


# One class per family of blocks.families.FAMILIES (model_type -> class); adding a family there adds its class.
DISTRIBUTED_CLASSES: dict[str, type[DistributedCausalLMMixin]] = {
    model_type: _distributed_class(family) for model_type, family in FAMILIES.items()
}
# The public names, bound here so that `from swarm.model import ...` and static tools see them.
DistributedLlamaForCausalLM = DISTRIBUTED_CLASSES["llama"]
DistributedMistralForCausalLM = DISTRIBUTED_CLASSES["mistral"]
DistributedQwen2ForCausalLM = DISTRIBUTED_CLASSES["qwen2"]


class AutoDistributedModelForCausalLM:
    """Picks the Distributed*ForCausalLM class from the checkpoint's config (like transformers' Auto classes)."""

    @classmethod
    def from_pretrained(cls, model_name_or_path: str | Path, **kwargs: Any) -> DistributedCausalLMMixin:
        config = open_checkpoint(model_name_or_path).config
        return DISTRIBUTED_CLASSES[family_of(config).model_type].from_pretrained(model_name_or_path, **kwargs)
