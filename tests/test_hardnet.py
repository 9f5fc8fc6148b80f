"""HarDNet-68/85 backbone (HarDNet paper; AutoSAM paper section 3): structure, shapes, weight loading."""

import logging

import pytest
import torch

from autosam_core.hardnet import HarDBlock, HarDNet, harmonic_links


@pytest.fixture(scope="module")
def net68():
    torch.manual_seed(0)
    return HarDNet(68).eval()


def test_harmonic_links():
    assert harmonic_links(1) == [0]
    assert harmonic_links(3) == [2]
    assert harmonic_links(6) == [5, 4]
    assert harmonic_links(8) == [7, 6, 4, 0]
    assert harmonic_links(12) == [11, 10, 8]


def test_hard_block_widths_and_output():
    block = HarDBlock(96, growth=24, n_layers=8)  # first block of HarDNet-85
    widths = [layer.conv.out_channels for layer in block.layers]
    # layer k: 24 * 1.7**n (2**n the largest power of two dividing k), rounded to even.
    assert widths == [24, 40, 24, 70, 24, 40, 24, 118]
    assert block.out_ids == [1, 3, 5, 7, 8]
    assert block.out_channels == 24 * 4 + 118
    assert block.layers[7].conv.in_channels == 24 + 40 + 70 + 96  # layers 7, 6, 4, 0
    y = block(torch.randn(1, 96, 8, 8))
    assert y.shape == (1, 214, 8, 8)


@pytest.mark.parametrize("arch, channels, strides, published_m", [
    (85, [192, 256, 320, 480, 720, 1280], [4, 8, 8, 16, 16, 32], 36.7),
    (68, [128, 256, 320, 640, 1024], [4, 8, 8, 16, 32], 17.6),
])
def test_feature_channels_strides_and_size(arch, channels, strides, published_m):
    net = HarDNet(arch).eval()
    assert net.feature_channels == channels and net.feature_strides == strides
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 128, 128))
    assert [tuple(f.shape) for f in feats] == [(1, c, 128 // s, 128 // s) for c, s in zip(channels, strides)]
    assert all(f.min() >= 0 and f.max() <= 6 for f in feats)  # ReLU6
    # With the 1000-class ImageNet classifier the HarDNet paper reports 17.6 M (68) and 36.7 M (85).
    n = sum(p.numel() for p in net.parameters()) + channels[-1] * 1000 + 1000
    assert round(n / 1e6, 1) == published_m


def test_truncated_backbone():
    net = HarDNet(85, num_blocks=3)
    assert net.feature_channels == [192, 256, 320] and net.feature_strides == [4, 8, 8]
    assert len(net(torch.randn(1, 3, 64, 64))) == 3
    with pytest.raises(ValueError, match="num_blocks"):
        HarDNet(85, num_blocks=7)


def test_bad_arch_and_input(net68):
    with pytest.raises(ValueError, match="arch"):
        HarDNet(39)
    with pytest.raises(ValueError, match=r"\(1, 1, 64, 64\)"):
        net68(torch.randn(1, 1, 64, 64))


def test_random_init_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="autosam_core.hardnet"):
        HarDNet(68, num_blocks=1)
    assert "random initialisation" in caplog.text


def test_pretrained_round_trip_drops_classifier(tmp_path, net68, caplog):
    state = dict(net68.state_dict())
    head = len(net68.base)  # ImageNet checkpoints keep the classifier at base.<len(base)>
    state[f"base.{head}.3.weight"] = torch.zeros(1000, 1024)
    state[f"base.{head}.3.bias"] = torch.zeros(1000)
    path = tmp_path / "hardnet68.pth"
    torch.save({"state_dict": state}, path)
    with caplog.at_level(logging.INFO, logger="autosam_core.hardnet"):
        loaded = HarDNet(68, pretrained_path=path).eval()
    assert "ignoring 2 keys" in caplog.text
    for k, v in net68.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)[-1], net68(x)[-1])
    # A truncated backbone takes the first blocks of a full file.
    HarDNet(68, pretrained_path=path, num_blocks=2)


def test_pretrained_errors(tmp_path, net68):
    state = dict(net68.state_dict())
    state["base.3.layers.0.conv.weightX"] = state.pop("base.3.layers.0.conv.weight")
    bad = tmp_path / "bad_key.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"weightX") as err:
        HarDNet(68, pretrained_path=bad)
    assert "'base.3.layers.0.conv.weight'" in str(err.value) and str(bad) in str(err.value)

    state = dict(net68.state_dict())
    state["base.0.conv.weight"] = torch.zeros(32, 3, 5, 5)
    torch.save(state, tmp_path / "bad_shape.pth")
    with pytest.raises(ValueError, match=r"base\.0\.conv\.weight.*\(32, 3, 3, 3\).*\(32, 3, 5, 5\)"):
        HarDNet(68, pretrained_path=tmp_path / "bad_shape.pth")

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        HarDNet(68, pretrained_path=tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        HarDNet(68, pretrained_path=tmp_path / "missing.pth")
