"""Pruning with torch-pruning: residual and depthwise networks shrink, run, and rebuild."""

import pytest
import torch
import torchvision

from pipeline.core.errors import ModelError
from pipeline.core.policy import LayerAction, Policy, Precision, uniform_policy
from pipeline.model.prune import (
    channels_to_keep,
    count_macs_params,
    load_history,
    prune_model,
    replay_history,
    save_history,
)
from pipeline.search.space import coupling_groups

SHAPE = (3, 32, 32)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_uniform_pruning_removes_channels_and_still_runs(arch):
    model = torchvision.models.get_model(arch, num_classes=10).eval()
    macs0, params0 = count_macs_params(model, SHAPE)
    result = prune_model(model, uniform_policy(model, 0.5, Precision.FP32), SHAPE, 8, 0.1)
    macs1, params1 = count_macs_params(model, SHAPE)
    assert macs1 < 0.45 * macs0 and params1 < 0.45 * params0
    out = model(torch.randn(2, *SHAPE))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    for name, (before, after) in result.channels.items():
        assert after % 8 == 0 or after == before, name
        assert after <= before


def test_only_a_policy_that_removes_something_changes_the_model():
    model = torchvision.models.resnet18(num_classes=10).eval()
    assert prune_model(model, uniform_policy(model, 1.0, Precision.INT8), SHAPE).unchanged
    assert not prune_model(model, uniform_policy(model, 0.5, Precision.FP32), SHAPE).unchanged
    removal = Policy(removed=("layer1.0",))
    assert not prune_model(torchvision.models.resnet18(num_classes=10), removal, SHAPE).unchanged


def test_head_outputs_are_untouched():
    model = torchvision.models.resnet18(num_classes=10).eval()
    prune_model(model, uniform_policy(model, 0.25, Precision.FP32), SHAPE, 8, 0.1)
    assert model.fc.out_features == 10
    assert model.fc.in_features == model.layer4[1].conv2.out_channels


def test_residual_coupling_keeps_block_outputs_equal():
    model = torchvision.models.resnet18(num_classes=10).eval()
    # Ask for different ratios inside the coupled residual stream of layer1 (the stem conv1
    # is coupled to it too; a layer missing from a policy would keep all its channels).
    policy = Policy(
        {
            "conv1": LayerAction(0.5),
            "layer1.0.conv2": LayerAction(0.25),
            "layer1.1.conv2": LayerAction(0.75),
            "layer1.0.conv1": LayerAction(0.5),
        }
    )
    result = prune_model(model, policy, SHAPE, 8, 0.1)
    assert model.layer1[0].conv2.out_channels == model.layer1[1].conv2.out_channels
    assert model.conv1.out_channels == model.layer1[0].conv2.out_channels
    # The group keeps the largest ratio asked for: 0.75 of 64 = 48 channels.
    assert result.channels["layer1.1.conv2"] == (64, 48)
    assert model.layer1[0].conv1.out_channels == 32


def test_depthwise_layers_stay_consistent():
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    prune_model(model, uniform_policy(model, 0.5, Precision.FP32), SHAPE, 8, 0.1)
    for block in model.features[1:-1]:
        convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
        for conv in convs:
            if conv.groups > 1:
                assert conv.groups == conv.in_channels == conv.out_channels


def test_grouped_convolutions_are_left_whole_and_the_rest_prunes():
    """RegNetX's grouped 3x3 convolutions (and the 1x1 before each) keep their channels; the
    residual stream still prunes and the model still runs. Without this torch-pruning picks
    channels unevenly over the groups and the pruned weights no longer fit the layer."""
    model = torchvision.models.regnet_x_400mf(num_classes=10).eval()
    grouped = model.trunk_output.block1[0].f.b[0]
    assert 1 < grouped.groups < grouped.in_channels
    groups = coupling_groups(model, SHAPE)
    assert "trunk_output.block1.block1-0.f.b.0" not in groups
    assert "trunk_output.block1.block1-0.proj.0" in groups
    result = prune_model(model, uniform_policy(model, 0.5, Precision.FP32), SHAPE, 8, 0.1)
    assert grouped.out_channels == grouped.in_channels == 32
    assert result.channels["trunk_output.block1.block1-0.proj.0"] == (32, 16)
    out = model(torch.randn(2, *SHAPE))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("channels", "ratio", "multiple", "min_keep", "expected"),
    [
        (64, 0.5, 8, 0.1, 32),
        (64, 0.3, 8, 0.1, 16),  # 19.2 rounds to 16
        (64, 0.01, 8, 0.25, 16),  # minimum keep wins
        (64, 1.0, 8, 0.1, 64),
        (10, 0.5, 8, 0.1, 8),
        (6, 0.5, 8, 0.1, 6),  # fewer channels than the multiple: kept whole
        (512, 0.33, 32, 0.1, 160),
    ],
)
def test_channel_rounding(channels, ratio, multiple, min_keep, expected):
    assert channels_to_keep(channels, ratio, multiple, min_keep) == expected


def test_rebuild_from_history_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    result = prune_model(model, uniform_policy(model, 0.5, Precision.FP32), SHAPE, 8, 0.1)
    save_history(tmp_path / "h.json", result.history, {"model": "mobilenet_v2"})
    fresh = torchvision.models.mobilenet_v2(num_classes=10).eval()
    replay_history(fresh, load_history(tmp_path / "h.json")["history"], SHAPE)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(fresh(x), model(x))


def _tiny_densenet() -> torch.nn.Module:
    return torchvision.models.DenseNet(32, (2, 2), 32, bn_size=2, num_classes=10).eval()


def _tiny_googlenet() -> torch.nn.Module:
    from torchvision.models.googlenet import BasicConv2d, Inception

    return torch.nn.Sequential(
        BasicConv2d(3, 32, kernel_size=3, padding=1),
        Inception(32, 32, 16, 32, 16, 32, 32),  # four branches concatenated: 32 + 32 + 32 + 32
        Inception(128, 32, 16, 32, 16, 32, 32),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(128, 10),
    ).eval()


@pytest.mark.parametrize("build", [_tiny_densenet, _tiny_googlenet], ids=["densenet", "inception"])
def test_concatenated_branches_prune_and_rebuild(build, tmp_path):
    """DenseNet concatenates every layer's features with its inputs, GoogLeNet its branches: a
    group pruned earlier moves the offsets of the concatenations that later groups pass through,
    so each group must be built after the ones before it were pruned."""
    torch.manual_seed(0)
    model = build()
    macs0, params0 = count_macs_params(model, SHAPE)
    result = prune_model(model, uniform_policy(model, 0.3, Precision.FP32), SHAPE, 8, 0.1)
    macs1, params1 = count_macs_params(model, SHAPE)
    assert macs1 < 0.8 * macs0 and params1 < 0.8 * params0
    x = torch.randn(2, *SHAPE)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    save_history(tmp_path / "h.json", result.history, {"model": "tiny"})
    fresh = replay_history(build(), load_history(tmp_path / "h.json")["history"], SHAPE)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), out)


def test_an_operation_torch_pruning_cannot_map_is_one_line_naming_the_layer():
    """ShuffleNet's channel shuffle (a reshape that interleaves channels) has no index mapping in
    torch-pruning: bad input for pruning, reported as one line at the layer before it."""
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    with pytest.raises(ModelError) as exc:
        prune_model(model, uniform_policy(model, 0.5, Precision.FP32), SHAPE)
    message = str(exc.value)
    assert "\n" not in message
    assert "torch-pruning could not trace the model at the reshape after layer 'stage" in message
    assert "cannot prune this architecture" in message


def _tiny_vit() -> torch.nn.Module:
    return torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10).eval()


def _tiny_swin() -> torch.nn.Module:
    from torchvision.models import SwinTransformer

    return SwinTransformer([4, 4], 16, [1, 1], [1, 2], [4, 4], num_classes=10).eval()


@pytest.mark.parametrize("build", [_tiny_vit, _tiny_swin], ids=["vit", "swin"])
def test_transformers_prune_only_their_mlp_hidden_layers(build):
    """The residual stream of a transformer is tied to its heads, tokens and window reshapes,
    which torch-pruning cannot follow: only each MLP's hidden layer shrinks."""
    model = build()
    result = prune_model(model, uniform_policy(model, 0.3, Precision.FP32), SHAPE, 8, 0.1)
    changed = {n for n, (before, after) in result.channels.items() if after < before}
    assert changed and all(n.endswith("mlp.0") for n in changed), changed
    assert set(coupling_groups(build(), SHAPE)) == set(result.channels)
    out = model(torch.randn(2, *SHAPE))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
