"""
LoRA: fine-tune a frozen model by learning a small low-rank update beside each chosen linear layer.

A linear layer y = W x is kept frozen and gets a side branch: y = W x + (alpha / r) * B (A x), where
A is (r, in) and B is (out, r) with r much smaller than in and out. B starts at zero, so the adapted
model starts out exactly equal to the base; only A and B (about 1% of the parameters) are trained,
and only they need saving. Afterwards B A can be added into W ("merged") so serving costs nothing.

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021); rsLoRA (Kalajdzievski,
2023) scales by alpha / sqrt(r) instead of alpha / r so that larger ranks keep learning.
QLoRA (lesson 7) is the same thing with a 4-bit base: LoRALinear wraps nano.model.nf4.Linear4bit too.

    summary = inject_lora(model, r=8, alpha=16)   # wraps every attention and MLP projection
    print(summary)                                 # LoRA r=8 alpha=16 on 14 layers: trainable 0.93% ...
    ... train ...
    save_adapter(model, "adapter.pt", base_identity={"model_config": cfg_dict, "checkpoint": fingerprint})
    load_adapter(fresh_base_model, "adapter.pt", base_identity=...)   # refuses a different base
    merge_lora(model)                              # plain nn.Linear layers again, for export / serving

Test: `make check-6` (tests/test_06_lora.py).
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nano.common.fileio import save_checkpoint
from nano.model.targets import DEFAULT_TARGETS, name_matches, parse_targets

ADAPTER_FORMAT = "nano-lora-adapter"  # written into every adapter file, checked on load


# ---------------------------------------------------------------------------------------------
# 1. which layers: module-name patterns (nano/model/targets.py), and which of them LoRA can wrap


def is_4bit(module: nn.Module) -> bool:
    """A linear layer stored in 4 bits (nano.model.nf4.Linear4bit, or any layer with the same interface)."""
    return hasattr(module, "dequantize_weight") and hasattr(module, "in_features")


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can wrap: an nn.Linear or a 4-bit linear."""
    return isinstance(module, nn.Linear) or is_4bit(module)


def base_weight(base: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight W (out, in) of a linear layer: as stored, or dequantized from 4 bits."""
    weight = base.dequantize_weight(torch.float32) if is_4bit(base) else base.weight.detach()
    return weight.to(dtype) if dtype is not None else weight


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# 2. the adapted layer


def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B A, (out, in), formed in (at least) fp32: bf16 -> fp32, fp32 and fp64 stay.

    The one place it is computed, so that every path that uses it (LoRAFunction in training, the
    fused decode step of nano/model/decode_step.py, merge_lora) gets the same bits."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(wide) + scaling * (B.to(wide) @ A.to(wide))  # (out, r) @ (r, in)


class LoRAFunction(torch.autograd.Function):
    """y = x (W + s B A)^T + b with W frozen (s = scaling): a LoRA layer's forward and backward, written out.

    Autograd gets the same numbers from `base(x) + s * lora_B(lora_A(x))`, but on a CPU at our sizes
    that step cost MORE than full fine-tuning, though LoRA skips every weight gradient: with r = 8
    beside layers 128-384 wide, each thin product of the branch is a pass over a whole (tokens, width)
    activation for very little arithmetic, and their passes outweighed the products they saved.
    Written out, the forward is ONE product with the merged weight W + s B A ((out, in): tiny to
    form, once per call), and the backward needs

        dL/dx = g (W + s B A)           the product full fine-tuning makes too
        dL/dB = s g^T h,  h = x A^T     thin: (out, N) x (N, r)
        dL/dA = s (g B)^T x             thin: (r, N) x (N, in)

    but never dL/dW = g^T x, the wide product full fine-tuning adds. Shapes: x (N, in), W (out, in),
    A (r, in), B (out, r), g = dL/dy (N, out); N is every token of the batch. The merged weight is
    formed in (at least) fp32 and cast to the compute dtype, as mixed precision treats full
    fine-tuning's weights.
    """

    @staticmethod
    def forward(ctx, x, weight, A, B, scaling, bias):
        merged = merged_weight(weight, A, B, scaling).to(x.dtype)
        ctx.save_for_backward(x, merged, A, B)
        ctx.scaling = scaling
        return F.linear(x, merged, bias)  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, g):  # g: (..., out)
        x, merged, A, B = ctx.saved_tensors
        s = ctx.scaling
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]).to(x.dtype)  # (N, in), (N, out)
        grad_x = None
        if ctx.needs_input_grad[0]:  # no need where x comes from frozen weights only (the first layer)
            # (N, out) @ (out, in), with the weight copied to an (in, out) layout first: a small copy
            # that makes MKL's product up to 1.9x faster on this CPU where out < in (measured)
            grad_x = F.linear(g2, merged.t().contiguous()).view(x.shape)
        # the thin products keep the long N dimension inside (h as hT = A x^T, (r, N)): MKL runs
        # them several times faster that way than g^T h as written (2.6 -> 0.4 ms for out = 384)
        hT = A.to(x.dtype) @ x2.t()  # (r, in) @ (in, N) -> (r, N)
        grad_B = (hT @ g2).t() * s  # (r, N) @ (N, out) -> (r, out), transposed to B's (out, r)
        grad_A = (B.t().to(x.dtype) @ g2.t()) @ x2 * s  # (r, out) @ (out, N) -> (r, N); @ (N, in) -> (r, in)
        return grad_x, None, grad_A.to(A.dtype), grad_B.to(B.dtype), None, None


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B(A(dropout(x))), with the base frozen and only A, B trained.

    Without dropout the two terms are one product, y = x (W + scaling * B A)^T (LoRAFunction above).

    scaling = alpha / r (or alpha / sqrt(r) with rslora). A is (r, in_features), initialised
    Kaiming-uniform like an nn.Linear; B is (out_features, r), initialised to zeros, so B A = 0 and
    the layer starts out computing exactly what the base computed.

    >>> layer = LoRALinear(nn.Linear(16, 32, bias=False), r=4, alpha=8)
    >>> layer.scaling, tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape)
    (2.0, (4, 16), (32, 4))
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if not is_linear(base):
            raise TypeError(f"LoRALinear wraps an nn.Linear or a 4-bit linear, not {type(base).__name__}")
        if r <= 0:
            raise ValueError(f"the LoRA rank r must be positive, got {r}")
        self.base = base
        for p in base.parameters():  # frozen: the whole point is not to train W
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora, self.dropout_p = r, alpha, rslora, dropout
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        # adapters in the base's dtype (fp32 beside a 4-bit base, as QLoRA trains them in high precision)
        dtype = torch.float32 if is_4bit(base) else base.weight.dtype
        device = _device_of(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # uniform(+-1/sqrt(in_features))
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted model starts equal to the base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # B A is inside W already
            return self.base(x)
        if self.dropout_p > 0 and self.training:
            # the branch sees another input than W (dropout only on the branch, as in the paper), so
            # the two products are computed apart: x: (..., in) -> A: (..., r) -> B: (..., out)
            update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
            return self.base(x) + self.scaling * update.to(x.dtype)
        bias = None if self.base.bias is None else self.base.bias.to(x.dtype)
        return LoRAFunction.apply(x, base_weight(self.base), self.lora_A.weight, self.lora_B.weight,
                                  self.scaling, bias)

    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B A (out, in) in at least fp32: what forward multiplies by (without dropout)."""
        return merged_weight(base_weight(self.base), self.lora_A.weight.detach(), self.lora_B.weight.detach(), self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A: the (out_features, in_features) update this adapter adds to W, in fp32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())  # (out, r) @ (r, in)

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling * B @ A, so forward runs the base alone (same output, one matmul less).

        Refused for a 4-bit base: the merged weight would have to be quantized again, and the
        update is small next to the 4-bit rounding step, so rounding would throw much of it away
        (lossy). merge_lora(model) instead dequantizes the base into a full-precision nn.Linear.
        """
        if is_4bit(self.base):
            raise RuntimeError(
                "cannot merge LoRA into a 4-bit base in place: re-quantizing W + scaling * B @ A would round "
                "most of the small update away. Use nano.model.lora.merge_lora(model), which dequantizes the base "
                "into a full-precision nn.Linear and merges exactly (quantize again afterwards if you must).")
        if self.merged:
            raise RuntimeError("this LoRA layer is merged already")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= scaling * B @ A: back to a frozen base plus a live branch (for more training).

        In fp32 the round trip returns W up to float rounding (~1e-7 relative); in bf16 it loses more.
        """
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged")
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}, merged={self.merged}"


# ---------------------------------------------------------------------------------------------
# 3. a whole model


@dataclass
class LoRAConfig:
    """The settings an adapter was made with (saved in the adapter file)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False


@dataclass
class LoRASummary:
    """What inject_lora did: the wrapped layers and the parameter counts after it."""

    modules: list[str]
    trainable: int
    total: int
    config: LoRAConfig

    def __str__(self) -> str:
        return (f"LoRA r={self.config.r} alpha={self.config.alpha:g} on {len(self.modules)} layers: "
                f"{format_trainable(self.trainable, self.total)}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model, by its dotted name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def trainable_parameter_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. The weights of 4-bit layers count as parameters (they are
    the model's weights, stored as buffers), so a QLoRA model reports the same total as a LoRA one."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if is_4bit(m))
    return trainable, total


def format_trainable(trainable: int, total: int) -> str:
    """The line a lesson prints.

    >>> format_trainable(12_288, 1_318_912)
    'trainable 0.93% (12,288 of 1,318,912 parameters)'
    """
    return f"trainable {100 * trainable / max(total, 1):.2f}% ({trainable:,} of {total:,} parameters)"


def _wrap(model: nn.Module, names: list[str], config: LoRAConfig) -> None:
    """Replace each named linear by a LoRALinear around it, and freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(getattr(parent, child), config.r, config.alpha, config.dropout, config.rslora)
        # subtle: a new module starts in training mode; follow the model's mode instead, or an eval()
        # model would suddenly apply LoRA dropout
        setattr(parent, child, wrapped.train(parent.training))
    model.lora_config = config  # remembered for save_adapter


def inject_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                targets: str | Iterable[str] = DEFAULT_TARGETS, rslora: bool = False) -> LoRASummary:
    """Wrap every linear layer whose name matches `targets` in a LoRALinear; freeze all the rest.

    Changes `model` in place and returns a summary (print it). Matching follows name_matches:
    "q_proj" matches any "... .q_proj"; "re:<regex>" matches whole names. Modules that match but
    are not linear layers are left alone; no linear match at all is an error.
    """
    if lora_layers(model):
        raise ValueError("this model has LoRA adapters already: inject once (or merge_lora first)")
    targets = parse_targets(targets)
    names = [name for name, module in model.named_modules() if is_linear(module) and name_matches(name, targets)]
    if not names:
        linears = [name for name, module in model.named_modules() if is_linear(module)]
        raise ValueError(f"no linear layer matches targets {list(targets)}; this model's linear layers are {linears[:8]}")
    config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=list(targets), rslora=rslora)
    _wrap(model, names, config)
    trainable, total = trainable_parameter_summary(model)
    return LoRASummary(modules=names, trainable=trainable, total=total, config=config)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base and put a plain nn.Linear in its place; returns the model.

    W_merged = W + scaling * B @ A (`merged_weight`: at least fp32), stored in the base's dtype. A
    4-bit base is dequantized first, so the result is a full-precision model that computes what the
    QLoRA model computed: bit for bit in fp32, where the unmerged layer multiplies by the very same
    matrix. Every parameter is trainable again afterwards, as in a model that was never adapted.
    """
    for name, layer in lora_layers(model).items():
        base = layer.base
        dtype = base.weight_dtype if is_4bit(base) else base.weight.dtype
        weight = base_weight(base, torch.float32) if layer.merged else layer.merged_weight()
        merged = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=dtype)
        merged.weight.copy_(weight)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, merged)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# 4. adapter files: only A and B, plus what they were made for


def _flatten(identity: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model_config": {"d_model": 64}} -> {"model_config.d_model": 64}, to name what differs."""
    flat = {}
    for key, value in identity.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _require_plain(value: Any, where: str) -> None:
    """Adapter files are read back with torch.load(weights_only=True), which only rebuilds plain values."""
    if isinstance(value, dict):
        for key, item in value.items():
            _require_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _require_plain(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise TypeError(f"{where} is a {type(value).__name__}: keep the base identity to plain values "
                        f"(str, numbers, lists, dicts; e.g. dataclasses.asdict(cfg), str(dtype))")


def save_adapter(model: nn.Module, path: str | Path, base_identity: dict[str, Any]) -> Path:
    """Write only the adapters (A and B of every LoRA layer) and their settings, atomically.

    base_identity says which base the adapter belongs to, as plain values (str, numbers, lists,
    dicts): e.g. nano/checkpoints/checkpoint.py: base_identity(ckpt).
    load_adapter compares it with the identity of the base it is asked to load onto.
    """
    _require_plain(base_identity, "base_identity")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA layers to save: call inject_lora(model) first")
    config = getattr(model, "lora_config", None)
    if config is None:  # layers wrapped by hand: rebuild the settings from them
        first = next(iter(layers.values()))
        config = LoRAConfig(first.r, first.alpha, first.dropout_p, list(layers), first.rslora)
    payload = {
        "format": ADAPTER_FORMAT,
        "version": 1,
        "config": asdict(config),
        "modules": {name: {"in_features": l.in_features, "out_features": l.out_features} for name, l in layers.items()},
        "base_identity": base_identity,
        "adapter": {f"{name}.{part}.weight": getattr(layer, part).weight.detach().cpu().clone()
                    for name, layer in layers.items() for part in ("lora_A", "lora_B")},
    }
    return save_checkpoint(path, payload)  # tmp file + fsync + rename


def load_adapter(model: nn.Module, path: str | Path, base_identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Inject LoRA layers as the adapter file describes and load its weights; returns its metadata.

    Refuses, with a message naming what differs, an adapter made for another base: a different
    base_identity (compared on the keys both sides have, when `base_identity` is given), a layer
    the model lacks, or a layer of another shape. A model that already has the same LoRA layers
    just gets the weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA adapter at {path} — run `make lesson-6` (LoRA) or `make lesson-7` (QLoRA) first")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable adapter file ({type(e).__name__}: {e})") from None
    if not isinstance(saved, dict) or saved.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not a nano LoRA adapter (a full checkpoint? load it with nano.checkpoints.checkpoint.load_model)")

    # 1. the identity of the base it was made for
    if base_identity is not None:
        theirs, ours = _flatten(saved["base_identity"]), _flatten(base_identity)
        differs = [f"{k}: adapter made for {theirs[k]!r}, this base has {ours[k]!r}"
                   for k in sorted(theirs.keys() & ours.keys()) if theirs[k] != ours[k]]
        if differs:
            raise ValueError(f"{path} was made for another base model — " + "; ".join(differs[:5]))

    # 2. every adapted layer exists here, and has the same shape
    existing = lora_layers(model)
    for name, shape in saved["modules"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path} adapts layer {name}, which this model does not have: "
                             f"the adapter was made for another base model") from None
        if not is_linear(module) and not isinstance(module, LoRALinear):
            raise ValueError(f"{path} adapts {name}, which is a {type(module).__name__} here, not a linear layer")
        fits = (module.in_features, module.out_features) == (shape["in_features"], shape["out_features"])
        if not fits:
            raise ValueError(
                f"{path} was made for another base shape: {name} is {shape['in_features']} -> {shape['out_features']} "
                f"in the adapter but {module.in_features} -> {module.out_features} in this model")

    # 3. inject (or check the layers already there), then copy the weights in
    config = LoRAConfig(**saved["config"])
    if existing:
        if set(existing) != set(saved["modules"]) or any(l.r != config.r for l in existing.values()):
            raise ValueError(f"this model has other LoRA layers than {path} holds: load onto a base without adapters")
    else:
        _wrap(model, list(saved["modules"]), config)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            for part in ("lora_A", "lora_B"):
                getattr(layer, part).weight.copy_(saved["adapter"][f"{name}.{part}.weight"])
    return {"config": saved["config"], "base_identity": saved["base_identity"], "modules": list(saved["modules"])}
