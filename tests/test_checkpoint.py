"""Native checkpoints and the import of the authors' release files.

The importer is checked against `authors_probabilities`, a literal transcription of the
authors' inference (their inference.py: resize, per-sample crop loop, step order, GRU use) built
from plain modules and the raw state dicts, not from glancefocus's classes."""
import os
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import glancefocus as gf
from glancefocus.checkpoint import CheckpointError, read_checkpoint
from glancefocus.cli import main


def _module_prefixed(state):
    return {f"module.{k}": v.clone() for k, v in state.items()}


def make_authors_file(path, preset, num_classes=10, patch_size=64, seed=0, key_style=None):
    """Write a file in the release's layout (GFNet-Pytorch's *.pth.tar) from randomly initialised parts."""
    torch.manual_seed(seed)
    model = gf.create_model(preset, num_classes=num_classes, patch_size=patch_size)
    # give BatchNorm statistics non-trivial values so a mix-up of the two encoders would show
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    steps = model.max_steps
    glance = model.glance_encoder.backbone.state_dict()
    focus = model.focus_encoder.backbone.state_dict()
    if key_style is not None:
        glance, focus = key_style(glance), key_style(focus)
    fc = {k.removeprefix("classifier."): v.clone() for k, v in model.state_dict().items()
          if k.startswith("classifier.")}
    if model.config.classifier == "cascaded":  # the release always holds fc_2..fc_5
        feature_dim = model.feature_dim
        for t in range(steps + 1, 6):
            fc[f"fc_{t}.weight"] = torch.randn(num_classes, t * feature_dim)
            fc[f"fc_{t}.bias"] = torch.randn(num_classes)
    policy = {k.removeprefix("policy."): v.clone() for k, v in model.state_dict().items()
              if k.startswith("policy.")}
    raw = {
        "model_name": preset, "patch_size": patch_size,
        "model_prime_state_dict": _module_prefixed(glance),
        "model_state_dict": _module_prefixed(focus),
        "fc": fc, "policy": policy,
        "model_flops": 1.0e8, "policy_flops": 2.0e6, "fc_flops": 3.0e5,
        "flops": [float(1e8 * k) for k in range(1, steps + 1)],
        "anytime_classification": [60.0 + k for k in range(steps)],
        "dynamic_threshold": torch.rand(39, steps),
        "budgeted_batch_classification": [[1e8 + p for p in range(39)], [70.0 + p / 10 for p in range(39)]],
    }
    torch.save(raw, path, _use_new_zipfile_serialization=False)  # PyTorch 1.3's legacy format
    # the encoders' weights under timm's names, for the reference inference to build its networks
    timm_states = (model.glance_encoder.backbone.state_dict(), model.focus_encoder.backbone.state_dict())
    return raw, timm_states


def authors_probabilities(raw, timm_states, images, timm_name, interpolation, recurrent,
                          glance_uses_encoder_head, policy_conv, hidden_fc=1024):
    """Per-step softmax probabilities [T, B, K], the way the authors' inference computes them."""
    patch = raw["patch_size"]
    steps = len(raw["flops"])
    num_classes = raw["fc"]["fc.weight" if recurrent else "fc_2.weight"].shape[0]

    def backbone(state):
        if timm_name == "mobilenetv3_large_125":
            from timm.models.mobilenetv3 import _gen_mobilenet_v3
            net = _gen_mobilenet_v3("mobilenetv3_large_100", 1.25, num_classes=num_classes)
        else:
            net = timm.create_model(timm_name, num_classes=num_classes)
        net.load_state_dict(state)
        return net.eval()

    model_prime, model = backbone(timm_states[0]), backbone(timm_states[1])

    def encode(net, x):
        fmap = net.forward_features(x)
        return net.forward_head(fmap, pre_logits=True), fmap

    fc = raw["fc"]
    if recurrent:
        rnn = nn.GRU(fc["rnn.weight_ih_l0"].shape[1], hidden_fc)
        rnn.load_state_dict({k[4:]: v for k, v in fc.items() if k.startswith("rnn.")})
        head = nn.Linear(hidden_fc, num_classes)
        head.load_state_dict({"weight": fc["fc.weight"], "bias": fc["fc.bias"]})
    pol = raw["policy"]
    hidden_policy = pol["gru.weight_hh_l0"].shape[1]

    def linear(prefix):
        layer = nn.Linear(pol[prefix + ".weight"].shape[1], pol[prefix + ".weight"].shape[0])
        layer.load_state_dict({"weight": pol[prefix + ".weight"], "bias": pol[prefix + ".bias"]})
        return layer

    policy_gru = nn.GRU(hidden_policy, hidden_policy)
    policy_gru.load_state_dict({k[4:]: v for k, v in pol.items() if k.startswith("gru.")})
    actor = linear("actor.0")

    def act(state_map, hidden):
        if policy_conv:
            z = F.relu(F.conv2d(state_map, pol["state_encoder.0.weight"]))
            z = F.relu(linear("state_encoder.3")(z.flatten(1)))
        else:
            z = F.relu(linear("state_encoder.0")(state_map.flatten(1)))
            z = F.relu(linear("state_encoder.2")(z))
        out, hidden = policy_gru(z[None], hidden)
        return torch.sigmoid(actor(out[0])), hidden

    size = images.size(2)
    batch = images.size(0)
    probs = []
    with torch.no_grad():
        prime = F.interpolate(images, size=[patch, patch], mode=interpolation, align_corners=True)
        feature, state = encode(model_prime, prime)
        if recurrent:
            out, h_fc = rnn(feature[None], torch.zeros(1, batch, hidden_fc))
            logits = head(out[0])
        else:
            features = feature
        if glance_uses_encoder_head:
            logits = model_prime.get_classifier()(feature)
        probs.append(F.softmax(logits, 1))
        h_pol = torch.zeros(1, batch, hidden_policy)
        for step in range(1, steps):
            action, h_pol = act(state, h_pol)
            corner = torch.floor(action * (size - patch)).int()
            patches = torch.cat([images[i:i + 1, :, corner[i, 0]:corner[i, 0] + patch,
                                        corner[i, 1]:corner[i, 1] + patch] for i in range(batch)])
            feature, state = encode(model, patches)
            if recurrent:
                out, h_fc = rnn(feature[None], h_fc)
                logits = head(out[0])
            else:
                features = torch.cat([features, feature], 1)
                t = step + 1
                logits = F.linear(features, fc[f"fc_{t}.weight"], fc[f"fc_{t}.bias"])
            probs.append(F.softmax(logits, 1))
    return torch.stack(probs)


def _old_densenet_keys(state):
    """Rename to the pre-0.3 torchvision style ('norm.1') that old DenseNet files carry."""
    return {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}


def _timm_to_pycls(state):
    rules = [(r"\.downsample\.conv\.", ".proj."), (r"\.downsample\.bn\.", ".bn."),
             (r"\.conv1\.conv\.", ".f.a."), (r"\.conv1\.bn\.", ".f.a_bn."),
             (r"\.conv2\.conv\.", ".f.b."), (r"\.conv2\.bn\.", ".f.b_bn."),
             (r"\.se\.fc1\.", ".f.se.f_ex.0."), (r"\.se\.fc2\.", ".f.se.f_ex.2."),
             (r"\.conv3\.conv\.", ".f.c."), (r"\.conv3\.bn\.", ".f.c_bn."), (r"^head\.fc\.", "fc.")]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


CASES = {
    # preset: (timm name, glance interpolation, recurrent, glance uses encoder head, conv policy, key style)
    "resnet50": ("resnet50", "bicubic", True, False, False, None),
    "densenet121": ("densenet121", "bilinear", True, False, False, _old_densenet_keys),
    "mobilenetv3_large_100": ("mobilenetv3_large_100", "bicubic", False, True, True, None),
    "mobilenetv3_large_125": ("mobilenetv3_large_125", "bicubic", False, True, True, None),
    "regnety_600m": ("regnety_006", "bilinear", True, True, True, _timm_to_pycls),
    "efficientnet_b2": ("efficientnet_b2", "bicubic", False, True, True, None),
}


@pytest.mark.parametrize("preset", sorted(CASES))
def test_imported_model_matches_the_authors_inference(preset, tmp_path):
    timm_name, interp, recurrent, encoder_head, conv, key_style = CASES[preset]
    path = tmp_path / f"{preset}.pth.tar"
    raw, timm_states = make_authors_file(path, preset, key_style=key_style)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        gf.load_checkpoint(path)
    model = gf.load_checkpoint(path, trust_pickle=True)
    torch.manual_seed(1)
    images = torch.randn(3, 3, 80, 80)
    with torch.no_grad():
        ours = F.softmax(model(images).logits, dim=-1)
    expected = authors_probabilities(raw, timm_states, images, timm_name, interp, recurrent, encoder_head, conv)
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (ours - expected).abs().max()
    # the stored evaluation results come along
    assert model.metrics["anytime_top1"] == raw["anytime_classification"]
    assert torch.allclose(torch.tensor(model.exit_curve["thresholds"]), raw["dynamic_threshold"])
    assert model.exit_curve["macs"] == raw["budgeted_batch_classification"][0]


def test_convert_command_writes_a_safe_native_file(tmp_path, capsys):
    src, dst = tmp_path / "r.pth.tar", tmp_path / "r.pt"
    make_authors_file(src, "mobilenetv3_large_100")
    assert main(["convert", str(src), str(dst)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not dst.exists()
    assert main(["convert", "--trust-pickle", str(src), str(dst)]) == 0
    data = read_checkpoint(dst)  # weights_only: no pickle needed any more
    assert data["exit_curve"]["thresholds"] and data["metrics"]["anytime_top1"]
    model = gf.load_checkpoint(dst)
    assert not model.training and model.exit_curve["accuracy"][0] == 70.0


def test_native_round_trip_keeps_weights_and_extras(tmp_path):
    torch.manual_seed(0)
    model = gf.create_model("demo", num_classes=10)
    model.class_names = [str(i) for i in range(10)]
    model.exit_curve = {"thresholds": [[0.5, 0.4, -1e8]], "macs": [1.0], "accuracy": [2.0], "budgets": [0.05]}
    model.metrics = {"anytime_top1": [1.0, 2.0, 3.0]}
    path = tmp_path / "sub" / "m.pt"
    gf.save_checkpoint(model, path, run_config={"data": {"dataset": "cluttered-mnist"}})
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temporary file left behind
    loaded = gf.load_checkpoint(path)
    assert not loaded.training
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.class_names == model.class_names
    assert loaded.exit_curve == model.exit_curve and loaded.metrics == model.metrics
    assert loaded.run_config["data"]["dataset"] == "cluttered-mnist"
    assert read_checkpoint(path)["macs"] == model.macs()


def test_wrong_truncated_and_missing_checkpoints(tmp_path):
    model = gf.create_model("demo")
    path = tmp_path / "m.pt"
    gf.save_checkpoint(model, path)
    data = read_checkpoint(path)
    other = gf.create_model("demo", num_classes=5)
    with pytest.raises(CheckpointError, match="num_classes"):
        gf.checkpoint.check_compatible(data, other.config, path)
    with pytest.raises(CheckpointError, match=r"\(5,.*for demo_cnn with 5 classes"):
        gf.checkpoint.load_state_checked(other, data["state_dict"], path)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pt' cannot be read"):
        gf.load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        gf.load_checkpoint(tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(1)}, junk)
    with pytest.raises(CheckpointError, match="not a glancefocus checkpoint"):
        gf.load_checkpoint(junk)


def test_a_crafted_pickle_never_runs_without_opt_in(tmp_path, capsys, write_crafted_pickle):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth.tar"
    write_crafted_pickle(path, marker, key="model_prime_state_dict")
    with pytest.raises(CheckpointError, match="could run code"):
        gf.load_checkpoint(path)
    assert main(["convert", str(path), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--trust-pickle" in err
    assert not os.path.exists(marker)


def test_unknown_authors_arch_is_refused(tmp_path):
    path = tmp_path / "x.pth.tar"
    torch.save({"model_name": "vgg16", "model_prime_state_dict": {}, "fc": {}, "flops": [1]}, path)
    with pytest.raises(CheckpointError, match="'vgg16' is not one of the authors'"):
        gf.load_checkpoint(path, trust_pickle=True)


def test_a_checkpoint_saved_before_policy_action_scoring_existed_loads_with_density(tmp_path):
    from glancefocus.checkpoint import model_from_native

    model = gf.create_model("demo", num_classes=10, policy_action_scoring="clamped")
    gf.save_checkpoint(model, tmp_path / "m.pt")
    data = read_checkpoint(tmp_path / "m.pt")
    assert data["config"]["model"]["policy_action_scoring"] == "clamped"
    assert gf.load_checkpoint(tmp_path / "m.pt").policy.action_scoring == "clamped"
    del data["config"]["model"]["policy_action_scoring"]  # as saved before the key existed
    loaded = model_from_native(data)
    assert loaded.config.policy_action_scoring == "density"
    assert loaded.policy.action_scoring == "density"
