"""Prompt generator g and surrogate decoder h (AutoSAM paper section 3)."""

import pytest
import torch
from torch import nn

from autosam_core.prompt_generator import IMAGENET_MEAN, IMAGENET_STD, PromptGenerator
from autosam_core.surrogate_decoder import SurrogateDecoder

PAPER_PARAMS = 41_560_000


@pytest.fixture(scope="module")
def g85():
    torch.manual_seed(0)
    return PromptGenerator("hardnet85").eval()


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_param_count_matches_paper(g85):
    n = n_params(g85)
    print(f"PromptGenerator('hardnet85'): {n:,} parameters ({n / PAPER_PARAMS - 1:+.2%} vs paper)")
    assert abs(n - PAPER_PARAMS) <= 0.02 * PAPER_PARAMS
    assert g85.feature_ids == (5, 3, 1) and g85.stride == 32


@pytest.mark.parametrize("hw", [(128, 128), (256, 256), (256, 320)])
def test_output_shape_and_range(g85, hw):
    with torch.no_grad():
        z = g85(torch.randn(2, 3, *hw))
    assert z.shape == (2, 256, 64, 64) and z.dtype == torch.float32
    assert z.min() >= -1 and z.max() <= 1


def test_bad_inputs(g85):
    with pytest.raises(ValueError, match="100x100"):
        g85(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match=r"\(1, 3, 64\)"):
        g85(torch.randn(1, 3, 64))
    with pytest.raises(ValueError, match="resnet"):
        PromptGenerator("resnet18")


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    g = PromptGenerator("hardnet85").train()
    g(torch.randn(2, 3, 64, 64)).sum().backward()
    no_grad = [k for k, p in g.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_batch_independence_in_eval(g85):
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(g85(x[:1])[0], g85(x)[0], atol=1e-5)


def test_pretrained_backbone_round_trip(tmp_path):
    src = PromptGenerator("hardnet68")
    path = tmp_path / "hardnet68.pth"
    torch.save(src.backbone.state_dict(), path)
    g = PromptGenerator("hardnet68", pretrained_path=path)
    assert all(torch.equal(v, g.backbone.state_dict()[k]) for k, v in src.backbone.state_dict().items())
    assert n_params(g) == 22_734_524 and g.feature_ids == (4, 3, 1)


def test_timm_backbone(tmp_path):
    import timm

    g = PromptGenerator("timm:resnet18").eval()  # pretrained=False: nothing is downloaded
    with torch.no_grad():
        z = g(torch.randn(2, 3, 128, 128))
    assert z.shape == (2, 256, 64, 64) and z.abs().max() <= 1
    assert g.feature_ids == (4, 3, 2)
    ref = timm.create_model("resnet18", pretrained=False)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    g = PromptGenerator("timm:resnet18", pretrained_path=tmp_path / "r18.pth")
    assert torch.equal(g.backbone.model.conv1.weight, ref.conv1.weight)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        PromptGenerator("timm:resnet18", pretrained_path=tmp_path / "nope.pth")


def test_imagenet_constants():
    assert len(IMAGENET_MEAN) == len(IMAGENET_STD) == 3
    assert all(50 < s < 60 for s in IMAGENET_STD) and all(100 < m < 130 for m in IMAGENET_MEAN)


def test_surrogate_decoder(g85):
    h = SurrogateDecoder()
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in h.modules()) == 2
    print(f"SurrogateDecoder: {n_params(h):,} parameters")
    logits = h(torch.rand(2, 256, 64, 64) * 2 - 1)
    assert logits.shape == (2, 1, 256, 256) and logits.dtype == torch.float32
    with torch.no_grad():
        assert h.eval()(g85(torch.randn(1, 3, 64, 64))).shape == (1, 1, 256, 256)
    for shape in [(2, 256, 32, 32), (2, 128, 64, 64), (256, 64, 64)]:
        with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
            h(torch.randn(*shape))
