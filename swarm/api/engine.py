"""Generation for the API: one request is one ``model.generate`` call (its own inference session) in a worker thread.

Each generated token passes through one stopping criterion that decodes it, finds stop sequences, sends the text
delta to the request's event queue and stops the generation when the client has gone: ``generate`` then returns,
its inference session closes and the peers free that session's cache.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from swarm.api.app import ApiError, GenerationRequest, StreamText
from swarm.inference import SessionClosedError
from swarm.routing import NoRouteError
from swarm.transport import PeerError

logger = logging.getLogger(__name__)


@dataclass
class Token:
    """One generated token and the text it lets the client see now (often "", e.g. while a stop may begin)."""

    delta: str


@dataclass
class Finished:
    delta: str  # the text held back until the end
    text: str  # the whole completion
    finish_reason: str  # "stop" (end of sequence or stop sequence) or "length" (max_tokens)
    completion_tokens: int


@dataclass
class Failed:
    error: ApiError


Event = Token | Finished | Failed


class SeededSampler(LogitsProcessor):
    """OpenAI-style sampling (temperature, then top_p) with the request's own generator.

    transformers samples with the process-wide RNG, which concurrent requests would share; here each request draws
    from its own torch.Generator, so a seed gives the same text whatever else runs. generate() runs greedy, and this
    processor leaves only the drawn token finite.
    """

    def __init__(self, temperature: float, top_p: float, seed: int):
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest set of most likely tokens whose mass reaches top_p (always the first one)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        chosen = torch.multinomial(probs, 1, generator=self.generator)
        out = torch.full_like(scores, -float("inf"))
        return out.scatter(-1, chosen, 0.0)


class TokenHook(StoppingCriteria):
    """Sees every generated token: turns it into text for the client and stops at a stop sequence or on cancel."""

    def __init__(self, text: StreamText, emit: Callable[[Event], None], cancelled: threading.Event):
        self.text, self.emit, self.cancelled = text, emit, cancelled
        self.count = 0

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.count += 1
        self.emit(Token(self.text.add(int(input_ids[0, -1]))))
        stop = self.text.stopped or self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)


class Engine:
    """The client model and tokenizer, and the worker threads that generate (one per request being served)."""

    def __init__(self, model: Any, tokenizer: Any, chat_template: str | None, workers: int):
        self.model, self.tokenizer = model, tokenizer
        # A fast tokenizer is one Rust object whose settings each call may change: concurrent calls can fail with
        # "Already borrowed". Calls are short, so one lock costs nothing noticeable.
        self._tokenizer_lock = threading.Lock()
        self.chat_template = chat_template  # None: the tokenizer's own
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="swarm-api-generate")
        self._shutdown_lock, self._shut_down = threading.Lock(), False
        self.context_length = int(model.config.max_position_embeddings)  # prompt + max_tokens must fit
        base = model.generation_config
        self.eos_token_ids = _as_list(base.eos_token_id if base.eos_token_id is not None else tokenizer.eos_token_id)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template or getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The request's prompt as token ids: the prompt as the tokenizer encodes it (with its BOS, if any), or the
        messages rendered by the chat template (which writes its own special tokens)."""
        if request.kind == "completion":
            with self._tokenizer_lock:
                return list(self.tokenizer(request.prompt)["input_ids"])
        if not self.has_chat_template:
            raise ApiError(
                400,
                "this model's tokenizer has no chat template: use /v1/completions, or start swarm-api with "
                "--chat-template FILE",
                param="messages",
                code="no_chat_template",
            )
        with self._tokenizer_lock:
            try:
                text = self.tokenizer.apply_chat_template(
                    request.messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
                )
            except Exception as e:  # a template may refuse a conversation (e.g. roles that do not alternate)
                raise ApiError(400, f"messages: the chat template refused them: {e}", param="messages") from None
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generation_config(self, max_tokens: int) -> GenerationConfig:
        """Greedy with OpenAI's neutral sampling settings (sampling, if asked, is SeededSampler's); the
        checkpoint's other settings (end-of-sequence ids, repetition penalty, ...) still apply."""
        return GenerationConfig(
            max_new_tokens=max_tokens,
            do_sample=False,
            num_beams=1,
            num_return_sequences=1,
            temperature=1.0,
            top_k=50,
            top_p=1.0,
            typical_p=1.0,
        )

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(
        self, ids: list[int], request: GenerationRequest, emit: Callable[[Event], None], cancelled: threading.Event
    ) -> None:
        """Run one request to its end (in a worker thread), sending its events through `emit`."""
        text = StreamText(self.decode, request.stop)
        hook = TokenHook(text, emit, cancelled)
        processors = LogitsProcessorList()
        if not request.greedy:
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            processors.append(SeededSampler(request.temperature, request.top_p, seed))
        try:
            if cancelled.is_set():
                return
            with torch.inference_mode():
                output = self.model.generate(
                    torch.tensor([ids], dtype=torch.long),
                    generation_config=self.generation_config(request.max_tokens),
                    logits_processor=processors,
                    stopping_criteria=StoppingCriteriaList([hook]),
                )
        except (PeerError, NoRouteError, SessionClosedError, TimeoutError) as e:
            logger.warning(f"generation failed in the swarm: {e}")
            emit(Failed(ApiError(503, f"the swarm could not run this request: {e}", type="server_error")))
            return
        except Exception:
            logger.exception("generation failed")
            emit(Failed(ApiError(500, "internal error while generating", type="server_error")))
            return
        new_ids = output[0, len(ids) :].tolist()
        if text.stopped or (new_ids and new_ids[-1] in self.eos_token_ids):
            reason = "stop"
        elif len(new_ids) >= request.max_tokens:
            reason = "length"
        else:
            reason = "stop"  # cancelled: nobody reads this
        emit(Finished(text.finish(), text.text, reason, len(new_ids)))

    def shutdown(self) -> None:
        """Wait for the workers (cancel their requests first), then leave the swarm; a second call does nothing."""
        with self._shutdown_lock:
            if self._shut_down:
                return
            self._shut_down = True
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.model.shutdown()


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
