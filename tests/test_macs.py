import json

import pytest

from glancefocus import create_model
from glancefocus.cli import main

REFERENCE = {  # REFERENCE §4: the released figures, P 96, T 5, 1000 classes
    "resnet50": dict(encoder=750_725_056, policy=46_139_392, classifier=10_461_184,
                     per_step=[761_186_240, 1_568_511_872, 2_375_837_504, 3_183_163_136, 3_990_488_768]),
    "densenet121": dict(encoder=520_414_048, policy=27_265_024, classifier=7_315_456,
                        per_step=[527_729_504, 1_082_724_032, 1_637_718_560, 2_192_713_088, 2_747_707_616]),
}


@pytest.mark.parametrize("arch", sorted(REFERENCE))
def test_macs_cli_prints_the_released_numbers(arch, capsys):
    assert main(["macs", "--arch", arch, "--patch-size", "96", "--steps", "5", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    for key, value in REFERENCE[arch].items():
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
