"""Weight-only quantization of the nn.Linear layers of a transformer block with bitsandbytes.

int8 uses LLM.int8() row-wise absmax quantization (``Linear8bitLt``), nf4 uses 4-bit NormalFloat with
blockwise absmax (``Linear4bit``). Both work on CPU (bitsandbytes >= 0.45 CPU backend) and on CUDA.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch


class _DropOptionalKernelWarning(logging.Filter):
    """bnb's CPU backend warns on import when the optional `kernels` package is absent. We leave it out on
    purpose (it fetches kernel code from the hub at run time); bnb then uses its own CPU path."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelWarning())

import bitsandbytes as bnb  # noqa: E402 (after the filter above)
from bitsandbytes.functional import QuantState, has_avx512bf16  # noqa: E402
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear  # noqa: E402

from blocks.names import QUANT_MODES  # noqa: E402

# bnb's CPU fast path for nf4 (AVX512-BF16 repacking + fused gemv kernel) asserts these shape constraints;
# layers that violate them must stay on the generic dequantize-then-matmul path.
_CPU_PACK_BLOCK_N = 32
_NF4_BLOCKSIZE = 64

_BNB_LINEAR_TYPES = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)

_INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast from"


class _DropInt8CastWarning(logging.Filter):
    """bnb logs the (expected) fp32/bf16 -> fp16 activation cast on *every* int8 forward of every layer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_INT8_CAST_MESSAGE)


def _silence_int8_cast_warning() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropInt8CastWarning())


def quantize_linear_layers(
    module: torch.nn.Module,
    mode: str,
    compute_dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` (recursively, in place) by its bitsandbytes equivalent.

    The quantized layers carry the original weights and biases; the whole module ends up on ``device``, which
    is also where quantization runs. ``compute_dtype`` is the nf4 matmul dtype; int8 ignores it (bnb casts
    activations to float16 for the int8 matmul and returns the input dtype). Cast ``module`` to its serving
    dtype *before* quantizing: nf4 records the weight dtype as the dtype it dequantizes to.
    Returns ``module`` itself, or for a bare ``nn.Linear`` its replacement (``"none"``: unchanged).
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"Unknown quantization mode {mode!r}; expected one of {QUANT_MODES}")
    if mode == "none":
        return module
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("Cannot quantize onto the meta device: bitsandbytes needs real weights")
    if mode == "int8":
        _silence_int8_cast_warning()

    # A bare Linear has no children to recurse into, so it has to be swapped rather than patched.
    if _is_plain_linear(module):
        return share_quant_tables(_make_quantized(module, mode, compute_dtype).to(device))

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _is_plain_linear(child):
                setattr(parent, name, _make_quantized(child, mode, compute_dtype))
    # bnb quantizes lazily inside Int8Params/Params4bit.to(device); one module-wide .to() quantizes every
    # replaced layer and moves the non-linear parts (norms, rotary buffers) alongside.
    return share_quant_tables(module.to(device))


def _is_plain_linear(module: torch.nn.Module) -> bool:
    # Skip layers that are already quantized, and MultiheadAttention's out_proj, whose weight is read
    # directly by F.multi_head_attention_forward and therefore cannot be a bnb parameter.
    return (
        isinstance(module, torch.nn.Linear)
        and not isinstance(module, _BNB_LINEAR_TYPES)
        and not isinstance(module, NonDynamicallyQuantizableLinear)
    )


def _make_quantized(linear: torch.nn.Linear, mode: str, compute_dtype: torch.dtype) -> torch.nn.Linear:
    """Build the (not yet quantized) bnb layer; quantization happens on the caller's ``.to(device)``."""
    has_bias = linear.bias is not None
    # Int8Params only quantizes when moved *from* CPU, so the source weight must live there.
    weight = linear.weight.detach().to("cpu") if mode == "int8" else linear.weight.detach()
    new: torch.nn.Linear
    if mode == "int8":
        # Build on meta so the constructor does not allocate and randomly init a throwaway weight.
        new = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=0.0,
            device="meta",
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            # Nested (8-bit) absmax: ~1/64 B/weight of statistics instead of 1/16 with float32 absmax.
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=_NF4_BLOCKSIZE,
            compress_statistics=True,
            quant_type="nf4",
            module=new,
        )
        if linear.out_features % _CPU_PACK_BLOCK_N or linear.in_features % _NF4_BLOCKSIZE:
            # Otherwise the first eval forward on an AVX512-BF16 CPU dies in bnb's repacking assertion.
            new.support_avx512bf16_for_cpu = False
    if has_bias:
        new.bias = torch.nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
    new.train(linear.training)
    return new


# bnb gives every nf4 QuantState its own copy of two constant tables: the 16-entry NF4 code (64 B) and, for the
# nested absmax, the 256-entry float32 dynamic map (1 KiB). That is ~1.1 KB per layer, more than the 4-bit weights
# of a 64x64 layer. Tables are shared by exact bytes, so dequantization reads the same values as before; weak
# values let a table go once no layer uses it.
_SHARED_TABLES: weakref.WeakValueDictionary[tuple[Any, ...], torch.Tensor] = weakref.WeakValueDictionary()


def _shared_table(table: torch.Tensor) -> torch.Tensor:
    """The one live tensor with ``table``'s device, dtype, shape and bytes (``table`` itself if it is the first)."""
    raw = table.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes()
    key = (str(table.device), table.dtype, tuple(table.shape), raw)
    return _SHARED_TABLES.setdefault(key, table)


def _share_state_tables(state: QuantState) -> None:
    state.code = _shared_table(state.code)
    # bnb deletes state2 when it repacks a layer for its AVX512-BF16 kernel (absmax is then un-nested).
    nested = getattr(state, "state2", None)
    if isinstance(nested, QuantState):
        nested.code = _shared_table(nested.code)


def share_quant_tables(module: torch.nn.Module) -> torch.nn.Module:
    """Make all nf4 layers in ``module`` (and any quantized earlier) use one tensor per distinct code table.

    Only the constant lookup tables are shared, never absmax or offsets, and only when byte-identical, so outputs
    are unchanged. Returns ``module``.
    """
    for layer in module.modules():
        state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if isinstance(state, QuantState):
            _share_state_tables(state)
    return module


def nf4_cpu_kernel() -> str:
    """bnb's nf4 path on this CPU: "avx512bf16" (repacked weights, bfloat16 absmax) or "generic" (dequantize)."""
    return "avx512bf16" if has_avx512bf16() else "generic"


def _is_linear_like(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear)  # bnb Linear8bitLt / Linear4bit subclass nn.Linear


def _quant_tensors(obj: Any) -> list[torch.Tensor]:
    """Tensors held by a bnb weight's side state: Int8Params.CB/SCB, MatmulLtState, (nested) QuantState."""
    if obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, QuantState):
        # Covers absmax, code, offset and, when nested, state2 (8-bit absmax's own absmax and code).
        return [t for value in vars(obj).values() for t in _quant_tensors(value)]
    return []


def _linear_tensors(module: torch.nn.Module, include_bias: bool) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    for name, param in module.named_parameters(recurse=False):
        if name == "bias" and not include_bias:
            continue
        tensors.append(param)
    tensors.extend(module.buffers(recurse=False))
    weight = module.weight
    for attr in ("CB", "SCB", "quant_state"):
        tensors.extend(_quant_tensors(getattr(weight, attr, None)))
    # After the first forward Linear8bitLt moves CB/SCB from the weight into module.state.
    state = getattr(module, "state", None)
    if isinstance(state, bnb.MatmulLtState):
        for attr in ("CB", "SCB", "CBt", "SBt", "SB", "subB", "idx"):
            tensors.extend(_quant_tensors(getattr(state, attr, None)))
    tensors.extend(_quant_tensors(getattr(module, "quant_state", None)))
    return tensors


def _unique_nbytes(tensors: list[torch.Tensor]) -> int:
    # The same memory is reachable several ways (weight.data is CB, module.quant_state is
    # weight.quant_state), so count each distinct tensor once. Counting tensor spans rather than whole
    # storages keeps views into a larger buffer (e.g. an mmap'd checkpoint) from being overcounted.
    seen: set[tuple[str, int, int]] = set()
    total = 0
    for tensor in tensors:
        if tensor.device.type == "meta":  # owns no memory
            continue
        key = (str(tensor.device), tensor.data_ptr(), tensor.nbytes)
        if key not in seen:
            seen.add(key)
            total += tensor.nbytes
    return total


def linear_weight_bytes(module: torch.nn.Module, include_bias: bool = False) -> int:
    """Bytes actually allocated for the weights of all linear layers (plain or bnb) inside ``module``.

    Counts weight storages plus every quantization statistic bnb keeps for them (int8 SCB; nf4 absmax,
    code, offset and the nested state2), each distinct allocation once: the nf4 code tables, shared by all
    layers (``share_quant_tables``), count once per ``module``. Biases are excluded unless ``include_bias`` so
    the number is comparable to ``numel * bytes_per_weight``.
    Note: on AVX512-BF16 CPUs bnb repacks nf4 weights on the first eval forward and un-nests absmax to
    bfloat16, so for large layers the nf4 figure grows by ~1/64 B/weight after that forward.
    """
    tensors = [t for m in module.modules() if _is_linear_like(m) for t in _linear_tensors(m, include_bias)]
    return _unique_nbytes(tensors)


def weight_bytes_report(module: torch.nn.Module) -> dict[str, int | float]:
    """Summary of linear-weight memory, with the float16 footprint of the same weights as a baseline."""
    linears = [m for m in module.modules() if _is_linear_like(m)]
    numel = sum(m.in_features * m.out_features for m in linears)
    weight_bytes = linear_weight_bytes(module)
    fp16_bytes = numel * 2
    return {
        "num_linear": len(linears),
        "weight_numel": numel,
        "weight_bytes": weight_bytes,
        "bias_bytes": linear_weight_bytes(module, include_bias=True) - weight_bytes,
        "fp16_bytes": fp16_bytes,
        "ratio_vs_fp16": weight_bytes / fp16_bytes if fp16_bytes else 0.0,
        "bytes_per_weight": weight_bytes / numel if numel else 0.0,
    }
