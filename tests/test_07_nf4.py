"""
Exercise (lesson 7): implement 4-bit NormalFloat quantization in nano/model/nf4.py, stored as bitsandbytes does.

  1. `nf4_code_values()`: the 16 code values from normal quantiles (torch.special.ndtri, no scipy),
     equal to bitsandbytes' table.
  2. `quantize_nf4(w, blocksize=64, double_quant=False)` and `dequantize_nf4(state)`: flatten, blocks
     of 64, absmax per block, nearest code (midpoints go to the lower index), two indices per byte
     with the first in the high nibble; any shape, any length (odd, not a multiple of the block).
  3. Double quantization of the absmax values (mean subtracted, 8 bits, blocks of 256) and
     `bits_per_parameter`: 4.5 bits without it, ~4.127 with it.
  4. `Linear4bit`: a frozen 4-bit linear layer (gradients reach the input only; training its weight
     is refused), `quantize_model` to swap a model's projections, and its state_dict round trip.

Run: `make check-7` or `.venv/bin/python -m pytest -q tests/test_07_nf4.py`.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import impl
from toy_models import ToyModel

nf4 = impl("nf4")

# bitsandbytes' NF4 table (its functional.py, create_normal_map), in index order
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


# ---------------------------------------------------------------------------------------------
# a small model with Gemma-2's module names, so quantize_model has something to find (tests/toy_models.py)


def toy_model(seed: int = 0) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel().eval()


# ---------------------------------------------------------------------------------------------
# 1. code values


def test_code_values_match_bitsandbytes():
    derived = nf4.nf4_code_values()
    assert derived.shape == (16,) and derived.dtype == torch.float32
    torch.testing.assert_close(derived, torch.tensor(BNB_NF4), rtol=0, atol=1e-6)
    torch.testing.assert_close(nf4.NF4_CODE, torch.tensor(BNB_NF4), rtol=0, atol=1e-6)


def test_code_values_are_normal_quantiles():
    # the positive side, before normalisation, is the normal quantile function: check two by hand
    # with erfinv (Phi^-1(p) = sqrt(2) erfinv(2p - 1)), which is independent of ndtri
    top = (2 ** 0.5) * torch.erfinv(torch.tensor(2 * 0.9677083 - 1, dtype=torch.float64))
    p2 = 0.9677083 - (0.9677083 - 0.5) / 8  # second point of linspace(0.9677083, 0.5, 9)
    second = (2 ** 0.5) * torch.erfinv(torch.tensor(2 * p2 - 1, dtype=torch.float64))
    assert abs(nf4.NF4_CODE[14].item() - (second / top).item()) < 1e-6


# ---------------------------------------------------------------------------------------------
# 2. packing check vectors and round-trip error


def test_linspace_packs_to_reference_hex():
    state = nf4.quantize_nf4(torch.linspace(-1, 1, 64), blocksize=64)
    assert state.packed.dtype == torch.uint8
    assert state.packed.numpy().tobytes().hex() == "00000111111112222233344445556667788899aaabbbccccddddeeeeeeefffff"
    assert state.absmax.tolist() == [1.0]


def test_first_element_goes_in_the_high_nibble():
    x = torch.zeros(64)
    x[:3] = torch.tensor([0.5, -1.0, 0.1])
    packed = nf4.quantize_nf4(x, blocksize=64).packed
    assert packed[0].item() == 0xC0 and packed[1].item() == 0x87  # (12, 0), (8, 7)
    assert packed[2:].tolist() == [0x77] * 30  # zeros are code 7


def test_exact_midpoint_goes_to_lower_index():
    code = nf4.NF4_CODE.double()
    midpoints = ((code[:-1] + code[1:]) / 2).float()  # a value that IS the float32 midpoint
    x = torch.cat([midpoints, torch.ones(1)])  # the 1.0 fixes absmax = 1 so nothing is rescaled
    indices = nf4.unpack_nibbles(nf4.quantize_nf4(x, blocksize=16).packed, 16)
    assert indices[:15].tolist() == list(range(15))


def test_mean_absolute_error_on_randn():
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    state = nf4.quantize_nf4(w, blocksize=64)
    w_hat = nf4.dequantize_nf4(state)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    mae = (w - w_hat).abs().mean().item()
    assert abs(mae - 0.0728) < 0.001, mae


def brute_force_nf4(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Independent reference: argmin distance to the 16 codes, block by block (argmin breaks ties low)."""
    flat = x.flatten().float()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), blocksize):
        block = flat[start:start + blocksize]
        absmax = block.abs().max()
        scaled = block / absmax if absmax > 0 else block
        nearest = (scaled[:, None] - torch.tensor(BNB_NF4)[None, :]).abs().argmin(dim=1)
        out[start:start + blocksize] = torch.tensor(BNB_NF4)[nearest] * absmax
    return out.view(x.shape)


@pytest.mark.parametrize("shape", [(7,), (1,), (3, 5, 7), (1000,), (130, 3)])
def test_odd_lengths_and_partial_blocks_round_trip(shape):
    torch.manual_seed(1)
    x = torch.randn(shape)
    state = nf4.quantize_nf4(x, blocksize=64)
    numel = x.numel()
    assert state.packed.numel() == (numel + 1) // 2  # two per byte, the last half-byte padded
    assert state.absmax.numel() == -(-numel // 64)  # one scale per (partial) block
    x_hat = nf4.dequantize_nf4(state)
    assert x_hat.shape == x.shape
    torch.testing.assert_close(x_hat, brute_force_nf4(x, 64), rtol=0, atol=1e-6)
    # the largest gap between codes is 1 - 0.723, so no value moves more than half of it (x absmax)
    assert (x - x_hat).abs().max() <= 0.139 * x.abs().max() + 1e-6


def test_other_dtypes_and_all_zero_blocks():
    x = torch.randn(3, 64).to(torch.bfloat16)
    x[1] = 0  # an all-zero block must not divide by zero
    x_hat = nf4.dequantize_nf4(nf4.quantize_nf4(x))
    assert x_hat.dtype == torch.bfloat16 and not torch.isnan(x_hat).any()
    assert (x_hat[1] == 0).all()
    assert (x_hat.float() - x.float()).abs().max() <= 0.139 * x.float().abs().max() + 1e-2


# ---------------------------------------------------------------------------------------------
# 3. double quantization and storage arithmetic


def test_double_quantization_is_close_to_single():
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    single = nf4.quantize_nf4(w, 64)
    double = nf4.quantize_nf4(w, 64, double_quant=True)
    assert double.absmax is None and double.absmax_codes.dtype in (torch.int8, torch.uint8)
    assert double.absmax_scales.numel() == -(-single.absmax.numel() // 256)  # one fp32 per 256 blocks
    # the rebuilt scales are within a percent of the real ones
    rebuilt = double.block_scales()
    assert ((rebuilt - single.absmax).abs() / single.absmax).max() < 0.01
    mae_single = (nf4.dequantize_nf4(single) - w).abs().mean().item()
    mae_double = (nf4.dequantize_nf4(double) - w).abs().mean().item()
    assert abs(mae_double - mae_single) < 0.0005
    assert 8 * double.nbytes() / w.numel() < 8 * single.nbytes() / w.numel()


def test_bits_per_parameter():
    assert nf4.bits_per_parameter(64) == 4.5
    assert nf4.bits_per_parameter(64, double_quant=True) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert round(nf4.bits_per_parameter(64, double_quant=True), 3) == 4.127
    assert nf4.bits_per_parameter(128) == 4.25
    # and the bytes a real state holds agree with the formula
    w = torch.randn(512, 512)
    for dq in (False, True):
        measured = 8 * nf4.quantize_nf4(w, 64, double_quant=dq).nbytes() / w.numel()
        assert measured == pytest.approx(nf4.bits_per_parameter(64, dq), abs=0.001)


# ---------------------------------------------------------------------------------------------
# 4. Linear4bit and whole models


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_equals_linear_on_dequantized_weight(double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(48, 20, bias=True)
    layer = nf4.Linear4bit.from_linear(linear, blocksize=64, double_quant=double_quant)
    x = torch.randn(5, 48)
    w_hat = nf4.dequantize_nf4(nf4.quantize_nf4(linear.weight, 64, double_quant))
    torch.testing.assert_close(layer(x), F.linear(x, w_hat, linear.bias), rtol=0, atol=1e-6)
    assert list(layer.parameters()) == []  # the weight is buffers, nothing for an optimizer


def test_linear4bit_gradients_reach_the_input_only():
    torch.manual_seed(0)
    layer = nf4.Linear4bit.from_linear(nn.Linear(64, 16, bias=False))
    x = torch.randn(3, 64, requires_grad=True)
    upstream = torch.randn(3, 16)
    (layer(x) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream @ layer.dequantize_weight(torch.float32))
    assert all(not b.requires_grad and b.grad is None for b in layer.buffers())


def test_training_a_4bit_base_is_refused():
    model = nf4.quantize_model(toy_model())
    layer = model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="frozen"):
        layer.requires_grad_(True)
    with pytest.raises(ValueError, match="4-bit"):
        nf4.require_full_precision(model, purpose="full fine-tuning")
    nf4.require_full_precision(toy_model())  # a full-precision model passes


def test_quantize_model_swaps_only_the_projections():
    model = toy_model()
    reference = copy.deepcopy(model)
    ids = torch.arange(20)
    nf4.quantize_model(model, blocksize=64)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["layers.1.self_attn.k_proj"] == "Linear4bit" and kinds["layers.0.mlp.down_proj"] == "Linear4bit"
    assert sum(kind == "Linear4bit" for kind in kinds.values()) == 14 and "Linear" not in kinds.values()
    assert torch.equal(model.embed_tokens.weight, reference.embed_tokens.weight)  # embedding untouched
    out, ref = model(ids), reference(ids)
    relative = ((out - ref).norm() / ref.norm()).item()
    assert 0 < relative < 0.15, relative  # changed (it is lossy) but close
    # only some targets, by regex
    partial = nf4.quantize_model(toy_model(), targets=[r"re:layers\.0\..*"])
    assert isinstance(partial.layers[0].mlp.up_proj, nf4.Linear4bit)
    assert isinstance(partial.layers[1].mlp.up_proj, nn.Linear)
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        nf4.quantize_model(toy_model(), targets=["w_qkv"])


def test_model_weight_bytes():
    model = toy_model()
    fp32 = nf4.model_weight_bytes(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert fp32 == 4 * n_params  # the tied embedding is counted once
    projections = n_params - model.embed_tokens.weight.numel()
    nf4_bytes = nf4.model_weight_bytes(nf4.quantize_model(toy_model(), blocksize=64))
    assert nf4_bytes == 4 * model.embed_tokens.weight.numel() + projections * 4.5 / 8
    dq_bytes = nf4.model_weight_bytes(nf4.quantize_model(toy_model(), blocksize=64, double_quant=True))
    assert dq_bytes < nf4_bytes


def test_state_dict_round_trip(tmp_path):
    model = nf4.quantize_model(toy_model(seed=0), double_quant=True)
    torch.save(model.state_dict(), tmp_path / "q.pt")
    other = nf4.quantize_model(toy_model(seed=1), double_quant=True)  # other weights, same layout
    ids = torch.arange(10)
    assert not torch.equal(other(ids), model(ids))
    other.load_state_dict(torch.load(tmp_path / "q.pt"))
    assert torch.equal(other(ids), model(ids))
    # quantized with other settings: other buffer names or sizes, refused by load_state_dict
    with pytest.raises(RuntimeError, match="weight_absmax"):
        nf4.quantize_model(toy_model(), double_quant=False).load_state_dict(torch.load(tmp_path / "q.pt"))
    with pytest.raises(RuntimeError, match="size mismatch"):
        nf4.quantize_model(toy_model(), blocksize=32, double_quant=True).load_state_dict(torch.load(tmp_path / "q.pt"))


def test_bfloat16_model_keeps_fp32_scales():
    model = nf4.quantize_model(toy_model())
    reference = model.layers[0].self_attn.q_proj.dequantize_weight(torch.float32)
    model.to(torch.bfloat16)
    layer = model.layers[0].self_attn.q_proj
    assert layer.weight_absmax.dtype == torch.float32  # the scales survive .to(bfloat16)
    torch.testing.assert_close(layer.dequantize_weight(torch.float32), reference, rtol=0, atol=0)
    assert model(torch.arange(4)).dtype == torch.bfloat16  # computes in the activations' dtype
