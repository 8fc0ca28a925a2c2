import pytest
import torch

from glancefocus import GlanceFocusNet, create_model, preset_names
from glancefocus.config import ConfigError

# the demo presets read 1-channel canvases; every other preset RGB images
AUTHORS_PRESETS = [name for name in preset_names() if not name.startswith("demo")]


@pytest.mark.parametrize("name", AUTHORS_PRESETS)
def test_every_preset_builds_and_runs_at_a_small_input(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, patch_size=64).eval()
    steps = model.max_steps
    with torch.no_grad():
        out = model(torch.randn(2, 3, 80, 72))
    assert out.logits.shape == (steps, 2, 7)
    assert out.locations.shape == (steps - 1, 2, 2)
    assert out.boxes.shape == (steps, 2, 4)
    assert torch.isfinite(out.logits).all()
    assert ((out.locations >= 0) & (out.locations <= 1)).all()
    assert out.boxes[0].tolist() == [[0, 0, 72, 80]] * 2
    assert (out.boxes[1:, :, 2] - out.boxes[1:, :, 0] == 64).all()


@pytest.mark.parametrize("name", ["demo", "demo_vit"])
def test_demo_model_shapes_non_square_and_training_mode(name):
    model = create_model(name)
    out = model(torch.randn(3, 1, 100, 60))
    assert out.logits.shape == (3, 3, 10)
    assert out.locations.requires_grad is False
    assert (out.boxes[1:, :, 2] <= 60).all() and (out.boxes[1:, :, 3] <= 100).all()


def test_step_api_equals_full_pass():
    torch.manual_seed(0)
    model = create_model("demo").eval()
    images = torch.randn(4, 1, 100, 100)
    full = model(images)
    out = model.step(images)
    logits = [out.logits]
    for _ in range(model.max_steps - 1):
        out = model.step(images, out.state)
        logits.append(out.logits)
    assert torch.allclose(torch.stack(logits), full.logits)


def test_step_state_select_keeps_rows():
    torch.manual_seed(0)
    model = create_model("demo").eval()
    images = torch.randn(5, 1, 100, 100)
    keep = torch.tensor([True, False, True, False, True])
    with torch.no_grad():
        first = model.step(images)
        whole = model.step(images, first.state)
        part = model.step(images[keep], first.state.select(keep))
    assert torch.allclose(part.logits, whole.logits[keep], atol=1e-6)


def test_random_and_given_locations():
    model = create_model("demo").eval()
    images = torch.randn(2, 1, 100, 100)
    given = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.5, 0.5], [0.25, 0.75]]])
    out = model(images, locations=given)
    assert torch.equal(out.locations, given)
    assert out.boxes[1, 1].tolist() == [68, 68, 100, 100]
    gen = torch.Generator().manual_seed(3)
    a = model(images, locations="random", generator=gen).locations
    gen = torch.Generator().manual_seed(3)
    b = model(images, locations="random", generator=gen).locations
    assert torch.equal(a, b)


def test_bfloat16_model_runs():
    model = create_model("demo").to(torch.bfloat16).eval()
    out = model(torch.randn(2, 1, 100, 100, dtype=torch.bfloat16))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="unknown model.arch 'not_a_net'"):
        create_model("not_a_net")
    with pytest.raises(ValueError, match="smaller than the patch size"):
        create_model("demo", image_size=20)
    model = create_model("demo")
    with pytest.raises(ValueError, match="smaller than the patch size 32"):
        model(torch.randn(1, 1, 20, 100))
    with pytest.raises(ConfigError, match="model.max_steps"):
        create_model("demo", max_steps="three")
    with pytest.raises(ConfigError, match="unknown config key 'model.patchsize'"):
        create_model("demo", patchsize=3)
    with pytest.raises(ValueError, match="model.classifier"):
        create_model("demo", classifier="transformer")
    with pytest.raises(ValueError, match=r"model.policy_action_scoring must be one of \('density', 'clamped'\)"):
        create_model("demo", policy_action_scoring="exact")
    with pytest.raises(ValueError, match="locations"):
        model(torch.randn(1, 1, 64, 64), locations="centre")


def test_any_timm_cnn_gets_a_default_configuration():
    model = create_model("resnet18", num_classes=3, patch_size=32, max_steps=2).eval()
    assert isinstance(model, GlanceFocusNet)
    assert model.config.classifier == "recurrent" and model.config.policy_encoder == "conv"
    assert model(torch.randn(1, 3, 50, 40)).logits.shape == (2, 1, 3)


def test_the_demo_presets_score_clamped_actions_and_the_authors_presets_keep_density():
    assert create_model("demo").policy.action_scoring == "clamped"
    assert create_model("demo_vit").policy.action_scoring == "clamped"
    assert create_model("resnet50", num_classes=10).policy.action_scoring == "density"
