"""CPU tests for blocks.quantization: real int8/nf4 storage, memory savings and forward accuracy."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import QuantState, has_avx512bf16
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from blocks.quantization import (
    QUANT_MODES,
    linear_weight_bytes,
    nf4_cpu_kernel,
    quantize_linear_layers,
    share_quant_tables,
    weight_bytes_report,
)

SEQ_LEN = 16

# Relative error of the quantized layer against the float32 layer, measured over seeds 0-4 on an
# AVX512-BF16 CPU (bitsandbytes 0.50.2). "out" is the full layer output, which includes the residual stream;
# "delta" is the block's own contribution (output - input), which a broken quantization could not hide.
#   int8 fp32: out 0.0023-0.0025, delta 0.018-0.019    int8 bf16: out 0.0038-0.0040, delta 0.029-0.030
#   nf4  fp32: out 0.020-0.021,   delta 0.152-0.160    nf4  bf16: out 0.020-0.021,   delta 0.153-0.161
# Tolerances leave ~2-3x headroom; the bf16 runs include bf16 rounding of everything (0.003 / 0.022 alone).
TOLERANCES = {
    ("int8", torch.float32): (0.0075, 0.05),
    ("int8", torch.bfloat16): (0.01, 0.075),
    ("nf4", torch.float32): (0.05, 0.35),
    ("nf4", torch.bfloat16): (0.05, 0.35),
}
MAX_RATIO_VS_FP16 = {"int8": 0.55, "nf4": 0.30}
QUANT_TYPES = {"int8": (bnb.nn.Linear8bitLt, torch.int8), "nf4": (bnb.nn.Linear4bit, torch.uint8)}


@pytest.fixture(scope="module")
def config() -> LlamaConfig:
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_hidden_layers=1,
        vocab_size=1000,
    )
    cfg._attn_implementation = "eager"  # standalone layer: nothing else resolves the attention backend
    return cfg


@pytest.fixture(scope="module")
def layer(config: LlamaConfig) -> LlamaDecoderLayer:
    torch.manual_seed(0)
    return LlamaDecoderLayer(config, layer_idx=0).eval()


@pytest.fixture(scope="module")
def hidden() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, SEQ_LEN, 256)


def _forward(layer: torch.nn.Module, config: LlamaConfig, hidden: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
    position_embeddings = LlamaRotaryEmbedding(config)(hidden, position_ids)
    with torch.inference_mode():
        out = layer(hidden, attention_mask=None, position_embeddings=position_embeddings)
    return out.float()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def _fp16_bytes(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() * 2 for m in module.modules() if isinstance(m, torch.nn.Linear))


def test_float_layer_bytes_are_measured(layer: LlamaDecoderLayer) -> None:
    # Sanity check of the measurement itself: float32 weights are exactly numel * 4 bytes.
    assert linear_weight_bytes(layer) == 2 * _fp16_bytes(layer)
    report = weight_bytes_report(layer)
    assert report["num_linear"] == 7
    assert report["fp16_bytes"] == _fp16_bytes(layer)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_storage_and_size(
    mode: str, layer: LlamaDecoderLayer, config: LlamaConfig, hidden: torch.Tensor
) -> None:
    fp16_bytes = _fp16_bytes(layer)
    q = quantize_linear_layers(copy.deepcopy(layer), mode, torch.float32)

    bnb_cls, storage_dtype = QUANT_TYPES[mode]
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7
    for linear in linears:
        assert isinstance(linear, bnb_cls)
        assert linear.weight.dtype == storage_dtype
        assert linear.weight.device.type == "cpu"
    if mode == "nf4":
        assert all(m.weight.numel() * 2 == m.in_features * m.out_features for m in linears)  # two per byte

    ratio = linear_weight_bytes(q) / fp16_bytes
    # Measured: int8 0.507 (1 B/weight + float32 SCB per row), nf4 0.259 (nested absmax, shared code tables).
    assert ratio <= MAX_RATIO_VS_FP16[mode]
    assert weight_bytes_report(q)["ratio_vs_fp16"] == pytest.approx(ratio)

    # bnb re-lays out nf4 weights/absmax on the first eval forward on AVX512-BF16 CPUs; still must fit.
    _forward(q, config, hidden)
    assert linear_weight_bytes(q) / fp16_bytes <= MAX_RATIO_VS_FP16[mode]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_forward_matches_float(
    mode: str, dtype: torch.dtype, layer: LlamaDecoderLayer, config: LlamaConfig, hidden: torch.Tensor
) -> None:
    ref = _forward(layer, config, hidden)
    # Cast first, then quantize: the serving dtype is fixed before the weights are packed.
    q = quantize_linear_layers(copy.deepcopy(layer).to(dtype), mode, compute_dtype=dtype)
    out = _forward(q, config, hidden.to(dtype))

    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    out_tol, delta_tol = TOLERANCES[(mode, dtype)]
    assert _rel_err(out, ref) < out_tol
    assert _rel_err(out - hidden, ref - hidden) < delta_tol


def _nf4_states(module: torch.nn.Module) -> list[QuantState]:
    return [m.weight.quant_state for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_nf4_code_tables_are_one_allocation_and_outputs_unchanged(
    layer: LlamaDecoderLayer, config: LlamaConfig, hidden: torch.Tensor
) -> None:
    # Two blocks quantized one after the other, as load_span does: all 14 layers read the same two tables.
    shared = torch.nn.ModuleList(quantize_linear_layers(copy.deepcopy(layer), "nf4", torch.float32) for _ in range(2))
    states = _nf4_states(shared)
    assert len(states) == 14
    assert len({s.code.data_ptr() for s in states}) == 1
    assert len({s.state2.code.data_ptr() for s in states}) == 1

    # The same blocks with a private copy of each table per layer, as bnb builds them.
    private = torch.nn.ModuleList(quantize_linear_layers(copy.deepcopy(layer), "nf4", torch.float32) for _ in range(2))
    for state in _nf4_states(private):
        state.code, state.state2.code = state.code.clone(), state.state2.code.clone()
    table_bytes = states[0].code.nbytes + states[0].state2.code.nbytes  # 64 + 1024
    assert linear_weight_bytes(private) - linear_weight_bytes(shared) == 13 * table_bytes

    for shared_block, private_block in zip(shared, private, strict=True):
        assert torch.equal(_forward(shared_block, config, hidden), _forward(private_block, config, hidden))

    # Sharing goes by exact bytes: NF4's zero entry stored as -0.0 is a different table and stays apart.
    odd = _nf4_states(private)[0]
    odd.code[7] = -0.0
    share_quant_tables(private)
    assert {s.code.data_ptr() for s in _nf4_states(private)} == {odd.code.data_ptr(), states[0].code.data_ptr()}


def test_nf4_cpu_kernel_names_bnb_path() -> None:
    assert nf4_cpu_kernel() == ("avx512bf16" if has_avx512bf16() else "generic")


def test_bias_is_kept_and_bare_linear_is_swapped() -> None:
    torch.manual_seed(2)
    linear = torch.nn.Linear(128, 64, bias=True)
    with torch.no_grad():
        linear.bias.add_(1.0)  # make the bias dominate so a dropped bias cannot pass
    x = torch.randn(4, 128)
    ref = linear(x).detach()
    assert _rel_err(ref - linear.bias.detach(), ref) > 0.5
    # Measured: int8 0.0019, nf4 0.055 (one uniform-init layer; NF4's grid is tuned for Gaussian weights).
    for mode, tol in (("int8", 0.006), ("nf4", 0.15)):
        q = quantize_linear_layers(copy.deepcopy(linear), mode, torch.float32)
        assert isinstance(q, QUANT_TYPES[mode][0])
        torch.testing.assert_close(q.bias.float(), linear.bias.detach())
        with torch.inference_mode():
            assert _rel_err(q(x).float(), ref) < tol


def test_none_returns_module_unchanged(layer: LlamaDecoderLayer) -> None:
    assert "none" in QUANT_MODES
    assert quantize_linear_layers(layer, "none", torch.float32) is layer
    assert type(layer.self_attn.q_proj) is torch.nn.Linear


def test_already_quantized_layers_are_not_wrapped_again(layer: LlamaDecoderLayer) -> None:
    q = quantize_linear_layers(copy.deepcopy(layer), "int8", torch.float32)
    before = linear_weight_bytes(q)
    q = quantize_linear_layers(q, "nf4", torch.float32)
    assert isinstance(q.mlp.down_proj, bnb.nn.Linear8bitLt)
    assert linear_weight_bytes(q) == before


@pytest.mark.parametrize("mode", ["int4", "fp4", "", "NF4"])
def test_unknown_mode_raises(mode: str) -> None:
    with pytest.raises(ValueError, match="Unknown quantization mode"):
        quantize_linear_layers(torch.nn.Linear(8, 8), mode, torch.float32)
