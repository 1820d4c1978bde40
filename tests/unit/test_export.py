"""ONNX export and layer -> node mapping on real torchvision models, checked with ONNX Runtime."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch_pruning as tp
import torchvision
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from exporters import export_onnx, layer_node_map, run_onnx
from exporters.onnx_export import module_scope
from pipeline.core.errors import ModelError
from pipeline.core.policy import policy_layers

SHAPE = (3, 32, 32)


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _mobilenet_v2() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25).eval()


BUILDERS = {"resnet18": _resnet18, "mobilenet_v2": _mobilenet_v2}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    """Both models exported once for the module: name -> (model, path)."""
    folder = tmp_path_factory.mktemp("export")
    return {
        name: (model, export_onnx(model, SHAPE, folder / f"{name}.onnx"))
        for name, model in ((n, build()) for n, build in BUILDERS.items())
    }


@pytest.fixture(params=sorted(BUILDERS))
def exported(request, exports) -> tuple[nn.Module, Path]:
    return exports[request.param]


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


def test_export_writes_a_checked_graph_with_a_dynamic_batch(exported):
    _, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (graph_input,) = model.graph.input
    assert graph_input.name == "input"
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == list(SHAPE)
    assert [o.name for o in model.graph.output] == ["logits"]
    assert not list(path.parent.glob(".*.tmp")), "no temporary file may be left behind"


def test_onnx_runtime_matches_torch(exported):
    model, path = exported
    inputs = _inputs(5)
    with torch.no_grad():
        expected = model(torch.from_numpy(inputs)).numpy()
    # batch_size 2 over 5 samples: several runs of the dynamic batch axis, one short.
    got = run_onnx(path, inputs, batch_size=2)
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_layer_node_map_covers_every_conv_and_linear(exported):
    model, path = exported
    layers = policy_layers(model)
    proto = onnx.load(str(path))
    mapping = layer_node_map(proto, layers)
    assert list(mapping) == layers
    assert len(set(mapping.values())) == len(layers), "two layers mapped to one node"
    ops = {n.name: n.op_type for n in proto.graph.node}
    for fqn, node in mapping.items():
        kind = type(model.get_submodule(fqn))
        assert ops[node] == ("Conv" if kind is nn.Conv2d else "Gemm"), (fqn, node)


@pytest.mark.parametrize(
    ("builder", "fqn", "node"),
    [
        ("resnet18", "layer1.0.conv1", "/layer1/layer1.0/conv1/Conv"),
        ("resnet18", "layer2.0.downsample.0", "/layer2/layer2.0/downsample/downsample.0/Conv"),
        ("resnet18", "fc", "/fc/Gemm"),
        ("mobilenet_v2", "features.3.conv.0.0", "/features/features.3/conv/conv.0/conv.0.0/Conv"),
        ("mobilenet_v2", "classifier.1", "/classifier/classifier.1/Gemm"),
    ],
)
def test_layers_map_to_the_nodes_the_exporter_names_after_them(exports, builder, fqn, node):
    _, path = exports[builder]
    proto = onnx.load(str(path))
    assert node in {n.name for n in proto.graph.node}
    assert layer_node_map(proto, [fqn]) == {fqn: node}
    assert module_scope(fqn) == node.rsplit("/", 1)[0]


def test_layer_node_map_names_the_layers_it_cannot_find(exported):
    model, path = exported
    with pytest.raises(ValueError, match=r"layer9\.conv") as info:
        layer_node_map(onnx.load(str(path)), [*policy_layers(model)[:2], "layer9.conv"])
    assert "\n" not in str(info.value)


class _Tokens(nn.Module):
    """A Linear applied to a 3-D tensor: exported as MatMul + Add rather than Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.proj = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # (B, 64, 8)
        return self.proj(tokens).mean(dim=1)  # (B, 10)


def test_linear_on_tokens_maps_to_matmul(tmp_path):
    path = export_onnx(_Tokens().eval(), SHAPE, tmp_path / "tokens.onnx")
    proto = onnx.load(str(path))
    mapping = layer_node_map(proto, ["stem", "proj"])
    ops = {n.name: n.op_type for n in proto.graph.node}
    assert ops[mapping["proj"]] == "MatMul"
    assert ops[mapping["stem"]] == "Conv"


class _Attention(nn.Module):
    """Swin's pattern: the parent calls `F.linear` with its children's weights, so the MatMul
    nodes carry the parent's scope and folded, renamed weights; two biases are equal (zeros),
    so the exporter keeps one value and names the other through an Identity. Swin V2 passes a
    computed copy of the qkv bias (its k part zeroed), which has no name at all."""

    def __init__(self, v2: bool) -> None:
        super().__init__()
        self.v2 = v2
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)
        for bias in (self.proj.bias, self.head.bias):
            nn.init.zeros_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # (B, 64, 8)
        qkv_bias = self.qkv.bias
        if self.v2:
            qkv_bias = qkv_bias.clone()
            qkv_bias[8:16] = 0.0
        q, k, v = F.linear(tokens, self.qkv.weight, qkv_bias).chunk(3, dim=-1)
        mixed = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
        out = F.linear(mixed, self.proj.weight, self.proj.bias)
        return self.head(out.mean(dim=1))


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin-v2"])
def test_linears_a_parent_calls_through_their_weights_map_to_their_own_matmul(tmp_path, v2):
    model = _Attention(v2).eval()
    path = export_onnx(model, SHAPE, tmp_path / "attention.onnx")
    proto = onnx.load(str(path))
    mapping = layer_node_map(proto, ["stem", "qkv", "proj", "head"])
    assert len(set(mapping.values())) == 4
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for fqn in ("qkv", "proj"):
        node = next(n for n in proto.graph.node if n.name == mapping[fqn])
        assert node.op_type == "MatMul" and node.input[1] in weights  # a folded weight
        expected = model.get_submodule(fqn).weight.detach().numpy().T
        np.testing.assert_array_equal(weights[node.input[1]], expected)


class _SelfAttention(nn.Module):
    """ViT's attention: nn.MultiheadAttention without weights, whose fused inference kernel
    (taken in eval mode without gradients) has no ONNX form."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # (B, 64, 8)
        mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(mixed.mean(dim=1))


def test_multi_head_attention_exports_and_its_projection_maps(tmp_path):
    model = _SelfAttention().eval()
    path = export_onnx(model, SHAPE, tmp_path / "mha.onnx")
    assert torch.backends.mha.get_fastpath_enabled(), "the switch is restored after export"
    proto = onnx.load(str(path))
    mapping = layer_node_map(proto, policy_layers(model))
    assert mapping["attention.out_proj"].startswith("/attention/")
    inputs = _inputs(2, seed=3)
    with torch.no_grad():
        expected = model(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(run_onnx(path, inputs), expected, atol=1e-5, rtol=0)


class _Blocks(nn.Module):
    """MaxViT's pattern: blocks in a ModuleList (never called itself, so its scope is missing
    from node names), each block's layers named alike (`conv_a`) in every block, and
    BatchNorm folded into the convolutions, so their weights are renamed."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                OrderedDict(
                    conv_a=nn.Sequential(nn.Conv2d(3 if i == 0 else 4, 4, 3), nn.BatchNorm2d(4)),
                    conv_b=nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                )
            )
            for i in range(2)
        )
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def test_layers_inside_a_module_list_map_to_their_own_block(tmp_path):
    model = _Blocks().eval()
    path = export_onnx(model, SHAPE, tmp_path / "blocks.onnx")
    proto = onnx.load(str(path))
    layers = policy_layers(model)
    mapping = layer_node_map(proto, layers)
    assert mapping["blocks.1.conv_a.0"] == "/blocks.1/conv_a/conv_a.0/Conv"
    assert len(set(mapping.values())) == len(layers) == 5
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for fqn in layers[:-1]:  # each conv's node carries that conv's weight (BatchNorm: identity)
        node = next(n for n in proto.graph.node if n.name == mapping[fqn])
        assert node.input[1] != f"{fqn}.weight", "BatchNorm was folded: the name is gone"
        expected = model.get_submodule(fqn).weight.detach().numpy()
        np.testing.assert_allclose(weights[node.input[1]], expected, rtol=1e-4)


def test_pruned_resnet_exports_with_fewer_channels(tmp_path):
    model = _resnet18()
    example = torch.zeros(1, *SHAPE)
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5, ignored_layers=[model.fc],
    )  # fmt: skip
    pruner.step()
    model.eval()
    path = export_onnx(model, SHAPE, tmp_path / "pruned.onnx")
    proto = onnx.load(str(path))
    mapping = layer_node_map(proto, policy_layers(model))
    weights = {t.name: t.dims for t in proto.graph.initializer}
    conv1 = next(n for n in proto.graph.node if n.name == mapping["layer1.0.conv1"])
    assert weights[conv1.input[1]][0] == model.layer1[0].conv1.out_channels == 32
    inputs = _inputs(3, seed=1)
    with torch.no_grad():
        expected = model(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(run_onnx(path, inputs), expected, atol=1e-4, rtol=0)


def test_export_restores_the_training_flag(tmp_path):
    model = _mobilenet_v2().train()
    export_onnx(model, SHAPE, tmp_path / "m.onnx")
    assert model.training


def test_a_model_that_rejects_the_input_shape_raises_a_one_line_model_error(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(100, 10))  # expects 100 features, gets 3072
    target = tmp_path / "bad.onnx"
    with pytest.raises(ModelError) as info:
        export_onnx(model, SHAPE, target)
    message = str(info.value)
    assert "\n" not in message
    assert "Sequential" in message and "(batch, 3, 32, 32)" in message
    assert list(tmp_path.iterdir()) == [], "a failed export leaves no file, not even a temp one"


def test_opset_below_17_is_refused(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(_Tokens(), SHAPE, tmp_path / "old.onnx", opset=13)
