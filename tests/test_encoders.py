"""Vision transformers as glance and focus encoders: tokens as the policy's map, their sizes
set to the patch size, the optimiser the ViT presets use."""
import pytest
import torch

import glancefocus as gf
from glancefocus.config import StageConfig
from glancefocus.encoder import Encoder, create_backbone
from glancefocus.train.optim import set_cosine_lr, sgd


def test_vit_patch_tokens_form_the_feature_map_in_row_major_order():
    torch.manual_seed(0)
    encoder = Encoder(create_backbone("demo_vit", num_classes=10, in_chans=1, pretrained=False,
                                      input_size=24, depth=1)).eval()
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        tokens = encoder.backbone.forward_features(x)
        pooled, fmap = encoder(x)
    assert fmap.shape == (2, 64, 6, 6)   # 24 / 4 pixels per patch; the class token left out
    torch.testing.assert_close(fmap[:, :, 1, 2], tokens[:, 1 + 1 * 6 + 2])
    torch.testing.assert_close(pooled, tokens[:, 0])  # the class token is the feature


def test_a_vit_model_steps_and_refuses_a_patch_size_its_patches_do_not_divide():
    torch.manual_seed(0)
    model = gf.create_model("demo_vit", max_steps=2, encoder_kwargs=dict(depth=1))
    out = model(torch.randn(2, 1, 100, 100))
    assert out.logits.shape == (2, 2, 10) and model.state_shape == (64, 8, 8)
    with pytest.raises(ValueError, match="model.arch 'demo_vit'"):
        gf.create_model("demo_vit", patch_size=30, encoder_kwargs=dict(depth=1))


def test_adamw_decays_weights_only_and_warms_up_before_the_cosine():
    linear = torch.nn.Linear(3, 2)
    settings = StageConfig(optimizer="adamw", weight_decay=0.05, warmup_epochs=2, epochs=6)
    optimizer = sgd([(list(linear.parameters()), 1e-3)], settings)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay = {tuple(p.shape): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay == {(2, 3): 0.05, (2,): 0.0}
    rates = []
    for epoch in range(6):
        set_cosine_lr(optimizer, epoch, 6, warmup_epochs=2)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert rates[3] < rates[2] and rates[5] < rates[4]
    with pytest.raises(ValueError, match="optimizer"):
        sgd([(list(linear.parameters()), 1e-3)], StageConfig(optimizer="lamb"))
