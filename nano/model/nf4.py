"""
NF4: 4-bit NormalFloat quantization, stored exactly the way bitsandbytes stores it (QLoRA).

Trained weights are roughly normally distributed, so NF4 spends its 16 code values where a normal
distribution puts its mass: each value is a quantile of N(0, 1), scaled into [-1, 1]. A weight is
cut into blocks of 64; each block is divided by its largest |w| (its "absmax", kept in fp32) and
every weight becomes the index (0..15) of its nearest code value, two indices per byte.
Double quantization then squeezes the absmax values themselves to 8 bits, which brings the cost
from 4.5 bits per parameter down to ~4.127.

Paper: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023), section 3.
Layout: bitsandbytes' (functional.py: create_normal_map, quantize_4bit); tests/test_07_nf4.py checks
our bytes against vectors computed with it.

    state = quantize_nf4(torch.randn(1024, 1024), blocksize=64)
    w_hat = dequantize_nf4(state)                 # same shape, mean |w - w_hat| ~ 0.0728
    model = quantize_model(model)                  # every attention / MLP nn.Linear -> Linear4bit

Test: `make check-7` (tests/test_07_nf4.py).
"""

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nano.model.targets import DEFAULT_TARGETS, name_matches, parse_targets

# ---------------------------------------------------------------------------------------------
# 1. the 16 code values

# bitsandbytes' `create_normal_map(offset=0.9677083)`: the largest quantile used. Using 1.0 would
# ask for ndtri(1) = +inf; 0.9677083 is chosen so that the outermost value still sits inside the
# distribution (it is the mean of the two quantiles 1 - 0.5/16 and 1 - 0.5/15 used in the paper).
NF4_OFFSET = 0.9677083


def nf4_code_values() -> torch.Tensor:
    """The 16 NF4 code values in index order, derived from normal quantiles (no scipy needed).

    The inverse normal CDF ("probit", scipy's norm.ppf) is torch.special.ndtri. An equivalent
    formula is sqrt(2) * erfinv(2p - 1), since Phi(x) = (1 + erf(x / sqrt(2))) / 2.

      8 positive values: ndtri(p) for p in linspace(0.9677083, 0.5, 9) without its last point (0.5)
      7 negative values: -ndtri(p) for p in linspace(0.9677083, 0.5, 8) without its last point
      plus an exact 0, sorted and divided by the largest (so the range is exactly [-1, 1]).

    One more value on the positive side than on the negative one, and still an exact zero: 16
    values cannot be symmetric around a zero, and a representable zero matters (padding, and
    weights that really are zero).

    >>> nf4_code_values()[[0, 7, 15]]
    tensor([-1.,  0.,  1.])
    """
    # subtle: bitsandbytes builds the probabilities in float32 (torch.linspace), evaluates the
    # quantiles in float64 (scipy), stores them as float32 and divides in float32. Doing the same
    # reproduces its table bit for bit (tests/test_07_nf4.py checks all 16 values).
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()
    values = values.sort().values
    return values / values.max()


NF4_CODE = nf4_code_values()  # (16,) float32, index order: NF4_CODE[0] = -1.0, [7] = 0.0, [15] = 1.0

# A normalised weight goes to the code value it is nearest to, i.e. to the index of the interval
# between consecutive midpoints it falls into. The midpoints are taken in float64 and rounded to
# float32, like the constants of bitsandbytes' CUDA decision tree (`if (x > 0.8614784f) ...`).
NF4_MIDPOINTS = ((NF4_CODE[:-1].double() + NF4_CODE[1:].double()) / 2).float()  # (15,)

# Both code values of every possible byte, (256, 2): NF4_PAIRS[b] = [NF4_CODE[b >> 4], NF4_CODE[b & 15]].
# Dequantizing through it is one lookup per byte instead of unpacking two nibbles into a long index
# per weight: the same numbers, several times less memory traffic (decoding dequantizes every step).
NF4_PAIRS = torch.stack([NF4_CODE[torch.arange(256) >> 4], NF4_CODE[torch.arange(256) & 0x0F]], dim=1)
# subtle: the same table with each row's 8 bytes seen as ONE int64. Gathering 8-byte items from a flat
# table is ~2.5x faster in PyTorch than gathering rows of two floats; the bits are only copied, so
# viewing the result as float32 again gives exactly the two code values.
NF4_PAIRS_AS_INT64 = NF4_PAIRS.contiguous().view(torch.int64).view(-1)  # (256,)


def dequantize_packed(packed: torch.Tensor, block_scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Whole blocks of packed NF4 bytes -> fp32 weights (n_blocks, blocksize): code values * block absmax.

    >>> dequantize_packed(torch.tensor([0xC0, 0x87], dtype=torch.uint8), torch.tensor([2.0]), 4)
    tensor([[ 0.8814, -2.0000,  0.1592,  0.0000]])
    """
    table = NF4_PAIRS_AS_INT64.to(packed.device)
    pairs = table.index_select(0, packed.int()).view(torch.float32)  # (2 * bytes,): both values of each byte
    return pairs.view(-1, blocksize) * block_scales[:, None]


# double quantization: the absmax values are quantized in blocks of this many (QLoRA paper: 256)
DQ_BLOCKSIZE = 256


def nearest_code_index(x: torch.Tensor) -> torch.Tensor:
    """Index (uint8, 0..15) of the NF4 code value nearest to each x in [-1, 1].

    An x exactly on a midpoint goes to the LOWER index: the index is the number of midpoints
    strictly below x, which is what searchsorted's default (left) side counts.

    >>> nearest_code_index(torch.tensor([-1.0, 0.0, 0.1, 0.5, 1.0]))
    tensor([ 0,  7,  8, 12, 15], dtype=torch.uint8)
    """
    midpoints = NF4_MIDPOINTS.to(x.device)
    return torch.searchsorted(midpoints, x.float().contiguous()).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# 2. two 4-bit indices per byte


def pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """Pack a flat, even-length tensor of 4-bit indices two per byte, the first in the HIGH nibble.

    >>> pack_nibbles(torch.tensor([12, 0, 8, 7], dtype=torch.uint8))   # 0xC0, 0x87
    tensor([192, 135], dtype=torch.uint8)
    """
    assert indices.numel() % 2 == 0, "pad to an even length before packing"
    return (indices[0::2] << 4) | indices[1::2]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The inverse of pack_nibbles: (numel,) uint8 indices, high nibble first.

    >>> unpack_nibbles(torch.tensor([192, 135], dtype=torch.uint8), 3)
    tensor([12,  0,  8], dtype=torch.uint8)
    """
    high = packed >> 4
    low = packed & 0x0F
    return torch.stack([high, low], dim=1).flatten()[:numel]  # (2 * bytes,) -> (numel,)


# ---------------------------------------------------------------------------------------------
# 3. blockwise quantization of a whole tensor


@dataclass
class QuantState:
    """Everything needed to rebuild a tensor quantized to NF4 (bitsandbytes keeps the same pieces).

    packed:        (ceil(numel / 2),) uint8, two code indices per byte
    absmax:        (n_blocks,) fp32 scale of each block of `blocksize` values — or None with double
                   quantization, where the three fields below stand in for it:
    absmax_codes:  (n_blocks,) int8, the absmax values minus their mean, on an 8-bit grid
    absmax_scales: (ceil(n_blocks / 256),) fp32, the largest |absmax - mean| of each 256 blocks
    absmax_mean:   () fp32, the mean of the absmax values
    """

    packed: torch.Tensor
    absmax: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    numel: int
    blocksize: int
    absmax_codes: torch.Tensor | None = None
    absmax_scales: torch.Tensor | None = None
    absmax_mean: torch.Tensor | None = None
    dq_blocksize: int = DQ_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    def block_scales(self) -> torch.Tensor:
        """The fp32 absmax of every block, rebuilt from its 8-bit form under double quantization."""
        if not self.double_quant:
            return self.absmax
        return dequantize_absmax(self.absmax_codes, self.absmax_scales, self.absmax_mean, self.dq_blocksize)

    def nbytes(self) -> int:
        """Bytes this state really occupies (the packed codes plus every scale)."""
        tensors = [self.packed, self.absmax, self.absmax_codes, self.absmax_scales, self.absmax_mean]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize_absmax(absmax: torch.Tensor, dq_blocksize: int = DQ_BLOCKSIZE):
    """Double quantization: the fp32 absmax values -> (int8 codes, fp32 scale per 256, fp32 mean).

    1. Subtract the mean: absmax values are all positive and bunched together (around 2.5-4 for
       N(0, 1) weights at block 64), so centring them lets the 8-bit grid cover only the spread.
    2. Cut into blocks of 256 and divide each by its largest |value| (the same absmax trick again).
    3. Round to the symmetric linear 8-bit grid k / 127, k in -127..127, stored as int8.

    Our choice for step 3: bitsandbytes uses its "dynamic" 8-bit map there (a tiny float format
    with a sign, an exponent given by the count of leading zeros, and the rest as fraction: finer
    steps near 0, coarser near +-1). The linear grid is simpler to read and costs the same 8 bits:
    its error is at most half a step, scale / 254, under 0.4% of the largest |absmax - mean| of
    the 256 blocks (for N(0, 1) weights at block 64: under 0.5% of the absmax values, tested).

    >>> codes, scales, mean = quantize_absmax(torch.tensor([2.0, 3.0, 4.0]))
    >>> codes, scales, mean                       # (2, 3, 4) - 3 = (-1, 0, 1), scale 1
    (tensor([-127,    0,  127], dtype=torch.int8), tensor([1.]), tensor(3.))
    """
    absmax = absmax.float()
    mean = absmax.mean()
    centred = absmax - mean
    n_blocks = centred.numel()
    padded = F.pad(centred, (0, -n_blocks % dq_blocksize)).view(-1, dq_blocksize)  # (n_dq, 256)
    scales = padded.abs().amax(dim=1)  # (n_dq,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-equal block has scale 0
    codes = torch.round(padded / safe[:, None] * 127).to(torch.int8)
    return codes.flatten()[:n_blocks], scales, mean


def dequantize_absmax(codes: torch.Tensor, scales: torch.Tensor, mean: torch.Tensor,
                      dq_blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    """The inverse of quantize_absmax: codes / 127 * scale of their 256-block + mean -> (n_blocks,) fp32."""
    block_of = torch.arange(codes.numel(), device=codes.device) // dq_blocksize
    return codes.float() / 127 * scales[block_of] + mean


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 dq_blocksize: int = DQ_BLOCKSIZE) -> QuantState:
    """Quantize any tensor to NF4, block by block.

    1. flatten; pad with zeros to a whole number of blocks (the padding is cut off again on the way
       back, `numel` remembers where)
    2. absmax of each block, in fp32
    3. scale each block into [-1, 1] and take the nearest code index (ties to the lower index)
    4. pack two indices per byte; keep ceil(numel / 2) bytes, like bitsandbytes
    5. optionally, double-quantize the absmax values (see quantize_absmax)

    Worked example: [0.5, -1, 0.1, 0] is one block with absmax 1 -> indices [12, 0, 8, 7]
    (0.5 is nearer 0.4407 than 0.5626) -> bytes 0xC0 0x87.
    """
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even number (two indices share a byte), got {blocksize}")
    numel = w.numel()
    flat = w.detach().reshape(-1).float()
    blocks = F.pad(flat, (0, -numel % blocksize)).view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,) fp32
    # subtle: bitsandbytes multiplies by the reciprocal 1/absmax rather than dividing; the two can
    # differ in the last bit, which decides an index only at an exact midpoint. We do the same.
    # An all-zero block (absmax 0) must not divide by zero: it maps to code 0.0 (index 7) anyway.
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    indices = nearest_code_index(blocks * inverse[:, None]).flatten()  # (n_blocks * blocksize,)
    packed = pack_nibbles(indices)[: (numel + 1) // 2]
    state = QuantState(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype, numel=numel,
                       blocksize=blocksize, dq_blocksize=dq_blocksize)
    if double_quant:
        state.absmax_codes, state.absmax_scales, state.absmax_mean = quantize_absmax(absmax, dq_blocksize)
        state.absmax = None
    return state


def dequantize_nf4(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild the tensor: code[index] * absmax[block], in the original shape (and dtype unless given).

    The product is taken in fp32 and only then cast, as bitsandbytes does.
    """
    if state.numel % state.blocksize == 0:
        # the usual case (whole blocks, so whole bytes): each byte looks up its two code values at once
        weights = dequantize_packed(state.packed, state.block_scales(), state.blocksize)  # (n_blocks, blocksize)
        return weights.view(state.shape).to(dtype or state.dtype)
    # footgun: index with int64, not uint8 (a uint8 index tensor would be read as a boolean mask)
    indices = unpack_nibbles(state.packed, state.numel).long()  # (numel,)
    values = NF4_CODE.to(indices.device)[indices]  # (numel,) fp32 in [-1, 1]
    blocks = F.pad(values, (0, -state.numel % state.blocksize)).view(-1, state.blocksize)  # (n_blocks, blocksize)
    weights = (blocks * state.block_scales()[:, None]).flatten()[: state.numel]  # (numel,) fp32
    return weights.view(state.shape).to(dtype or state.dtype)


def bits_per_parameter(blocksize: int = 64, double_quant: bool = False, dq_blocksize: int = DQ_BLOCKSIZE) -> float:
    """Storage cost of NF4 per weight, counting the scales (the one fp32 mean per tensor is ignored).

    >>> bits_per_parameter(64)                     # 4 + 32/64
    4.5
    >>> round(bits_per_parameter(64, double_quant=True), 3)   # 4 + 8/64 + 32/(64*256)
    4.127
    """
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)


def quantization_error(w: torch.Tensor, state: QuantState) -> dict[str, float]:
    """Error statistics of a quantized tensor: mean/max absolute error and RMS error relative to w's RMS."""
    error = (dequantize_nf4(state, torch.float32) - w.float()).flatten()
    return {
        "mean_abs": error.abs().mean().item(),
        "max_abs": error.abs().max().item(),
        "relative_rms": (error.pow(2).mean().sqrt() / w.float().pow(2).mean().sqrt().clamp_min(1e-12)).item(),
    }


# ---------------------------------------------------------------------------------------------
# 4. a linear layer whose weight is stored in NF4


class Linear4bit(nn.Module):
    """A frozen linear layer stored in NF4: y = x W_hat^T + b, W_hat dequantized inside forward.

    The weight lives in buffers (saved in the state_dict, moved by .to(device), never handed to
    an optimizer): `weight_packed` (uint8) and `weight_absmax` (fp32), or under double quantization
    `weight_absmax_codes` (int8), `weight_absmax_scales` and `weight_absmax_mean` (fp32).
    Gradients flow to the input x (and so to a LoRA branch beside it), never to W.

    Build one with `Linear4bit.from_linear(linear)`, or make an empty one of the right shape and
    fill it with load_state_dict (a state_dict quantized with another blocksize or double_quant
    setting has other buffer sizes or names, and load_state_dict refuses it).
    """

    _FP32_BUFFERS = ("weight_absmax", "weight_absmax_scales", "weight_absmax_mean")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, blocksize: int = 64,
                 double_quant: bool = False, weight_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.dq_blocksize = DQ_BLOCKSIZE
        self.weight_dtype = weight_dtype  # dtype of the weight before quantization (for merges, exports)
        numel = in_features * out_features
        n_blocks = -(-numel // blocksize)  # ceil division
        self.register_buffer("weight_packed", torch.zeros((numel + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            n_dq = -(-n_blocks // self.dq_blocksize)
            self.register_buffer("weight_absmax_codes", torch.zeros(n_blocks, dtype=torch.int8, device=device))
            self.register_buffer("weight_absmax_scales", torch.zeros(n_dq, dtype=torch.float32, device=device))
            self.register_buffer("weight_absmax_mean", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("weight_absmax", torch.zeros(n_blocks, dtype=torch.float32, device=device))
        # the bias (if any) stays in full precision, frozen like the weight
        self.register_buffer("bias", torch.zeros(out_features, dtype=weight_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False) -> "Linear4bit":
        """Quantize an nn.Linear's weight to NF4 (its bias is kept as it is)."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, blocksize=blocksize,
                    double_quant=double_quant, weight_dtype=weight.dtype, device=weight.device)
        layer.load_quant_state(quantize_nf4(weight, blocksize, double_quant))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def load_quant_state(self, state: QuantState) -> None:
        """Copy a QuantState of shape (out_features, in_features) into this layer's buffers."""
        expected = (self.out_features, self.in_features)
        if tuple(state.shape) != expected or state.blocksize != self.blocksize or state.double_quant != self.double_quant:
            raise ValueError(f"QuantState {tuple(state.shape)} block {state.blocksize} dq {state.double_quant} does not "
                             f"fit this Linear4bit {expected} block {self.blocksize} dq {self.double_quant}")
        self.weight_packed.copy_(state.packed)
        if self.double_quant:
            self.weight_absmax_codes.copy_(state.absmax_codes)
            self.weight_absmax_scales.copy_(state.absmax_scales)
            self.weight_absmax_mean.copy_(state.absmax_mean)
        else:
            self.weight_absmax.copy_(state.absmax)
        self.weight_dtype = state.dtype

    def quant_state(self) -> QuantState:
        """This layer's weight as a QuantState (views of the buffers, nothing copied)."""
        return QuantState(
            packed=self.weight_packed, absmax=None if self.double_quant else self.weight_absmax,
            shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
            numel=self.out_features * self.in_features, blocksize=self.blocksize,
            absmax_codes=getattr(self, "weight_absmax_codes", None),
            absmax_scales=getattr(self, "weight_absmax_scales", None),
            absmax_mean=getattr(self, "weight_absmax_mean", None), dq_blocksize=self.dq_blocksize)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_hat, (out_features, in_features), in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_nf4(self.quant_state(), dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # dequantize to the compute dtype of the input (bf16 activations -> bf16 weight). The buffers
        # do not require grad, so autograd records W_hat as a constant: x gets a gradient, W none.
        # (bitsandbytes saves memory by dequantizing again in backward instead of keeping W_hat
        # alive until then; at our sizes the simple version is fine.)
        weight = self.dequantize_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def requires_grad_(self, requires_grad: bool = True) -> "Linear4bit":
        if requires_grad:
            raise RuntimeError(
                "the weight of a Linear4bit is frozen: 4-bit codes cannot take gradient steps. Train LoRA "
                "adapters on top of it (nano.model.lora.inject_lora), or load the checkpoint without --quantize "
                "to fine-tune every weight.")
        return self

    def _apply(self, fn, recurse: bool = True):
        # subtle: model.to(torch.bfloat16) casts EVERY floating-point buffer, which would round the
        # fp32 block scales to bf16 (8 bits of mantissa) and change every weight. bitsandbytes keeps
        # them fp32 too. So we take them out, let `fn` move/cast the rest, then move them (only) to
        # wherever the packed bytes went.
        scales = {name: self._buffers.pop(name) for name in self._FP32_BUFFERS if name in self._buffers}
        super()._apply(fn, recurse)
        for name, tensor in scales.items():
            self._buffers[name] = tensor.to(self.weight_packed.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}")


# ---------------------------------------------------------------------------------------------
# 5. whole models


def quantize_model(model: nn.Module, targets: str | Iterable[str] = DEFAULT_TARGETS, blocksize: int = 64,
                   double_quant: bool = False) -> nn.Module:
    """Swap every nn.Linear whose name matches `targets` for a Linear4bit, in place; returns the model.

    Targets match as in LoRA (nano.model.targets.name_matches): "q_proj" matches any module whose dotted
    name ends in ".q_proj"; "re:<regex>" matches the whole name. The default is every attention
    and MLP projection; the embedding (and the LM head tied to it) stays in full precision, as in
    QLoRA. Quantize first, then inject LoRA (that order is QLoRA).
    """
    if any(hasattr(module, "lora_A") for module in model.modules()):
        raise ValueError("this model already has LoRA adapters: quantize the base first, then inject LoRA "
                         "(or merge the adapters with nano.model.lora.merge_lora before quantizing)")
    targets = parse_targets(targets)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name_matches(name, targets)]
    if not chosen:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"no nn.Linear matches targets {list(targets)}; the model's linear layers are {linears[:8]}")
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Linear4bit.from_linear(linear, blocksize, double_quant))
    return model


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of everything the model's state_dict holds (parameters and saved buffers).

    Tied tensors (the embedding shared with the LM head) are counted once; buffers that are not
    saved (caches such as RoPE tables) are not weights and are left out.
    """
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor):  # extra state some modules keep (not weights)
            continue
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def require_full_precision(model: nn.Module, purpose: str = "full fine-tuning") -> None:
    """Stop with a clear message if any layer of `model` is stored in 4 bits.

    Call it before training every weight: an optimizer built from model.parameters() would
    silently skip the 4-bit layers (their weights are buffers), and train only the rest.
    """
    quantized = [name for name, module in model.named_modules() if isinstance(module, Linear4bit)]
    if quantized:
        raise ValueError(
            f"{purpose} needs full-precision weights, but {len(quantized)} layers are 4-bit (e.g. {quantized[0]}). "
            f"Load the checkpoint without --quantize, or train LoRA adapters on the 4-bit base (lesson 7).")


if __name__ == "__main__":  # a quick look: python -m nano.model.nf4
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    print("NF4 code values:", [round(v, 4) for v in NF4_CODE.tolist()])
    for dq in (False, True):
        state = quantize_nf4(w, 64, double_quant=dq)
        err = quantization_error(w, state)
        print(f"double_quant={dq!s:5}  mean |error| {err['mean_abs']:.4f}  max {err['max_abs']:.3f}  "
              f"bits/param {8 * state.nbytes() / w.numel():.3f} (formula {bits_per_parameter(64, dq):.3f})")
    print(f"(fp32 is 32 bits per parameter, bf16 16: NF4 with double quantization is {4.127 / 16:.0%} of bf16)")
