"""Build the SearchSpace of a model: per-layer features, coupling groups, measured latency shares.

The latency share of each layer comes from ONNX Runtime's own node profiler run on the original
graph (so it reflects kernels as they run on this target), not from FLOPs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.policy import head_layer, policy_layers
from pipeline.core.profile import TargetProfile
from pipeline.core.space import LayerInfo, SearchSpace


def _forward_with_hooks(
    model: nn.Module, input_shape: tuple[int, int, int], hooks: dict[nn.Module, Any]
) -> None:
    """One eval forward pass at batch 1 with `hooks` attached, removed afterwards."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()


def layer_costs(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, dict[str, int]]:
    """MACs, params, kernel, stride of every Conv2d/Linear at batch 1 (forward hooks)."""
    costs: dict[str, dict[str, int]] = {}
    hooks = {
        module: _cost_hook(name, costs)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }
    _forward_with_hooks(model, input_shape, hooks)
    return costs


def _cost_hook(name: str, costs: dict[str, dict[str, int]]):
    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        params = sum(p.numel() for p in module.parameters())
        if isinstance(module, nn.Conv2d):
            per_out = module.weight[0].numel()  # (Cin / groups) * kh * kw
            macs = output.numel() * per_out
            kernel, stride = module.kernel_size[0], module.stride[0]
        else:
            macs, kernel, stride = module.in_features * module.out_features, 1, 1
        costs[name] = {"macs": int(macs), "params": int(params), "kernel": kernel, "stride": stride}

    return hook


def coupling_groups(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, str]:
    """{layer -> first layer of its torch-pruning coupling group} (in forward order)."""
    from pipeline.model.prune import ROOTS, dependency_graph, group_layers, unpruned_roots

    order = {n: i for i, n in enumerate(policy_layers(model))}
    head = model.get_submodule(head_layer(model))
    dg = dependency_graph(model, input_shape)
    group_of: dict[str, str] = {}
    for group in dg.get_all_groups(
        ignored_layers=unpruned_roots(model, head), root_module_types=ROOTS
    ):
        members = sorted(group_layers(dg, group), key=lambda n: order.get(n, 1 << 30))
        for name in members:
            group_of.setdefault(name, members[0])
    return group_of


def removable_blocks(model: nn.Module, input_shape: tuple[int, int, int]) -> list[str]:
    """Residual blocks (non-Sequential modules with >= 2 convs) whose output shape equals the
    input shape, so replacing them by identity keeps every shape valid (N2N layer removal)."""
    shapes: dict[str, bool] = {}
    hooks = {
        module: _same_shape_hook(name, shapes)
        for name, module in model.named_modules()
        if name
        and not isinstance(module, nn.Sequential)
        and sum(isinstance(m, nn.Conv2d) for m in module.modules()) >= 2
    }
    _forward_with_hooks(model, input_shape, hooks)
    names = [n for n, same in shapes.items() if same]
    # Keep only outermost blocks: removing a block already removes what is inside it.
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _same_shape_hook(name: str, shapes: dict[str, bool]):
    def hook(_module, inputs, output) -> None:
        x = inputs[0] if inputs else None
        shapes[name] = (
            isinstance(x, torch.Tensor)
            and isinstance(output, torch.Tensor)
            and (x.shape == output.shape)
        )

    return hook


def latency_shares(
    onnx_path: Path, layers: list[str], threads: int, runs: int = 30
) -> dict[str, float]:
    """Share of the measured node time spent in each layer (ORT's profiler, on this target)."""
    events = _profile_events(onnx_path, threads, runs)
    owner = _node_owner(onnx_path, layers)
    names = sorted(owner, key=len, reverse=True)  # longest node name first
    per_layer = dict.fromkeys(layers, 0.0)
    total = 0.0
    for name, dur in events:
        total += dur
        # Fused kernels are named after one of their nodes plus a suffix ("_output_0_nchwc").
        node = next((n for n in names if name.startswith(n)), None)
        if node is not None:
            per_layer[owner[node]] += dur
    return {n: (t / total if total else 0.0) for n, t in per_layer.items()}


def _profile_events(onnx_path: Path, threads: int, runs: int) -> list[tuple[str, float]]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        feed = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    return [
        (ev["name"].removesuffix("_kernel_time"), float(ev.get("dur", 0)))
        for ev in events
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time")
    ]


def _node_owner(onnx_path: Path, layers: list[str]) -> dict[str, str]:
    """{ONNX node name -> layer}: each layer's node, and the elementwise nodes after it that
    ORT fuses into its kernel (BatchNorm, Relu, Clip, Add), found by walking up first inputs."""
    import onnx

    from exporters import layer_node_map

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    node_layer = {v: k for k, v in layer_node_map(onnx.load(str(onnx_path)), layers).items()}
    producer = {out: node for node in graph.node for out in node.output}
    owner = {}
    for node in graph.node:
        current, hops = node, 0
        while current is not None and current.name not in node_layer and hops < 4:
            current = producer.get(current.input[0]) if current.input else None
            hops += 1
        if current is not None and current.name in node_layer:
            owner[node.name] = node_layer[current.name]
    return owner


def build_space(
    model: nn.Module,
    profile: TargetProfile,
    original_onnx: Path,
    *,
    budget_ms: float | None,
    original_accuracy: float,
    original_latency_ms: float,
) -> SearchSpace:
    """The SearchSpace agents see for `model` on `profile`."""
    shape = tuple(profile.input.shape)
    names = policy_layers(model)
    costs = layer_costs(model, shape)
    groups = coupling_groups(model, shape)
    shares = latency_shares(original_onnx, names, profile.threads)
    modules = dict(model.named_modules())
    layers = tuple(
        # a layer in no coupling group (the head, one beside a grouped convolution) keeps its
        # channels; only its precision is searched
        _layer_info(n, modules[n], costs[n], shares.get(n, 0.0), n in groups, groups.get(n, n))
        for n in names
        if n in costs
    )
    return SearchSpace(
        layers=layers,
        precisions=tuple(profile.precisions),
        min_keep=profile.min_keep_ratio,
        budget_ms=budget_ms,
        original_accuracy=original_accuracy,
        original_latency_ms=original_latency_ms,
        original_macs=sum(c["macs"] for c in costs.values()),
        removable_blocks=tuple(removable_blocks(model, shape)),
        gate_drop=profile.max_accuracy_drop,
    )


def _layer_info(name, module, cost, share, prunable, group) -> LayerInfo:
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        kind, cin, cout = (
            ("dwconv" if depthwise else "conv"),
            module.in_channels,
            module.out_channels,
        )
    else:
        kind, cin, cout = "linear", module.in_features, module.out_features
    return LayerInfo(
        name=name,
        kind=kind,
        in_channels=cin,
        out_channels=cout,
        kernel=cost["kernel"],
        stride=cost["stride"],
        macs=cost["macs"],
        params=cost["params"],
        latency_share=share,
        prunable=prunable,
        group=group,
    )
