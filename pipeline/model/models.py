"""Model sources: a torchvision architecture by name or a user's `module:function`, and weights.

Weights load only from formats that cannot run code: `.safetensors`, or a state_dict read with
`torch.load(weights_only=True)`. A file that needs pickle is refused with a message saying how to
re-save it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.artifacts import atomic_write_with
from pipeline.core.errors import ModelError, PipelineError
from pipeline.core.files import WEIGHTS_MAX_BYTES, check_file

# "package.module:function" or "package.module:Class.factory"
_CALLABLE_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
# Buffers that do not change inference; old checkpoints often lack them
_OPTIONAL_KEYS = ("num_batches_tracked",)
# Training-only auxiliary classifiers: not on the inference graph, so pruning never sees them,
# yet a training-mode forward would run them on pruned features. Built without them; their
# weights in a checkpoint are left out.
_AUX_ARCHS = ("googlenet", "inception_v3")
_AUX_HEADS = {"GoogLeNet": ("aux1", "aux2"), "Inception3": ("AuxLogits",)}
_SHOWN_KEYS = 3


def is_callable_spec(spec: str) -> bool:
    """Whether `spec` has the form `module:function`."""
    return bool(_CALLABLE_SPEC.fullmatch(spec))


def import_callable(spec: str, error: type[PipelineError] = ModelError) -> Callable[..., Any]:
    """Import `module:function` and return the callable it names.

    Args:
        spec: `package.module:function`; the function part may be dotted (`module:Class.build`).
        error: the typed error to raise, so model and data sources report their own kind.

    Raises:
        error: one line naming the spec when the module cannot be imported, the attribute is
            missing, or it is not callable.
    """
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise error(
            f"cannot import '{module_name}' for '{spec}': {exc}; put its folder on PYTHONPATH "
            "or pip install it"
        ) from exc
    except Exception as exc:  # user code: any failure while importing is reported as one line
        detail = _one_line(exc, with_type=True)
        raise error(f"importing '{module_name}' for '{spec}' failed: {detail}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise error(f"'{spec}': '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"'{spec}' is a {type(obj).__name__}, not a function")
    return obj


def accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether `fn` can be called with keyword argument `name` (explicitly or via **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(
        (p.name == name and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD for p in params
    )


def build_model(spec: str, num_classes: int) -> nn.Module:
    """Build an untrained classification model.

    Args:
        spec: a torchvision classification architecture (`resnet18`, `mobilenet_v2`, ...) or
            `module:function` returning an `nn.Module`; the function gets `num_classes=` when its
            signature accepts it.
        num_classes: number of output classes.

    Returns:
        The model in eval mode, on CPU.

    Raises:
        ModelError: unknown architecture (with close names), import failure, or a function that
            does not return an `nn.Module`.
    """
    if ":" in spec:
        model = _build_from_callable(spec, num_classes)
    else:
        model = _build_torchvision(spec, num_classes)
    return model.eval()


def _build_torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name.lower() not in known:
        raise ModelError(_unknown_arch_message(name, known))
    # init_weights: torchvision's own initialisation, without its warning about a future default
    extra = {"aux_logits": False, "init_weights": True} if name.lower() in _AUX_ARCHS else {}
    try:
        return torchvision.models.get_model(
            name.lower(), weights=None, num_classes=num_classes, **extra
        )
    except Exception as exc:  # e.g. an architecture that rejects the class count
        raise ModelError(f"building torchvision '{name}' failed: {_one_line(exc)}") from exc


def _unknown_arch_message(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), known, n=4, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else f"e.g. {', '.join(sorted(known)[:4])}"
    return (
        f"unknown architecture '{name}' (not a torchvision classification model; {hint}); "
        "for a custom model use module:function, e.g. mypkg.models:build"
    )


def _build_from_callable(spec: str, num_classes: int) -> nn.Module:
    if not is_callable_spec(spec):
        raise ModelError(
            f"model '{spec}' is neither a torchvision architecture nor module:function"
        )
    fn = import_callable(spec, ModelError)
    kwargs = {"num_classes": num_classes} if accepts_keyword(fn, "num_classes") else {}
    try:
        model = fn(**kwargs)
    except Exception as exc:  # user code: surface its failure as one line
        raise ModelError(f"'{spec}' raised {_one_line(exc, with_type=True)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"'{spec}' returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state_dict into `model` in place, refusing formats that can run code.

    Args:
        model: the model whose architecture the weights were trained for.
        path: `.safetensors`, or a `torch.save`d state_dict (also a checkpoint dict holding one
            under "state_dict" or "model").

    Raises:
        ModelError: missing file, a file that needs pickle, an unreadable file, or keys and
            shapes that do not match the model.
    """
    path = check_file(path, "weights", ModelError, WEIGHTS_MAX_BYTES)
    state = _drop_aux_heads(_strip_prefix(_read_state_dict(path), model), model)
    _check_matches(model, state, path)
    model.load_state_dict(state, strict=False)  # strictness checked above, with a better message


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # SafetensorError and friends: a corrupt or foreign file
            detail = _one_line(exc, with_type=True)
            raise ModelError(f"{path} is not a readable safetensors file: {detail}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: it needs pickle
        raise ModelError(
            f"{path} needs pickle to load, which can run arbitrary code; re-save it as a "
            "state_dict (torch.save(model.state_dict(), ...)) or as .safetensors"
        ) from exc
    except Exception as exc:  # truncated zip, not a torch file at all, ...
        raise ModelError(
            f"cannot read {path} as PyTorch weights: {_one_line(exc, with_type=True)}"
        ) from exc
    return _unwrap_state_dict(obj, path)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _unwrap_state_dict(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):  # common training-checkpoint layouts
            if _is_state_dict(obj.get(key)):
                return obj[key]
        if _is_state_dict(obj):
            return obj
        keys = ", ".join(map(str, list(obj)[:5]))
        raise ModelError(
            f"{path} holds a dict ({keys}) that is not a state_dict of name -> tensor; save "
            "model.state_dict() or a dict with it under 'state_dict'"
        )
    raise ModelError(f"{path} holds a {type(obj).__name__}, expected a state_dict")


def _strip_prefix(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Drop the 'module.' prefix DataParallel/DDP checkpoints carry when the model lacks it."""
    prefix = "module."
    own = model.state_dict()
    if state and all(k.startswith(prefix) for k in state) and not any(k in own for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _drop_aux_heads(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint without the training-only auxiliary classifiers the model was built
    without (GoogLeNet's aux1/aux2, Inception v3's AuxLogits)."""
    heads = _AUX_HEADS.get(type(model).__name__, ())
    absent = {h for h in heads if getattr(model, h, None) is None}
    return {k: v for k, v in state.items() if k.split(".", 1)[0] not in absent}


def _check_matches(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_OPTIONAL_KEYS)]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} in file vs {tuple(own[k].shape)} in model"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = [
        f"{label}: {_first_few(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", mismatched),
        )
        if keys
    ]
    if problems:
        raise ModelError(
            f"{path} does not fit the model ({'; '.join(problems)}); check the architecture "
            "and number of classes the weights were trained with"
        )


def _first_few(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN_KEYS])
    rest = len(items) - _SHOWN_KEYS
    return f"{shown} (+{rest} more)" if rest > 0 else shown


def check_input(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Run the model once on zeros of `input_shape` and return its number of output classes.

    Args:
        model: a classification model returning logits (batch, classes).
        input_shape: (C, H, W) of one sample.

    Returns:
        The size of the output's last dimension.

    Raises:
        ModelError: the forward pass fails, or the output is not a (batch, classes) tensor.
    """
    shape = tuple(int(d) for d in input_shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *shape)))  # batch 2: batch-norm and squeeze bugs show
    except Exception as exc:  # any failure here means the shape does not suit the model
        raise ModelError(
            f"the model rejects input shape {shape}: {_one_line(exc)}; set the profile's "
            "input.shape to what the model expects"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"the model's output is {got} for a batch of 2 at {shape}; expected logits "
            "(batch, classes)"
        )
    return int(out.shape[-1])


def save_safetensors(model: nn.Module, path: Path) -> None:
    """Write the model's state_dict to `path` as safetensors, atomically.

    Tensors are copied to contiguous CPU storage: safetensors refuses views and tensors that
    share memory (tied weights).
    """
    from safetensors.torch import save_file

    state = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }
    atomic_write_with(Path(path), lambda tmp: save_file(state, str(tmp)))


def _one_line(exc: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message (its type's name when it has no text)."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0].strip()}" if with_type else lines[0].strip()
