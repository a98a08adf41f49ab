"""Model registry: every model trains on (B, 1, 48, 48); stems, upsampling, ImageNet loading."""

import pytest
import torch
import torchvision

from trainables.errors import UserError
from trainables.models import (
    MODELS,
    build_model,
    pretrained_weights_path,
    set_backbone_frozen,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _faces(batch: int = 2, size: int = 48) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0))


def _first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_model_forwards_and_trains(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, dropout=0.1, width=8)  # default stem "stride" keeps it cheap
    logits = model(_faces())
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 6]))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(name.startswith("head.") for name in changed)
    first = next(name for name, p in model.named_parameters() if p is _first_conv(model).weight)
    assert first in changed  # gradients reach the stem


@pytest.mark.parametrize("stem, size", [("keep", 48), ("stride", 24), ("imagenet", 12)])
def test_stem_sets_resolution(stem, size):
    model = build_model("resnet18", stem=stem)
    seen = []
    model.backbone.layer1.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[-1]))
    with torch.no_grad():
        model(_faces())
    assert seen == [size]


def test_input_size_upsamples_on_the_way_in():
    model = build_model("resnet18", input_size=96)
    seen = []
    model.backbone.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        assert model(_faces()).shape == (2, 7)
    assert seen == [(96, 96)]


def test_convnet_depth_and_width():
    model = build_model("convnet", width=16, depth=2)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32]
    with torch.no_grad():
        assert model(_faces()).shape == (2, 7)


@pytest.mark.parametrize("kwargs, match", [
    ({"arch": "vgg16"}, r"unknown model 'vgg16'; choose from \[.*'convnet'.*'resnet18'"),
    ({"arch": "resnet18", "stem": "big"}, "unknown stem"),
    ({"arch": "resnet18", "input_size": 64}, "input_size"),
    ({"arch": "convnet", "depth": 5}, "depth"),
    ({"arch": "convnet", "dropout": 1.0}, "dropout"),
    ({"arch": "convnet", "pretrained": True}, "no ImageNet weights for convnet"),
])
def test_bad_options_raise_user_error(kwargs, match):
    with pytest.raises(UserError, match=match):
        build_model(**kwargs)


def test_frozen_backbone_leaves_only_head_trainable():
    model = build_model("resnet18")
    set_backbone_frozen(model, True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.head.parameters()}
    assert len(trainable) == 2  # the linear layer's weight and bias
    set_backbone_frozen(model, False)
    assert all(p.requires_grad for p in model.parameters())


# ---- ImageNet weights, from a fake torchvision cache in a temporary TORCH_HOME ----

@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """Point torchvision's cache at an empty folder, as on a fresh offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would override TORCH_HOME
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "hub" / "checkpoints"


def _old_densenet_keys(state: dict) -> dict:
    """Spell keys as torchvision's hosted DenseNet files do: 'norm.1' for 'norm1', no num_batches_tracked."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):  # the hosted files predate it
            continue
        if "denselayer" in key:
            for part in ("norm1", "norm2", "conv1", "conv2"):
                key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        out[key] = value
    return out


def _save_fake_imagenet(arch: str, folder) -> dict:
    """Save a randomly initialised torchvision `arch` under its cache name; return its state dict."""
    torch.manual_seed(0)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    on_disk = _old_densenet_keys(state) if arch.startswith("densenet") else state
    torch.save(on_disk, folder / pretrained_weights_path(arch).name)
    return state


@pytest.mark.parametrize("arch, first, inner", [
    ("resnet18", "conv1.weight", "layer2.0.conv1.weight"),
    ("resnet50", "conv1.weight", "layer3.1.bn2.running_mean"),
    ("densenet121", "features.conv0.weight", "features.denseblock2.denselayer3.norm1.weight"),
])
def test_pretrained_loads_cached_imagenet_weights(torch_home, arch, first, inner):
    saved = _save_fake_imagenet(arch, torch_home)
    model = build_model(arch, pretrained=True, stem="imagenet", num_classes=5)
    loaded = model.backbone.state_dict()
    torch.testing.assert_close(loaded[inner], saved[inner], rtol=0, atol=0)
    # Gray input replicated to RGB == one channel through the channel-summed filter.
    torch.testing.assert_close(loaded[first], saved[first].sum(dim=1, keepdim=True))
    assert model.head[-1].out_features == 5


def test_pretrained_small_stem_keeps_backbone_and_reinitialises_conv1(torch_home):
    saved = _save_fake_imagenet("resnet18", torch_home)
    model = build_model("resnet18", pretrained=True, stem="stride")
    assert model.backbone.conv1.weight.shape == (64, 1, 3, 3)
    torch.testing.assert_close(model.backbone.state_dict()["layer4.1.conv2.weight"], saved["layer4.1.conv2.weight"])


def test_explicit_weights_path(tmp_path, torch_home):
    saved = _save_fake_imagenet("resnet18", torch_home)
    moved = tmp_path / "my_weights.pth"
    (torch_home / pretrained_weights_path("resnet18").name).rename(moved)
    model = build_model("resnet18", pretrained=True, weights_path=str(moved))
    torch.testing.assert_close(model.backbone.state_dict()["layer1.0.conv1.weight"], saved["layer1.0.conv1.weight"])


def test_weights_path_follows_torch_home_and_accepts_older_versions(torch_home):
    assert pretrained_weights_path("resnet18") == torch_home / "resnet18-f37072fd.pth"
    assert pretrained_weights_path("resnet50") == torch_home / "resnet50-11ad3fa6.pth"  # default: V2
    (torch_home / "resnet50-0676ba61.pth").touch()  # only V1 present: use it
    assert pretrained_weights_path("resnet50") == torch_home / "resnet50-0676ba61.pth"


def test_missing_weights_name_the_file_and_the_fetch_command(torch_home):
    with pytest.raises(UserError) as err:
        build_model("resnet18", pretrained=True)
    message = str(err.value)
    assert str(torch_home / "resnet18-f37072fd.pth") in message
    assert "torchvision.models.resnet18(weights='IMAGENET1K_V1')" in message
    assert "TORCH_HOME" in message


def test_wrong_weights_file_is_refused(torch_home, tmp_path):
    _save_fake_imagenet("resnet18", torch_home)
    wrong = torch_home / "resnet18-f37072fd.pth"
    with pytest.raises(UserError, match="does not match torchvision's resnet34"):
        build_model("resnet34", pretrained=True, weights_path=str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not read"):
        build_model("resnet18", pretrained=True, weights_path=str(garbage))


def test_frozen_backbone_keeps_its_batchnorm_statistics():
    torch.manual_seed(0)
    model = build_model("resnet18", stem="stride")
    bn = model.backbone.bn1
    set_backbone_frozen(model, True)
    model.train()
    before = bn.running_mean.clone()
    model(torch.randn(8, 1, 48, 48) * 3 + 1)
    assert torch.equal(bn.running_mean, before) and not bn.training and model.head.training
    set_backbone_frozen(model, False)
    model.train()
    model(torch.randn(8, 1, 48, 48) * 3 + 1)
    assert not torch.equal(bn.running_mean, before) and bn.training
