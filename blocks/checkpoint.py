"""Reading a Hugging Face safetensors checkpoint one block at a time.

A peer that serves blocks [A, B) reads exactly the tensors of those blocks, from exactly the shard files that hold
them; the client reads only what is not a block (embeddings, final norm, LM head, and a multimodal model's vision
tower and projector).

A multimodal checkpoint (LLaVA) is opened as a view of its language model: ``Checkpoint.config`` is the text config
and ``Checkpoint.layout`` says where the checkpoint stores the decoder layers, so peers and every code path that
serves a text model serve its blocks unchanged; ``Checkpoint.full_config`` keeps the whole model's config.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from blocks.families import family_of

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Multimodal model types whose language model is served by the swarm (the rest of the model runs on the client).
MULTIMODAL_TYPES = ("llava",)


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable, or lacks tensors it should have."""


@dataclass(frozen=True)
class KeyLayout:
    """Where a checkpoint stores its language model's tensors.

    `layers` is the name prefix of the decoder layers (block i's tensors start with f"{layers}{i}."); `renames` maps
    the checkpoint's prefixes of the other tensors to the names the client's modules give them (first match wins).
    """

    layers: str
    renames: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_layer_re", re.compile(rf"^{re.escape(self.layers)}(\d+)\."))

    def block_of(self, tensor_name: str) -> int | None:
        match = self._layer_re.match(tensor_name)  # type: ignore[attr-defined]
        return int(match.group(1)) if match else None

    def client_name(self, tensor_name: str) -> str:
        for old, new in self.renames:
            if tensor_name.startswith(old):
                return new + tensor_name[len(old) :]
        return tensor_name


TEXT_LAYOUT = KeyLayout("model.layers.")
# LLaVA as the hub's llava-hf checkpoints and transformers' save_pretrained store it (transformers renames these keys
# on load; the table is its conversion mapping for "llava"), and as the model's own module names store it.
LLAVA_SAVED_LAYOUT = KeyLayout(
    "language_model.model.layers.",
    (
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model.language_model."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ),
)
LLAVA_MODULE_LAYOUT = KeyLayout("model.language_model.layers.")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: PretrainedConfig  # the language model's config (a multimodal checkpoint's text_config)
    weight_map: dict[str, str]  # tensor name -> shard file name inside `path`
    layout: KeyLayout = TEXT_LAYOUT
    full_config: PretrainedConfig | None = field(default=None, compare=False)  # a multimodal model's whole config

    @property
    def multimodal(self) -> bool:
        return self.full_config is not None

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)


def model_name_of(name_or_path: str) -> str:
    """Short model name: the last path component of a local dir, or the hub repo id's last part."""
    return Path(str(name_or_path).rstrip("/")).name


def _download_from_hub(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def open_checkpoint(name_or_path: str | os.PathLike, *, blocks: Iterable[int] | None = None) -> Checkpoint:
    """Open a local checkpoint dir, or fetch from the hub only the shards holding `blocks` (None: client part).

    A local directory is never completed from the hub: missing shards are an error.
    """
    path = Path(name_or_path)
    local = path.is_dir()
    if not local:
        if path.exists() or str(name_or_path).startswith((".", "/", "~")):  # a path, never a hub id
            problem = "is a file" if path.exists() else "does not exist"
            raise CheckpointError(f"{name_or_path} is not a checkpoint directory: it {problem}")
        try:
            path = _download_from_hub(str(name_or_path), ["*.json", "*.model", "*.txt"])
            if not (path / INDEX_FILE).exists():  # an unsharded model: its one file is all there is
                path = _download_from_hub(str(name_or_path), [SINGLE_FILE])
        # Broad on purpose: the hub client raises validation, HTTP, transport and offline errors of unrelated types.
        except Exception as e:
            raise CheckpointError(
                f"{name_or_path!r} is neither a local checkpoint directory nor a model the hub could provide: "
                f"{_one_line(e)}"
            ) from e
    if not (path / "config.json").is_file():  # transformers would blame a missing model_type key instead
        raise CheckpointError(f"{path} is not a checkpoint directory: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:  # no or a bad config.json, or a model type transformers lacks
        raise CheckpointError(f"{path} is not a checkpoint directory: {_one_line(e)}") from e
    text_config = language_config(config)
    family_of(text_config)  # fail early on unsupported architectures
    weight_map = _read_weight_map(path)
    layout = key_layout(config, weight_map)
    missing = {f for f in _files_for(weight_map, blocks, layout) if not (path / f).exists()}
    if missing and local:
        raise CheckpointError(f"{path} lacks the files {sorted(missing)} that its index lists")
    if missing:
        try:
            path = _download_from_hub(str(name_or_path), sorted(missing))
        except Exception as e:  # as above
            raise CheckpointError(
                f"fetching {sorted(missing)} of {name_or_path} from the hub failed: {_one_line(e)}"
            ) from e
    return Checkpoint(path, text_config, weight_map, layout, config if text_config is not config else None)


def language_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config of the model the swarm serves blocks of: a multimodal model's text_config, else the config."""
    if getattr(config, "model_type", "") in MULTIMODAL_TYPES:
        return config.text_config
    return config


def key_layout(config: PretrainedConfig, weight_map: dict[str, str]) -> KeyLayout:
    """The layout of a checkpoint's tensor names: a text model's, or the one of LLaVA's two that names its layers."""
    if getattr(config, "model_type", "") not in MULTIMODAL_TYPES:
        return TEXT_LAYOUT
    for layout in (LLAVA_SAVED_LAYOUT, LLAVA_MODULE_LAYOUT):
        if any(layout.block_of(name) is not None for name in weight_map):
            return layout
    raise CheckpointError(
        f"a {config.model_type} checkpoint whose tensors are named neither {LLAVA_SAVED_LAYOUT.layers}N. nor "
        f"{LLAVA_MODULE_LAYOUT.layers}N.: no decoder layers found"
    )


def _one_line(error: BaseException) -> str:
    """An error's message on one line (the hub client's span several), for a CLI's one-line error."""
    return " ".join(str(error).split()) or type(error).__name__


def _read_weight_map(path: Path) -> dict[str, str]:
    # Like transformers, a single-file checkpoint wins over a (possibly stale) index next to it.
    if (path / SINGLE_FILE).exists():
        with safe_open(path / SINGLE_FILE, framework="pt") as f:  # reads only the header
            return {name: SINGLE_FILE for name in f.keys()}
    if (path / INDEX_FILE).exists():
        with open(path / INDEX_FILE) as f:
            return dict(json.load(f)["weight_map"])
    raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors is supported)")


def block_of(tensor_name: str, layout: KeyLayout = TEXT_LAYOUT) -> int | None:
    return layout.block_of(tensor_name)


def _names_for(weight_map: dict[str, str], blocks: Iterable[int] | None, layout: KeyLayout = TEXT_LAYOUT) -> list[str]:
    # Old conversions store rotary inv_freq buffers; transformers recomputes them from the config, and so do we.
    names = [name for name in weight_map if not name.endswith("rotary_emb.inv_freq")]
    if blocks is None:
        return [name for name in names if layout.block_of(name) is None]
    wanted = set(blocks)
    return [name for name in names if layout.block_of(name) in wanted]


def _files_for(weight_map: dict[str, str], blocks: Iterable[int] | None, layout: KeyLayout = TEXT_LAYOUT) -> set[str]:
    return {weight_map[name] for name in _names_for(weight_map, blocks, layout)}


def block_tensor_names(ckpt: Checkpoint, block: int) -> list[str]:
    """The checkpoint's names of one decoder layer's tensors (full names, as stored)."""
    if not 0 <= block < ckpt.num_blocks:
        raise CheckpointError(f"block {block} is outside the model's {ckpt.num_blocks} blocks")
    names = _names_for(ckpt.weight_map, [block], ckpt.layout)
    if not names:
        raise CheckpointError(f"checkpoint {ckpt.path} has no tensors for block {block}")
    return names


def block_prefix(ckpt: Checkpoint, block: int) -> str:
    """What a block's tensor names start with, before the name relative to the layer."""
    return f"{ckpt.layout.layers}{block}."


def read_tensors(ckpt: Checkpoint, names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(ckpt.weight_map[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file_name, file_names in by_file.items():
        with safe_open(ckpt.path / file_name, framework="pt") as f:
            for name in file_names:
                tensor = f.get_tensor(name)
                out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def read_block_state(ckpt: Checkpoint, block: int, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """State dict of one decoder layer, keys relative to the layer (e.g. ``self_attn.q_proj.weight``)."""
    names = block_tensor_names(ckpt, block)
    prefix = block_prefix(ckpt, block)
    return {name[len(prefix) :]: t for name, t in read_tensors(ckpt, names, dtype).items()}


def read_client_state(ckpt: Checkpoint, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Everything that is not a decoder block: embeddings, final norm, LM head (and a multimodal model's vision
    tower and projector), named as the client model's modules name them."""
    state = read_tensors(ckpt, _names_for(ckpt.weight_map, None, ckpt.layout), dtype)
    return {ckpt.layout.client_name(name): t for name, t in state.items()}
