"""The client's trainable parameters: shallow prompts, deep prompts and LoRA adapters of the remote blocks.

Names (used on the wire, by DP-SGD's per-example replicas and in tests):

- ``prompts`` [P, H]: prefix embeddings, prepended to the input embeddings on the client; the model's outputs for
  those P positions are dropped, so logits and labels keep the input's length.
- ``deep_prompts`` [num_blocks, P, H]: before block i, ``deep_prompts[i]`` is added to the hidden states at
  positions 0..P-1 (see blocks.adapters; with shallow prompts of the same length these are the prefix positions).
- ``lora.{i}.{module}.A`` [r, in] / ``.B`` [out, r]: LoRA of linear `module` of block i, output
  ``base(x) + (alpha / r) * B(A(x))``, as PEFT computes it (no dropout). B starts at zero, as in PEFT.

``override()`` swaps in other tensors with the same names, e.g. ``privacy.per_example_parameters`` replicas with
a leading batch dim. LoRA adapters save and load in PEFT's format.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from blocks.adapters import DEEP_PROMPTS, LORA_MODULES, Adapters, add_prompt, lora_name, parse_lora_name
from privacy.per_example import PerExampleParameters

DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")
SHALLOW_PROMPTS = "prompts"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PROMPTS_FILE = "prompts.safetensors"


def linear_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-able linear module of one decoder layer."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


@contextlib.contextmanager
def local_deep_prompts(model: nn.Module, deep_prompts: torch.Tensor) -> Iterator[None]:
    """Apply deep prompts ([num_blocks, P, H] or per example [B, num_blocks, P, H]) to a local transformers model
    exactly as the swarm does (blocks.adapters): before decoder layer i, add them at positions 0..P-1. For
    reference runs (tests, benchmarks) of a model with all its blocks in one place."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    handles = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict, i: int) -> tuple[tuple, dict]:
        prompt = deep_prompts[i] if deep_prompts.dim() == 3 else deep_prompts[:, i]
        if args:
            return (add_prompt(args[0], prompt), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": add_prompt(kwargs["hidden_states"], prompt)}

    try:
        for i, layer in enumerate(base.model.layers):
            handles.append(layer.register_forward_pre_hook(functools.partial(hook, i=i), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _peft_key(block: int, module: str, part: str) -> str:
    """PEFT's name of a LoRA weight in adapter_model.safetensors (adapter name stripped, as PEFT saves it)."""
    return f"base_model.model.model.layers.{block}.{LORA_MODULES[module]}.{module}.lora_{part}.weight"


def _key(name: str) -> str:
    return name.replace(".", "__")  # nn.ParameterDict keys cannot contain dots


class ClientTuning(nn.Module):
    """Holds the client's trainable tensors; empty until prompts or LoRA are added."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.params = nn.ParameterDict()
        self.lora_rank = 0
        self.lora_alpha = 0.0
        self.lora_targets: tuple[str, ...] = ()
        self.lora_blocks: tuple[int, ...] = ()
        self._override: dict[str, torch.Tensor] | None = None

    # ---- adding parameters ----

    def add_prompts(self, length: int, std: float = 0.02, generator: torch.Generator | None = None) -> nn.Parameter:
        """Shallow prompt tuning: `length` trainable prefix embeddings."""
        value = torch.randn(length, self.config.hidden_size, generator=generator) * std
        return self._add(SHALLOW_PROMPTS, value)

    def add_deep_prompts(self, length: int) -> nn.Parameter:
        """Deep prompt tuning: per block, `length` trainable vectors added at positions 0..length-1 (zero at first,
        so the model starts unchanged)."""
        return self._add(DEEP_PROMPTS, torch.zeros(self.config.num_hidden_layers, length, self.config.hidden_size))

    def add_lora(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        blocks: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """LoRA on `targets` of `blocks` (default: all). A is initialized like PEFT (Kaiming-uniform), B to zero."""
        if self.lora_rank:
            raise ValueError("LoRA adapters were added already")
        unknown = set(targets) - set(LORA_MODULES)
        if unknown or not targets:
            raise ValueError(f"LoRA targets must be among {sorted(LORA_MODULES)}, got {list(targets)}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        blocks = tuple(range(self.config.num_hidden_layers) if blocks is None else sorted(set(blocks)))
        if not blocks or not all(0 <= b < self.config.num_hidden_layers for b in blocks):
            raise ValueError(f"LoRA blocks must be in [0, {self.config.num_hidden_layers}), got {blocks}")
        shapes = linear_shapes(self.config)
        self.lora_rank, self.lora_alpha = rank, float(alpha)
        self.lora_targets, self.lora_blocks = tuple(targets), blocks
        for block in blocks:
            for module in targets:
                in_features, out_features = shapes[module]
                bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in], as nn.Linear / PEFT
                a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
                self._add(lora_name(block, module, "A"), a)
                self._add(lora_name(block, module, "B"), torch.zeros(out_features, rank))

    def _add(self, name: str, value: torch.Tensor) -> nn.Parameter:
        if _key(name) in self.params:
            raise ValueError(f"{name} exists already")
        param = nn.Parameter(value.to(torch.float32))  # trained in float32 whatever the blocks' dtype
        self.params[_key(name)] = param
        return param

    # ---- reading them ----

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 1.0

    def named_trainables(self) -> dict[str, nn.Parameter]:
        return {key.replace("__", "."): p for key, p in self.params.items()}

    def active(self) -> dict[str, torch.Tensor]:
        """The tensors the next forward uses: the parameters, or what `override` put in their place."""
        return dict(self._override) if self._override is not None else dict(self.named_trainables())

    def shallow_prompts(self) -> torch.Tensor | None:
        """The active shallow prompts ([P, H], or [B, P, H] when overridden per example), if any."""
        return self.active().get(SHALLOW_PROMPTS)

    def adapters(self) -> Adapters:
        """The active deep prompts (from block 0) and LoRA tensors, with the LoRA scale: what the blocks apply."""
        tensors = {n: t for n, t in self.active().items() if n != SHALLOW_PROMPTS}
        return Adapters(tensors, self.lora_scale, first_block=0)

    @property
    def prompt_length(self) -> int:
        tensors = self.named_trainables()
        return int(tensors[SHALLOW_PROMPTS].shape[0]) if SHALLOW_PROMPTS in tensors else 0

    @contextlib.contextmanager
    def override(self, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Use `tensors` (same names and shapes, optionally with a leading batch dim) instead of the parameters."""
        own = self.named_trainables()
        if set(tensors) != set(own):
            raise ValueError(f"override tensors {sorted(tensors)} do not match the trainables {sorted(own)}")
        for name, tensor in tensors.items():
            if tuple(tensor.shape[-own[name].dim() :]) != tuple(own[name].shape) or tensor.dim() > own[name].dim() + 1:
                raise ValueError(f"{name}: override shape {list(tensor.shape)} for parameter {list(own[name].shape)}")
        previous, self._override = self._override, dict(tensors)
        try:
            yield
        finally:
            self._override = previous

    def per_example_gradients(
        self, replicas: PerExampleParameters, losses: Callable[[], torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Exact per-example gradients of the trainables in one backward (for DP-SGD; privacy.per_example):
        `losses()` runs with the trainables replaced by `replicas` and returns one loss per example, whose sum is
        backpropagated. Returns each trainable's per-example gradients and the losses (detached)."""
        with self.override(replicas.tensors):
            per_example = losses()
            per_example.sum().backward()
        return replicas.grads(), per_example.detach()

    # ---- PEFT format ----

    def save_pretrained(self, directory: str | Path, base_model_name_or_path: str | None = None) -> None:
        """LoRA as PEFT's adapter_config.json + adapter_model.safetensors; prompts (if any) in prompts.safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.detach().contiguous() for n, t in self.named_trainables().items()}
        prompts = {n: t for n, t in tensors.items() if n in (SHALLOW_PROMPTS, DEEP_PROMPTS)}
        if prompts:
            save_file(prompts, directory / PROMPTS_FILE)
        if not self.lora_rank:
            return
        weights = {}
        for name, tensor in tensors.items():
            parsed = parse_lora_name(name)
            if parsed is not None:
                weights[_peft_key(*parsed)] = tensor
        save_file(weights, directory / PEFT_WEIGHTS, metadata={"format": "pt"})
        all_blocks = self.lora_blocks == tuple(range(self.config.num_hidden_layers))
        peft_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": 0.0,
            "target_modules": sorted(self.lora_targets),
            "layers_to_transform": None if all_blocks else list(self.lora_blocks),
            "layers_pattern": None if all_blocks else "layers",
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
        }
        (directory / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")

    def load_pretrained(self, directory: str | Path) -> None:
        """Add and fill the trainables saved by `save_pretrained` (or LoRA saved by PEFT) into this empty tuning."""
        directory = Path(directory)
        if self.params:
            raise ValueError("load into a model without trainables")
        if (directory / PROMPTS_FILE).exists():
            for name, tensor in load_file(directory / PROMPTS_FILE).items():
                if name not in (SHALLOW_PROMPTS, DEEP_PROMPTS):
                    raise ValueError(f"{PROMPTS_FILE} holds an unknown tensor {name!r}")
                self._add(name, tensor)
        if not (directory / PEFT_CONFIG).exists():
            return
        config = json.loads((directory / PEFT_CONFIG).read_text())
        if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none" or config.get("use_dora"):
            raise ValueError("only plain LoRA adapters (no bias, no DoRA) can be loaded")
        targets = config["target_modules"]
        targets = [targets] if isinstance(targets, str) else targets
        self.add_lora(config["r"], config["lora_alpha"], targets, config.get("layers_to_transform"))
        if config.get("use_rslora"):
            raise ValueError("rsLoRA scaling is not supported")
        weights = load_file(directory / PEFT_WEIGHTS)
        own = self.named_trainables()
        expected = {}
        for name in own:
            parsed = parse_lora_name(name)
            if parsed is not None:
                expected[_peft_key(*parsed)] = name
        if set(weights) != set(expected):
            raise ValueError(f"adapter weights {sorted(set(weights) ^ set(expected))[:4]} do not match its config")
        with torch.no_grad():
            for key, name in expected.items():
                own[name].copy_(weights[key])
