"""Policy: JSON round trip, the CLI's --policy forms, and checks against a model."""

import json

import pytest
import torchvision

from pipeline.core.errors import PolicyError
from pipeline.core.policy import (
    LayerAction,
    Policy,
    Precision,
    check_policy,
    head_layer,
    parse_policy_arg,
    policy_layers,
)


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(num_classes=10)


def test_round_trip_through_json(tmp_path):
    policy = Policy(
        {
            "conv1": LayerAction(0.5, Precision.INT8),
            "layer1.0.conv1": LayerAction(0.75, Precision.FP32),
        }
    )
    path = tmp_path / "policy.json"
    policy.save(path)
    assert Policy.load(path) == policy
    assert json.loads(path.read_text())["layers"]["conv1"] == {
        "keep_ratio": 0.5,
        "precision": "int8",
    }


def test_uniform_spec_covers_every_layer_and_spares_the_head(resnet):
    policy = parse_policy_arg("uniform:0.5", resnet, Precision.FP32)
    assert list(policy.layers) == policy_layers(resnet)
    assert head_layer(resnet) == "fc"
    assert policy.action("fc").keep_ratio == 1.0
    assert policy.action("layer2.0.conv1") == LayerAction(0.5, Precision.FP32)
    int8 = parse_policy_arg("uniform:0.5:int8", resnet, Precision.FP32)
    assert {a.precision for a in int8.layers.values()} == {Precision.INT8}


@pytest.mark.parametrize("spec", ["uniform:", "uniform:abc", "uniform:1.5", "uniform:0.5:int4"])
def test_bad_uniform_specs(resnet, spec):
    with pytest.raises(PolicyError, match="--policy"):
        parse_policy_arg(spec, resnet, Precision.FP32)


def test_unknown_layer_is_named_with_examples(resnet):
    policy = Policy({"layer9.conv": LayerAction(0.5)})
    with pytest.raises(PolicyError, match=r"unknown layer 'layer9.conv'.*conv1"):
        check_policy(policy, resnet, [Precision.FP32])


def test_precision_outside_the_profile_is_refused(resnet):
    policy = Policy({"conv1": LayerAction(0.5, Precision.FP16)})
    with pytest.raises(PolicyError, match="does not allow"):
        check_policy(policy, resnet, [Precision.INT8, Precision.FP32])


@pytest.mark.parametrize(
    "payload",
    [
        {"layers": {"conv1": {"keep_ratio": 0}}},
        {"layers": {"conv1": {"keep_ratio": "half"}}},
        {"layers": {"conv1": {"precision": "int4"}}},
        {"layers": {"conv1": {"keep": 0.5}}},
        {"nope": {}},
    ],
)
def test_malformed_policy_files(tmp_path, payload):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(PolicyError):
        Policy.load(path)


def test_invalid_json_policy_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(PolicyError, match="invalid JSON"):
        Policy.load(path)
