"""
Exercise (lesson 6): implement low-rank adapters in nano/model/lora.py.

  1. `LoRALinear(base, r, alpha, dropout, rslora)`: y = base(x) + (alpha / r) * B(A(dropout(x))),
     A Kaiming-uniform, B zeros, so the adapted model starts EXACTLY equal to the base; the base is
     frozen, only A and B receive gradients.
  2. `merge()` / `unmerge()`: W += (alpha / r) B @ A and back; merged and unmerged compute the same.
  3. `inject_lora(model, r, alpha, targets=...)`: wrap every matching linear layer by name, freeze
     the rest, report trainable vs total parameters (about 1% for a real model).
  4. `save_adapter` / `load_adapter`: a small file with only A and B and what they were made for;
     loading it onto the same base gives the same outputs; another base is refused clearly.
  5. QLoRA: LoRA on a 4-bit base (nano.model.nf4.Linear4bit) trains, and merges only by dequantizing.

Run: `make check-6` or `.venv/bin/python -m pytest -q tests/test_06_lora.py`.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import impl
from nano.checkpoints.checkpoint import state_fingerprint
from toy_models import ToyModel

lora = impl("lora")
nf4 = impl("nf4")


# ---------------------------------------------------------------------------------------------
# a small model with Gemma-2's module names (tests/toy_models.py)


def toy_model(seed: int = 0, **kwargs) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel(**kwargs).eval()


def pretend_training(model: nn.Module, seed: int = 123) -> None:
    """Give every B a random value, as training would (B = 0 makes many checks trivially true)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(0.05 * torch.randn(layer.lora_B.weight.shape, generator=generator))


IDS = torch.arange(16)


# ---------------------------------------------------------------------------------------------
# 1. the layer


def test_initialisation_and_zero_change_at_init():
    torch.manual_seed(0)
    base = nn.Linear(64, 24, bias=True)
    layer = lora.LoRALinear(copy.deepcopy(base), r=4, alpha=8)
    assert layer.scaling == 8 / 4
    a, b = layer.lora_A.weight, layer.lora_B.weight
    assert a.shape == (4, 64) and b.shape == (24, 4)
    assert (b == 0).all()
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a = sqrt(5) is uniform(-1/sqrt(fan_in), +1/sqrt(fan_in))
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound and a.std() > 0.4 * bound
    x = torch.randn(7, 64)
    assert torch.equal(layer(x), base(x))  # exactly, not approximately


def test_rslora_scaling():
    layer = lora.LoRALinear(nn.Linear(8, 8), r=16, alpha=16, rslora=True)
    assert layer.scaling == pytest.approx(16 / math.sqrt(16))


def test_forward_formula():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(10, 6, bias=False), r=2, alpha=6)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 10)
    a, b, w = layer.lora_A.weight, layer.lora_B.weight, layer.base.weight
    torch.testing.assert_close(layer(x), x @ w.T + 3.0 * (x @ a.T) @ b.T)


def test_gradients_equal_the_formulas():
    """The layer may compute its backward its own way (nano's writes it out, for speed: LoRAFunction),
    but the gradients must be those of y = x W^T + b + s (x A^T) B^T, for x, A and B, also with x
    frozen (the first layer of a LoRA model) and on a 4-bit base (QLoRA: W is the dequantized weight)."""
    torch.manual_seed(0)
    for base in (nn.Linear(12, 20, bias=True).double(), nf4.Linear4bit.from_linear(nn.Linear(64, 24, bias=False))):
        dtype = torch.float64 if isinstance(base, nn.Linear) else torch.float32
        layer = lora.LoRALinear(base, r=3, alpha=6).to(dtype)
        with torch.no_grad():
            layer.lora_B.weight.normal_()
        w = lora.base_weight(base, dtype)
        b = base.bias if base.bias is not None else 0.0
        a_, b_ = layer.lora_A.weight, layer.lora_B.weight
        for x_needs_grad in (True, False):
            x = torch.randn(2, 5, layer.in_features, dtype=dtype, requires_grad=x_needs_grad)
            g = torch.randn(2, 5, layer.out_features, dtype=dtype)  # some dL/dy
            inputs = [a_, b_] + ([x] if x_needs_grad else [])
            ours = torch.autograd.grad((layer(x) * g).sum(), inputs)
            formula = x @ w.T + b + 2.0 * (x @ a_.T) @ b_.T
            expected = torch.autograd.grad((formula * g).sum(), inputs)
            for name, got, want in zip(("A", "B", "x"), ours, expected):
                torch.testing.assert_close(got, want, msg=f"dL/d{name} differs (x needs grad: {x_needs_grad})")


def test_merge_unmerge_round_trip():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(32, 16, bias=True), r=4, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(5, 32)
    unmerged_out = layer(x)
    layer.merge()
    expected = w0 + 4.0 * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(layer.base.weight, expected)
    torch.testing.assert_close(layer(x), unmerged_out, rtol=1e-5, atol=1e-6)  # merged == unmerged
    with pytest.raises(RuntimeError):
        layer.merge()  # twice would add B A twice
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged_out, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. a whole model


def test_inject_wraps_projections_and_freezes_the_rest():
    model = toy_model()
    n_base = sum(p.numel() for p in model.parameters())
    summary = lora.inject_lora(model, r=4, alpha=8)
    names = sorted(lora.lora_layers(model))
    assert len(names) == 14 and "layers.1.mlp.down_proj" in names and "layers.0.self_attn.k_proj" in names
    assert not any("embed" in name for name in names)
    # r * (in + out) for each adapted layer of each of the 2 layers
    d, kv, hidden = 32, 8, 64
    per_layer = 4 * ((d + d) * 2 + (d + kv) * 2 + (d + hidden) * 2 + (hidden + d))
    trainable, total = lora.trainable_parameter_summary(model)
    assert trainable == 2 * per_layer and total == n_base + trainable
    assert (summary.trainable, summary.total) == (trainable, total)
    line = str(summary)
    assert "trainable" in line and f"{100 * trainable / total:.2f}%" in line
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="already"):
        lora.inject_lora(model)


def test_target_patterns():
    model = toy_model()
    summary = lora.inject_lora(model, targets=["q_proj", r"re:layers\.1\.mlp\.up_proj"])
    assert sorted(summary.modules) == ["layers.0.self_attn.q_proj", "layers.1.mlp.up_proj", "layers.1.self_attn.q_proj"]
    assert impl("targets").name_matches("layers.0.self_attn.q_proj", "k_proj,q_proj")
    assert not impl("targets").name_matches("layers.0.self_attn.xq_proj", ["q_proj"])
    with pytest.raises(ValueError, match="no linear layer matches"):
        lora.inject_lora(toy_model(), targets=["wq"])


def test_adapted_model_equals_base_at_step_zero():
    base = toy_model()
    adapted = copy.deepcopy(base)
    lora.inject_lora(adapted, r=8, alpha=16)
    assert torch.equal(adapted(IDS), base(IDS))


def test_only_adapter_parameters_receive_gradients():
    model = toy_model()
    lora.inject_lora(model, r=4, alpha=8)
    pretend_training(model)  # with B != 0, A gets a non-zero gradient too
    F.cross_entropy(model(IDS), IDS.flip(0)).backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_merge_lora_gives_plain_linears_with_the_same_outputs():
    model = toy_model()
    lora.inject_lora(model, r=4, alpha=8)
    pretend_training(model)
    adapted_out = model(IDS)
    assert not torch.allclose(adapted_out, toy_model()(IDS))  # the adapters do change something
    lora.merge_lora(model)
    assert not lora.lora_layers(model)
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(model(IDS), adapted_out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. adapter files


def test_adapter_save_load_round_trip(tmp_path):
    base = toy_model()
    identity = {"model_config": {"d": 32, "n_layers": 2}, "checkpoint": state_fingerprint(base.state_dict())}
    trained = copy.deepcopy(base)
    lora.inject_lora(trained, r=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"])
    pretend_training(trained)
    path = lora.save_adapter(trained, tmp_path / "adapter.pt", base_identity=identity)
    assert not (tmp_path / "adapter.pt.tmp").exists()  # written atomically: no tmp file left
    saved = torch.load(path, weights_only=True)
    assert saved["config"]["r"] == 4 and saved["config"]["alpha"] == 8 and saved["config"]["dropout"] == 0.1
    assert saved["config"]["targets"] == ["q_proj", "v_proj", "down_proj"]
    assert all(".lora_A." in key or ".lora_B." in key for key in saved["adapter"])  # only the adapter
    adapter_numel = sum(t.numel() for t in saved["adapter"].values())
    assert adapter_numel == lora.trainable_parameter_summary(trained)[0]

    fresh = copy.deepcopy(base)
    meta = lora.load_adapter(fresh, path, base_identity=identity)
    assert meta["base_identity"] == identity
    assert sorted(lora.lora_layers(fresh)) == sorted(lora.lora_layers(trained))
    assert torch.equal(fresh(IDS), trained(IDS))


def test_adapter_for_another_base_is_refused(tmp_path):
    trained = toy_model()
    lora.inject_lora(trained, r=4)
    path = lora.save_adapter(trained, tmp_path / "adapter.pt", base_identity={"model_config": {"d": 32}})
    # another shape: wider model
    with pytest.raises(ValueError, match="another base shape.*q_proj"):
        lora.load_adapter(toy_model(d=48), path)
    # fewer layers
    with pytest.raises(ValueError, match="layers.1.*does not have"):
        lora.load_adapter(toy_model(n_layers=1), path)
    # same shape, but the identity says it is another base
    with pytest.raises(ValueError, match="model_config.d: adapter made for 32, this base has 64"):
        lora.load_adapter(toy_model(), path, base_identity={"model_config": {"d": 64}})
    # not an adapter at all, and a missing file
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a nano LoRA adapter"):
        lora.load_adapter(toy_model(), tmp_path / "ckpt.pt")
    with pytest.raises(FileNotFoundError, match="make lesson-6"):
        lora.load_adapter(toy_model(), tmp_path / "nope.pt")


def test_state_fingerprint_tells_bases_apart():
    a, b = toy_model(seed=0), toy_model(seed=1)
    assert state_fingerprint(a.state_dict()) == state_fingerprint(copy.deepcopy(a).state_dict())
    assert state_fingerprint(a.state_dict()) != state_fingerprint(b.state_dict())


# ---------------------------------------------------------------------------------------------
# 4. QLoRA: LoRA on a 4-bit base


def test_lora_on_linear4bit_trains():
    """QLoRA in miniature: the target differs from the 4-bit base by a low-rank change, which the
    adapter learns with a few steps of plain gradient descent on A and B only."""
    torch.manual_seed(0)
    d_in, d_out = 64, 32
    base = nf4.Linear4bit.from_linear(nn.Linear(d_in, d_out, bias=False))
    packed_before = base.weight_packed.clone()
    change = torch.randn(d_out, 4) @ torch.randn(4, d_in) / 16  # a rank-4 change of the weight
    x = torch.randn(256, d_in)
    y = base(x) + x @ change.T
    layer = lora.LoRALinear(base, r=8, alpha=16)
    adapter = [p for p in layer.parameters() if p.requires_grad]
    assert len(adapter) == 2  # A and B, nothing else
    losses = []
    for _ in range(20):
        loss = F.mse_loss(layer(x), y)
        grads = torch.autograd.grad(loss, adapter)
        with torch.no_grad():
            for p, g in zip(adapter, grads):
                p -= 1.0 * g  # learning rate 1.0
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    assert torch.equal(base.weight_packed, packed_before)  # the 4-bit base did not move


def test_qlora_merge_dequantizes_instead_of_requantizing():
    model = nf4.quantize_model(toy_model())
    lora.inject_lora(model, r=4, alpha=8)
    pretend_training(model)
    with pytest.raises(RuntimeError, match="merge_lora"):
        model.layers[0].self_attn.q_proj.merge()  # in place would re-quantize: refused
    out = model(IDS)
    lora.merge_lora(model)
    assert type(model.layers[0].mlp.up_proj) is nn.Linear
    torch.testing.assert_close(model(IDS), out, rtol=1e-5, atol=1e-5)


def test_qlora_parameter_count_includes_the_4bit_weights():
    full = toy_model()
    lora.inject_lora(full, r=4)
    quantized = nf4.quantize_model(toy_model())
    lora.inject_lora(quantized, r=4)
    assert lora.trainable_parameter_summary(quantized) == lora.trainable_parameter_summary(full)


# ---------------------------------------------------------------------------------------------
# 5. the real model


def test_lora_and_qlora_on_gemma_nano(tmp_path):
    model_lib = impl("gemma")
    cfg = model_lib.model_config("tiny", vocab_size=64)
    torch.manual_seed(0)
    base = model_lib.GemmaNano(cfg).eval()
    ids = torch.randint(0, 64, (1, 10))
    base_logits, _ = base(ids)

    adapted = copy.deepcopy(base)
    summary = lora.inject_lora(adapted, r=8, alpha=16)
    assert len(summary.modules) == 7 * cfg.n_layers
    assert summary.trainable / summary.total < 0.1
    assert torch.equal(adapted(ids)[0], base_logits)
    pretend_training(adapted)
    path = lora.save_adapter(adapted, tmp_path / "a.pt", base_identity={"model_config": vars(cfg)})
    reloaded = copy.deepcopy(base)
    lora.load_adapter(reloaded, path, base_identity={"model_config": vars(cfg)})
    assert torch.equal(reloaded(ids)[0], adapted(ids)[0])

    qlora = nf4.quantize_model(copy.deepcopy(base), double_quant=True)
    quantized_logits, _ = qlora(ids)
    lora.inject_lora(qlora, r=8, alpha=16)
    logits, loss = qlora(ids, targets=ids)
    assert torch.equal(logits, quantized_logits)  # zero change at init holds on a 4-bit base too
    loss.backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in qlora.named_parameters())
