"""Backbones: registry, exact architectures (parameter counts, FLOPs, upstream layouts), contracts, export."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from unitsface import models
from unitsface.errors import UnitsfaceError
from unitsface.models.vit import VisionTransformer, drop_path

RESNET_DEPTHS = {
    "iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3), "iresnet200": (6, 26, 60, 6),
    "lresnet18e_ir": (2, 2, 2, 2), "lresnet34e_ir": (3, 4, 6, 3), "lresnet50e_ir": (3, 4, 14, 3),
    "lresnet100e_ir": (3, 13, 30, 3), "lresnet200e_ir": (3, 33, 60, 3),
}
SMALL = ("tinyfacenet", "mobilefacenet", "lresnet18e_ir", "iresnet18")
VITS = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24)}  # width D, depth


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ir_param_count(layers: tuple[int, ...], d: int, down_kernel: int, shortcut_kernel: int, fc_bias: bool) -> int:
    """Parameters of an IR ResNet counted by hand from the layer list (BN and BN1d: 2 per channel)."""
    total = 3 * 64 * 9 + 2 * 64 + 64  # stem conv, BN, PReLU
    inplanes = 64
    for planes, depth in zip((64, 128, 256, 512), layers):
        for index in range(depth):
            k = down_kernel if index == 0 else 3
            total += 2 * inplanes + inplanes * planes * 9 + 2 * planes + planes + planes * planes * k * k + 2 * planes
            if index == 0:
                total += inplanes * planes * shortcut_kernel**2 + 2 * planes
            inplanes = planes
    return total + 2 * 512 + 512 * 49 * d + (d if fc_bias else 0) + 2 * d


@pytest.fixture(scope="module")
def meta_models() -> dict[str, nn.Module]:
    """Every backbone at d=256, built on the meta device: exact structure without allocating weights."""
    with torch.device("meta"):
        return {name: models.build(name, 256) for name in models.names()}


def trained_stats(name: str, d: int = 128, **kwargs) -> nn.Module:
    """A small model whose BN running statistics have seen one batch, in eval mode (stable outputs)."""
    torch.manual_seed(0)
    model = models.build(name, d, **kwargs)
    size = models.input_contract(model)["size"]
    with torch.no_grad():
        model(torch.randn(4, 3, size, size))
    return model.eval()


def test_registry_names_and_families() -> None:
    expected = {name: name[:7] for name in RESNET_DEPTHS}  # "iresnet" / "lresnet"
    expected.update(mobilefacenet="mobilefacenet", tinyfacenet="tinyfacenet", **{name: "vit" for name in VITS})
    assert models.names() == sorted(expected)
    assert {n: models.family(n) for n in models.names()} == expected


@pytest.mark.parametrize("call", [
    lambda: models.build("resnet50"),
    lambda: models.family("resnet50"),
    lambda: models.build("iresnet18", 128, no_such_option=1),
    lambda: models.build("tinyfacenet", 0),
    lambda: models.build("tinyfacenet", 128, input_size=100),
    lambda: models.input_contract(nn.Linear(2, 2)),
    lambda: models.build("vit_t", 128, mask_ratio=1.0),
    lambda: models.build("vit_t", 128, drop_path=-0.1),
    lambda: models.build("vit_t", 128, layers=3),  # architecture arguments are not parameters
])
def test_bad_input_raises_unitsface_error(call) -> None:
    with pytest.raises(UnitsfaceError):
        call()


def test_iresnet50_matches_insightface_parameter_count() -> None:
    with torch.device("meta"):
        model = models.build("iresnet50")
    assert n_params(model) == 43_590_848  # insightface arcface_torch r50 at 512-d


@pytest.mark.parametrize("name", sorted(RESNET_DEPTHS))
def test_resnet_parameter_counts_and_output_width(meta_models, name: str) -> None:
    insightface = name.startswith("iresnet")
    expected = ir_param_count(RESNET_DEPTHS[name], 256, down_kernel=3 if insightface else 2,
                              shortcut_kernel=1 if insightface else 2, fc_bias=insightface)
    model = meta_models[name]
    assert n_params(model) == expected
    assert (model.features if insightface else model.bn5).num_features == 256


def test_backbone_parameters_are_the_tunable_keywords() -> None:
    assert models.parameters("iresnet50") == {"dropout": 0.0}
    assert models.parameters("tinyfacenet") == {"input_size": 112}
    assert models.parameters("vit_t") == {"mask_ratio": 0.1, "drop_path": 0.1, "gradient_checkpointing": False}
    assert models.parameters("vit_b") == {"mask_ratio": 0.1, "drop_path": 0.1, "gradient_checkpointing": True}
    assert models.parameters("vit_l") == {"mask_ratio": 0.05, "drop_path": 0.05, "gradient_checkpointing": True}
    with pytest.raises(UnitsfaceError, match="no parameter 'mask_ratio'; it accepts: dropout"):
        models.build("iresnet18", mask_ratio=0.1)


@pytest.mark.parametrize("name", sorted(VITS))
def test_vit_parameter_counts_by_hand(meta_models, name: str) -> None:
    d, depth = VITS[name]
    block = 2 * 2 * d + 3 * d * d + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)  # 2 LN, qkv, proj, MLP
    stem = 3 * 81 * d + d + 144 * d + d  # patch conv, position embeddings, mask token
    feature = 144 * d * d + 2 * d + d * 256 + 2 * 256  # Linear, BN, Linear (no biases), BN; d=256 embeddings
    assert n_params(meta_models[name]) == stem + depth * block + 2 * d + feature


def test_vit_arcface_torch_names_and_head() -> None:
    with torch.device("meta"):
        model = models.build("vit_t", 128)
    state = model.state_dict()
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "mask_token",
                "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
                "blocks.11.mlp.fc1.bias", "blocks.11.mlp.fc2.weight", "norm.weight", "feature.0.weight",
                "feature.1.running_var", "feature.2.weight", "feature.3.bias"):
        assert key in state, key
    for key in ("blocks.0.attn.qkv.bias", "feature.0.bias", "feature.2.bias", "blocks.12.norm1.weight"):
        assert key not in state, key
    assert state["patch_embed.proj.weight"].shape == (256, 3, 9, 9) and state["pos_embed"].shape == (1, 144, 256)
    assert state["feature.0.weight"].shape == (256, 144 * 256) and state["feature.2.weight"].shape == (128, 256)
    assert model.feature[1].eps == model.feature[3].eps == 2e-5
    assert all(isinstance(block.mlp.act, nn.ReLU6) for block in model.blocks)
    rates = [block.drop_rate for block in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)


def feature_input(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The tokens entering the feature head (N × 144 × D) and the inputs of every block, from one forward."""
    seen: dict[str, list[torch.Tensor]] = {"feature": [], "blocks": []}
    hooks = [model.feature.register_forward_pre_hook(lambda m, a: seen["feature"].append(a[0].detach())),
             *[b.register_forward_pre_hook(lambda m, a: seen["blocks"].append(a[0].detach())) for b in model.blocks]]
    model(x)
    for hook in hooks:
        hook.remove()
    return seen["feature"][0].reshape(x.shape[0], 144, -1), seen["blocks"]


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
def test_vit_masks_the_configured_ratio_in_training_only(ratio: float) -> None:
    """arcface_torch masks 10 % whatever its mask_ratio; here int(144·(1 − r)) tokens are kept per sample and
    the others enter the feature head as the mask token."""
    torch.manual_seed(0)
    model = VisionTransformer(dim=32, depth=2, embedding_size=8, mask_ratio=ratio, drop_path=0.0).train()
    tokens, blocks = feature_input(model, torch.randn(3, 3, 112, 112))
    keep = int(144 * (1 - ratio))
    assert len(blocks) == 2 and all(b.shape == (3, keep, 32) for b in blocks)
    is_mask = (tokens == model.mask_token.detach()).all(dim=2)
    assert is_mask.sum(dim=1).tolist() == [144 - keep] * 3
    if 0 < keep < 144:
        assert not torch.equal(is_mask[0], is_mask[1])  # each sample draws its own positions
    tokens, blocks = feature_input(model.eval(), torch.randn(3, 3, 112, 112))
    assert all(b.shape == (3, 144, 32) for b in blocks) and not (tokens == model.mask_token.detach()).all(2).any()


def test_drop_path_zeroes_or_rescales_whole_samples() -> None:
    torch.manual_seed(0)
    x = torch.randn(400, 5, 3) + 10
    out = drop_path(x, 0.25, training=True)
    kept = (out != 0).all(dim=(1, 2))
    assert torch.equal(kept, (out != 0).any(dim=(1, 2)))  # a sample is dropped entirely or not at all
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert 0.65 < kept.float().mean() < 0.85
    assert drop_path(x, 0.25, training=False) is x


def test_vit_gradient_checkpointing_gives_the_same_gradients() -> None:
    """Recomputed blocks replay the same masking and drop-path draws (the RNG state is saved)."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = VisionTransformer(dim=32, depth=3, embedding_size=8, drop_path=0.5,
                                  gradient_checkpointing=checkpointing).train()
        model(torch.randn(2, 3, 112, 112)).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_vit_attention_in_float32_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    dtypes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        dtypes.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    model = VisionTransformer(dim=32, depth=2, embedding_size=8).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(torch.randn(1, 3, 112, 112))
        assert model.blocks[0].mlp.fc1(torch.randn(1, 32)).dtype == torch.bfloat16  # the MLP follows autocast
    assert dtypes == [(torch.float32,) * 3] * 2
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_light_model_sizes() -> None:
    with torch.device("meta"):
        mbf128 = models.build("mobilefacenet", 128)
    assert 0.95e6 < n_params(mbf128) < 1.05e6  # the paper's 0.99 M at d=128
    assert 1e6 < n_params(models.build("mobilefacenet", 512)) < 2e6
    assert 0.3e6 < n_params(models.build("tinyfacenet", 512)) < 1.5e6


def test_upstream_checkpoint_key_layouts() -> None:
    """Keys follow insightface iresnet.py and CVI-SZU backbone.py so released weights load as they are."""
    with torch.device("meta"):
        ir, lr = models.build("iresnet18").state_dict(), models.build("lresnet18e_ir").state_dict()
    for key in ("conv1.weight", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.bn3.running_var",
                "layer1.0.downsample.0.weight", "layer4.1.prelu.weight", "bn2.weight", "fc.bias", "features.bias"):
        assert key in ir, key
    for key in ("conv1.weight", "bn1.weight", "layer1.0.bn0.weight", "layer1.0.bn2.running_mean",
                "layer1.0.downsample.1.weight", "bn4.weight", "fc5.weight", "bn5.bias"):
        assert key in lr, key
    assert "fc5.bias" not in lr and "layer1.0.bn3.weight" not in lr


@pytest.mark.parametrize("name", SMALL)
def test_forward_shape_raw_embeddings(name: str) -> None:
    model = trained_stats(name)
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 128) and out.dtype == torch.float32 and torch.isfinite(out).all()
    norms = out.norm(dim=1)
    assert not torch.allclose(norms, torch.ones(2), atol=1e-3)  # not L2-normalised inside the model
    assert models.input_contract(model) == models.INPUT_CONTRACT == {
        "size": 112, "color": "rgb", "mean": 127.5, "std": 127.5}


def test_lresnet_paper_specifics() -> None:
    torch.manual_seed(0)
    model = models.build("lresnet18e_ir", 128)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.4]
    assert model.fc5.kernel_size == (7, 7) and model.fc5.bias is None
    assert not model.bn5.weight.requires_grad and torch.equal(model.bn5.weight, torch.ones(128))
    assert model.bn5.bias.requires_grad
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        first = stage[0]
        assert (first.conv2.kernel_size, first.conv2.stride, first.conv2.padding) == ((2, 2), (2, 2), (0, 0))
        shortcut = first.downsample[0]
        assert (shortcut.kernel_size, shortcut.stride, shortcut.padding) == ((2, 2), (2, 2), (0, 0))
        assert all(block.conv2.kernel_size == (3, 3) and block.downsample is None for block in stage[1:])
        assert all(torch.count_nonzero(block.bn2.weight) == 0 for block in stage)  # zero-init residual
    prelus = torch.cat([m.weight for m in model.modules() if isinstance(m, nn.PReLU)])
    assert torch.all(prelus == 0.25)
    # Kaiming normal with a=1, fan-in: std = 1/sqrt(fan_in); layer3 conv1 has 256*9 = 2304 inputs per unit.
    assert model.layer3[1].conv1.weight.std().item() == pytest.approx(2304**-0.5, rel=0.02)

    # Zero-initialised residual BN: every stride-1 block starts as the identity.
    block = model.layer2[1].train()
    x = torch.randn(2, 128, 28, 28)
    assert torch.equal(block(x), x)

    out = model.train()(torch.randn(2, 3, 112, 112))
    out.sum().backward()
    assert model.bn5.weight.grad is None and model.bn5.bias.grad is not None


def test_iresnet_insightface_specifics() -> None:
    model = models.build("iresnet18", 128)
    first = model.layer1[0]
    assert (first.conv2.kernel_size, first.conv2.stride, first.conv2.padding) == ((3, 3), (2, 2), (1, 1))
    assert first.downsample[0].kernel_size == (1, 1) and first.downsample[0].stride == (2, 2)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.0]
    assert not model.features.weight.requires_grad
    assert torch.all(model.layer1[1].bn3.weight == 1)  # no zero-init residual upstream
    assert model.layer3[1].conv1.weight.std().item() == pytest.approx(0.1, rel=0.02)


def test_clamp_prelu() -> None:
    model = models.build("tinyfacenet", 64)  # ReLU net: nothing to clamp, must be a no-op
    models.clamp_prelu_(model)
    model = models.build("mobilefacenet", 64)
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    with torch.no_grad():
        for module in prelus:
            module.weight.copy_(torch.linspace(-1, 1, module.num_parameters))
    before = torch.cat([m.weight.detach().clone() for m in prelus])
    models.clamp_prelu_(model, min_slope=0.05)
    after = torch.cat([m.weight for m in prelus])
    assert torch.equal(after, torch.where(before < 0.05, torch.full_like(before, 0.05), before))


def test_tinyfacenet_other_input_size_and_contract_copy() -> None:
    model = trained_stats("tinyfacenet", 32, input_size=64)
    contract = models.input_contract(model)
    assert contract == {**models.INPUT_CONTRACT, "size": 64}
    contract["size"] = 1
    assert models.input_contract(model)["size"] == 64
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 32)

    class Wrapper(nn.Module):  # DistributedDataParallel keeps the model as `.module`
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    assert models.input_contract(Wrapper(model))["size"] == 64


def test_bf16_autocast_channels_last_finite() -> None:
    """bf16 convs are slow on most CPUs, so whole-model passes use the light nets; the IR family is
    covered through its downsampling block (BN, 3x3 and 2x2 convs, PReLU, 2x2 shortcut)."""
    cases = [
        (models.build("tinyfacenet", 64), (2, 3, 112, 112), True),
        (models.build("mobilefacenet", 64), (2, 3, 112, 112), False),
        (models.build("lresnet18e_ir", 64).layer2[0], (2, 64, 16, 16), True),
    ]
    for module, shape, backward in cases:
        module = module.to(memory_format=torch.channels_last)
        x = torch.randn(shape).to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(backward):
            out = module(x)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
        if backward:
            out.float().square().sum().backward()
            grads = [p.grad for p in module.parameters() if p.requires_grad]
            assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert out.shape == (2, 128, 8, 8)


def test_vit_t_exports_with_the_onnx_exporter(tmp_path) -> None:
    """vit_t through `unitsface export`'s own path: checkpoint -> ONNX, checked against PyTorch by the exporter
    (random pixels and rendered faces) and here on other inputs with a fresh model."""
    pytest.importorskip("onnxruntime")
    from unitsface.export import export_onnx, load_onnx
    from unitsface.models import load_backbone
    from unitsface.training.checkpoint import atomic_save

    model = trained_stats("vit_t", 64)
    meta = {"backbone": "vit_t", "embedding_size": 64, "head": "cosface", "num_classes": 10, "threshold": None,
            "input": dict(models.INPUT_CONTRACT)}
    atomic_save({"format": "unitsface-checkpoint", "version": 1, "config": {}, "meta": meta,
                 "model": model.state_dict(), "head": {}, "epoch": 0, "step": 0}, tmp_path / "vit.pt")
    report = export_onnx(tmp_path / "vit.pt", tmp_path / "vit.onnx")  # dynamic batch
    assert report.max_abs_diff and max(report.max_abs_diff.values()) <= 1e-4
    fresh, _ = load_backbone(tmp_path / "vit.pt")
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        want = fresh(x).numpy()
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(load_onnx(tmp_path / "vit.onnx").run(x.numpy()), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("name", ["tinyfacenet", "mobilefacenet"])
def test_onnx_export_matches_torch(name: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = trained_stats(name, 64)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 112, 112),), buffer, dynamo=False,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    x = torch.randn(3, 3, 112, 112)
    got = ort.InferenceSession(buffer.getvalue()).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
