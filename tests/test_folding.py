"""BatchNorm folded into convolutions for frozen passes (folding.py): the same outputs up to
float rounding, a fresh copy whenever the weights change, and never in training or under
gradients."""
import pytest
import torch
from torch import nn

from glancefocus.encoder import Encoder, create_backbone
from glancefocus.folding import conv_batchnorm_pairs, fold_batchnorm, folded_encoders


def _randomise_batchnorm(module: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine weights away from their fresh values, so folding matters."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


@pytest.mark.parametrize("arch, in_chans, size", [
    ("demo_cnn", 1, 32),                   # torch's BatchNorm2d after each convolution
    ("resnet18", 3, 64),                   # timm ResNet: conv -> bn -> act
    ("mobilenetv3_small_050", 3, 64),      # timm BatchNormAct2d: the activation stays
])
@torch.no_grad()
def test_folded_encoder_matches_the_unfolded_one(arch, in_chans, size):
    backbone = create_backbone(arch, num_classes=10, in_chans=in_chans, pretrained=False)
    _randomise_batchnorm(backbone)
    encoder = Encoder(backbone).eval()
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert len(conv_batchnorm_pairs(backbone)) == batchnorms
    x = torch.randn(3, in_chans, size, size)
    pooled, fmap = encoder(x)
    with folded_encoders(encoder):
        folded_pooled, folded_fmap = encoder(x)
    assert encoder._folded is not None and encoder._folded[1] is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder._folded[1].modules())
    torch.testing.assert_close(folded_pooled, pooled, rtol=1e-5, atol=1e-5 * pooled.abs().max())
    torch.testing.assert_close(folded_fmap, fmap, rtol=1e-5, atol=1e-5 * fmap.abs().max())
    assert not encoder.fold_batchnorm  # the context restores the setting


@torch.no_grad()
def test_the_folded_copy_follows_the_weights_and_stays_out_of_the_state_dict():
    encoder = Encoder(create_backbone("demo_cnn", num_classes=10, in_chans=1, pretrained=False)).eval()
    keys = set(encoder.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with folded_encoders(encoder):
        encoder(x)
        first = encoder._folded[1]
        encoder(x)
        assert encoder._folded[1] is first  # cached while the weights stay
        _randomise_batchnorm(encoder, seed=1)  # in place, as an optimiser step or load_state_dict
        changed = encoder(x)[0]
        assert encoder._folded[1] is not first
    assert set(encoder.state_dict()) == keys
    torch.testing.assert_close(changed, encoder(x)[0], rtol=1e-5, atol=1e-6)


def test_folding_applies_only_to_eval_passes_without_gradients():
    encoder = Encoder(create_backbone("demo_cnn", num_classes=10, in_chans=1, pretrained=False))
    x = torch.randn(2, 1, 32, 32)
    with folded_encoders(encoder):
        encoder.train()
        with torch.no_grad():
            encoder(x)          # training mode: batch statistics, nothing to fold
        encoder.eval()
        pooled, _ = encoder(x)  # gradients on: the real BatchNorm, so they reach its weights
        assert encoder._folded is None
        pooled.sum().backward()
    assert encoder.backbone.features[1].weight.grad is not None


class _Branching(nn.Module):
    """A backbone whose forward branches on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

    def forward_features(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else self.bn(self.conv(-x))


def test_a_backbone_that_does_not_trace_runs_unfolded():
    assert conv_batchnorm_pairs(_Branching()) == []
    assert fold_batchnorm(_Branching()) is None


class _ScaledNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose forward does more than the affine map."""

    def forward(self, x):
        return 2 * super().forward(x)


class _WithScaledNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), _ScaledNorm(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def forward_features(self, x):
        return self.bn2(self.conv2(self.bn(self.conv(x))))


def test_only_known_batchnorms_are_folded():
    assert conv_batchnorm_pairs(_WithScaledNorm()) == [("conv2", "bn2")]
