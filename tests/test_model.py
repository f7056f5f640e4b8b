"""Model builder: every head layout, fresh head, local pretrained weights, clear errors."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pml_scale.model import HeadLinear, build_model, count_parameters, find_head, known_names

# name, expected head path, input size (ViT needs its native 224)
CASES = [
    ("tiny_resnet", "fc", 64),
    ("resnet18", "fc", 64),
    ("mobilenet_v3_small", "classifier.3", 64),
    ("efficientnet_b0", "classifier.1", 64),
    ("convnext_tiny", "classifier.2", 64),
    ("squeezenet1_1", "classifier.1", 64),
    ("googlenet", "fc", 64),
    ("vit_b_32", "heads.head", 224),
]


@pytest.mark.parametrize("name, head_path, size", CASES)
def test_every_name_builds_with_a_fresh_head(name, head_path, size):
    torch.manual_seed(0)
    model = build_model(name, 7, channels_last=True).eval()
    path, head = find_head(model)
    assert path == head_path
    assert (head.out_features if isinstance(head, nn.Linear) else head.out_channels) == 7
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and convs[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_head_dropout_is_dropout_then_the_same_linear():
    model = build_model("resnet18", 5, head_dropout=0.5, channels_last=False)
    head = model.fc
    assert isinstance(head, HeadLinear) and head.dropout == 0.5
    assert [k for k in model.state_dict() if k.startswith("fc.")] == ["fc.weight", "fc.bias"]
    x = torch.randn(4, 512)
    head.eval()
    assert torch.allclose(head(x), F.linear(x, head.weight, head.bias))
    head.train()
    torch.manual_seed(3)
    got = head(x)
    torch.manual_seed(3)
    assert torch.allclose(got, F.linear(F.dropout(x, 0.5, True), head.weight, head.bias))
    assert not torch.allclose(got, F.linear(x, head.weight, head.bias))


@pytest.mark.parametrize("name", ["tiny_resnet", "resnet18"])
def test_local_pretrained_loads_everything_but_a_differently_shaped_head(tmp_path, name):
    torch.manual_seed(1)
    src = build_model(name, 5, channels_last=False)
    with torch.no_grad():  # make BN buffers non-default so they are checked too
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_()
    torch.save(src.state_dict(), tmp_path / "plain.pth")
    # a DeepSpeed/DDP-style checkpoint: nested and "module."-prefixed
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in src.state_dict().items()}},
               tmp_path / "ckpt.pth")
    want = src.state_dict()
    for file in ("plain.pth", "ckpt.pth"):
        torch.manual_seed(2)
        dst = build_model(name, 9, pretrained=tmp_path / file, channels_last=False)
        got = dst.state_dict()
        assert set(got) == set(want)
        for k, v in got.items():
            if k.startswith("fc."):
                assert v.shape[0] == 9  # fresh head of the new size
            else:
                assert torch.equal(v, want[k]), k
    same = build_model(name, 5, pretrained=tmp_path / "plain.pth", channels_last=False)
    assert torch.equal(same.fc.weight, src.fc.weight)  # equal shapes: the head loads too


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no downloads"):
        build_model("tiny_resnet", 3, pretrained=tmp_path / "missing.pth")
    torch.save(build_model("tiny_resnet", 3).state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="does not fit ResNet"):
        build_model("resnet18", 3, pretrained=tmp_path / "tiny.pth")
    torch.save({"note": "no tensors"}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="holds no state dict"):
        build_model("tiny_resnet", 3, pretrained=tmp_path / "junk.pth")


def test_unknown_names_and_bad_arguments():
    with pytest.raises(ValueError) as e:
        build_model("resnet5O", 3)
    msg = str(e.value)
    assert "Did you mean resnet50" in msg and "tiny_resnet" in msg and "vit_b_16" in msg
    assert "resnet50" in known_names() and "tiny_resnet" in known_names()
    with pytest.raises(ValueError, match="num_classes"):
        build_model("tiny_resnet", 0)
    with pytest.raises(ValueError, match="head_dropout"):
        build_model("tiny_resnet", 3, head_dropout=1.0)


def test_timm_names():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="timm"):
            build_model("timm:resnet18", 3)
        return
    model = build_model("timm:resnet18", 3).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_count_parameters_and_tiny_size():
    assert count_parameters(nn.Linear(3, 4)) == 16  # 3*4 weights + 4 biases
    frozen = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    frozen[0].requires_grad_(False)
    assert count_parameters(frozen) == 26 and count_parameters(frozen, trainable_only=True) == 10
    # tiny_resnet: a few residual blocks, 0.3-1 M parameters for 80 labels
    tiny = build_model("tiny_resnet", 80)
    assert 300_000 <= count_parameters(tiny) <= 1_000_000
    assert count_parameters(build_model("resnet18", 1000, channels_last=False)) == 11_689_512  # torchvision's figure


def test_tiny_resnet_trains():
    torch.manual_seed(0)
    model = build_model("tiny_resnet", 4, channels_last=False)
    x = torch.randn(16, 3, 32, 32)
    y = (torch.rand(16, 4) < 0.5).float()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    losses = []
    for _ in range(15):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # memorises a small batch
