import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glancefocus import create_model
from glancefocus.cli import main

RELEASED = {  # the authors' released figures, P 96, T 5, 1000 classes
    "resnet50": dict(encoder=750_725_056, policy=46_139_392, classifier=10_461_184,
                     per_step=[761_186_240, 1_568_511_872, 2_375_837_504, 3_183_163_136, 3_990_488_768]),
    "densenet121": dict(encoder=520_414_048, policy=27_265_024, classifier=7_315_456,
                        per_step=[527_729_504, 1_082_724_032, 1_637_718_560, 2_192_713_088, 2_747_707_616]),
}


@pytest.mark.parametrize("arch", sorted(RELEASED))
def test_macs_cli_prints_the_released_numbers(arch, capsys):
    assert main(["macs", "--arch", arch, "--patch-size", "96", "--steps", "5", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    for key, value in RELEASED[arch].items():
        assert table[key] == value, key


def test_macs_follow_the_step_formula_for_other_settings():
    model = create_model("demo", num_classes=4, patch_size=40, max_steps=4)
    table = model.macs()
    enc, pol, cls = table["encoder"], table["policy"], table["classifier"]
    assert table["per_step"] == [k * enc + (k - 1) * pol + k * cls for k in range(1, 5)]
    # GRU(128 -> 128) + Linear(128 -> 4) weights
    assert cls == 6 * 128 * 128 + 128 * 4


def test_cascaded_classifier_counts_each_steps_linear():
    model = create_model("mobilenetv3_large_100", num_classes=10, patch_size=64)
    table = model.macs()
    assert table["classifier_per_step"] == [1280 * 10, 2 * 1280 * 10, 3 * 1280 * 10]
    assert table["per_step"][2] == 3 * table["encoder"] + 2 * table["policy"] + 6 * 1280 * 10


def test_macs_table_is_readable_without_json(capsys):
    assert main(["macs", "--arch", "demo", "--num-classes", "10", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "encoder" in out and "6,046,064" in out


@settings(max_examples=15, deadline=None)
@given(patch=st.integers(8, 72), steps=st.integers(1, 5), classes=st.integers(1, 50),
       hidden=st.sampled_from([8, 16, 40]))
def test_demo_encoder_macs_match_a_hand_count(patch, steps, classes, hidden):
    """Property: for the demo CNN the hook count equals the closed-form conv + BN count, and the
    per-step totals follow k * encoder + (k - 1) * policy + k * classifier."""
    model = create_model("demo", num_classes=classes, patch_size=patch, max_steps=steps,
                         classifier_hidden=hidden, policy_hidden=hidden)
    size, channels, expected = patch, 1, 0
    for width, stride in zip([16, 32, 64, 128, 128], [1, 2, 2, 2, 1]):
        size = (size + 2 - 3) // stride + 1
        expected += size * size * channels * width * 9 + width
        channels = width
    table = model.macs()
    assert table["encoder"] == expected
    gru = lambda inputs: 3 * hidden * inputs + 3 * hidden * hidden  # noqa: E731 (GRU weights)
    assert table["classifier"] == gru(128) + hidden * classes
    h, w = model.state_shape[1:]
    # 1x1 conv 128 -> 32 on the h x w state, Linear(32hw -> hidden), GRU(hidden), actor Linear(hidden -> 2)
    assert table["policy"] == 128 * 32 * h * w + 32 * h * w * hidden + gru(hidden) + 2 * hidden
    assert table["per_step"] == [k * table["encoder"] + (k - 1) * table["policy"] + k * table["classifier"]
                                 for k in range(1, steps + 1)]


TIMM_FAMILIES = [  # (arch, P, timm kwargs): tiny variants, small inputs, random weights
    ("resnet18", 64, {}),
    ("efficientnet_b0", 64, {}),
    ("mobilenetv3_small_050", 64, {}),
    ("regnetx_002", 64, {}),
    ("convnext_atto", 64, {}),  # Linear block MLPs, which a convolution-only count misses
    ("deit_tiny_patch16_224", 64, dict(depth=2)),  # attention and Linear layers
    ("swin_tiny_patch4_window7_224", 224, dict(embed_dim=24, depths=(1, 1, 1, 1),
                                               num_heads=(1, 1, 2, 2))),
]


@pytest.mark.parametrize("arch,patch,kwargs", TIMM_FAMILIES, ids=[f[0] for f in TIMM_FAMILIES])
def test_encoder_macs_agree_with_flop_counter_mode(arch, patch, kwargs):
    """Every family's count is within 2 % of FlopCounterMode's FLOPs / 2 on the same encoder,
    measured with attention as explicit matrix products (which FlopCounterMode counts on CPU
    too; the fused CPU kernel ours counts by the same formula is not in its registry)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from glancefocus.encoder import Encoder, create_backbone
    from glancefocus.macs import encoder_macs

    torch.manual_seed(0)
    encoder = Encoder(create_backbone(arch, num_classes=10, in_chans=3, pretrained=False,
                                      input_size=patch, **kwargs))
    ours = encoder_macs(encoder, (3, patch, patch))
    for module in encoder.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder.eval()(torch.zeros(1, 3, patch, patch))
    reference = counter.get_total_flops() // 2
    assert reference > 0
    assert abs(ours - reference) <= 0.02 * reference, (ours, reference)


def test_an_encoder_with_uncounted_work_is_refused():
    """An FFT mixing step (as in global-filter networks) is not counted by FlopCounterMode: the
    count is refused, naming the operation, rather than reported too low."""
    import torch
    from torch import nn

    from glancefocus.encoder import Encoder
    from glancefocus.macs import encoder_macs

    class FourierMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 2)

        def forward_features(self, x):
            return torch.fft.irfft2(torch.fft.rfft2(self.conv(x)), s=x.shape[-2:])

        def forward_head(self, x, pre_logits=False):
            x = x.mean((2, 3))
            return x if pre_logits else self.fc(x)

        def get_classifier(self):
            return self.fc

    with pytest.raises(ValueError, match="fft"):
        encoder_macs(Encoder(FourierMixer()), (3, 16, 16), "fourier mixer")


def test_a_vit_counts_its_attention():
    """deit_tiny (3 blocks) at P 96: the patch embedding, the Linear layers and both attention products
    of every block, counted by hand."""
    model = create_model("deit_tiny_patch16_224", num_classes=10, patch_size=96, max_steps=2,
                         encoder_kwargs=dict(depth=3))
    tokens, dim, hidden, depth = 6 * 6 + 1, 192, 768, 3
    patch_embed = 36 * 3 * 16 * 16 * dim
    block = tokens * (dim * 3 * dim + dim * dim + 2 * dim * hidden) + 2 * tokens * tokens * dim
    assert model.macs()["encoder"] == patch_embed + depth * block
    assert model.state_shape == (dim, 6, 6)


def test_a_vit_counts_the_same_on_every_attention_path():
    """Attention runs the CPU's fused kernel on real tensors, and its math path (matrix products
    and a masked-row-safe softmax) on the meta device, where training estimates its memory, or
    when asked for: the same count on each."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def encoder_count():
        return create_model("demo_vit", num_classes=10, encoder_kwargs=dict(depth=1)).macs()["encoder"]

    fused = encoder_count()
    with torch.device("meta"):
        assert encoder_count() == fused
    with sdpa_kernel([SDPBackend.MATH]):
        assert encoder_count() == fused
