"""Backbones: registry, exact architectures (parameter counts, upstream layouts), contracts, export."""

from __future__ import annotations

import io
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from unitsface import models
from unitsface.errors import UnitsfaceError

RESNET_DEPTHS = {
    "iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3), "iresnet200": (6, 26, 60, 6),
    "lresnet18e_ir": (2, 2, 2, 2), "lresnet34e_ir": (3, 4, 6, 3), "lresnet50e_ir": (3, 4, 14, 3),
    "lresnet100e_ir": (3, 13, 30, 3), "lresnet200e_ir": (3, 33, 60, 3),
}
SMALL = ("tinyfacenet", "mobilefacenet", "lresnet18e_ir", "iresnet18")


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
    expected.update(mobilefacenet="mobilefacenet", tinyfacenet="tinyfacenet")
    assert models.names() == sorted(expected)
    assert {n: models.family(n) for n in models.names()} == expected


@pytest.mark.parametrize("call", [
    lambda: models.build("resnet50"),
    lambda: models.family("resnet50"),
    lambda: models.build("iresnet18", 128, no_such_option=1),
    lambda: models.build("tinyfacenet", 0),
    lambda: models.build("tinyfacenet", 128, input_size=100),
    lambda: models.input_contract(nn.Linear(2, 2)),
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


def test_tinyfacenet_training_step_time(capsys) -> None:
    """Forward+backward at batch 64 on the 2 test threads; printed for the record, not asserted."""
    model = models.build("tinyfacenet").to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 112, 112).to(memory_format=torch.channels_last)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model(x).square().mean().backward()
        times.append(time.perf_counter() - start)
    with capsys.disabled():
        print(f"\ntinyfacenet fwd+bwd batch 64, {torch.get_num_threads()} threads: "
              f"best {min(times):.3f} s, median {sorted(times)[1]:.3f} s")
