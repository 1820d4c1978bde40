"""Model sources and safe weight loading, on real torchvision models and real files."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from pipeline.core.errors import ModelError
from pipeline.model.models import build_model, check_input, load_weights, save_safetensors


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_architecture(arch):
    model = build_model(arch, num_classes=10)
    assert not model.training
    assert check_input(model, (3, 32, 32)) == 10


def test_unknown_architecture_names_close_ones_and_custom_form():
    with pytest.raises(ModelError) as exc:
        build_model("resnet19", num_classes=10)
    message = one_line(exc)
    assert "resnet19" in message and "resnet18" in message and "module:function" in message


def write_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_module_function_model_gets_num_classes(tmp_path, monkeypatch):
    write_module(
        tmp_path,
        monkeypatch,
        "my_models",
        """
        from torch import nn

        def build(num_classes=2):
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))

        def fixed():
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))

        def not_a_model():
            return 42
        """,
    )
    assert check_input(build_model("my_models:build", num_classes=7), (3, 8, 8)) == 7
    assert check_input(build_model("my_models:fixed", num_classes=7), (3, 8, 8)) == 4
    with pytest.raises(ModelError) as exc:
        build_model("my_models:not_a_model", num_classes=7)
    assert "returned int" in one_line(exc)
    with pytest.raises(ModelError) as exc:
        build_model("my_models:absent", num_classes=7)
    assert "no attribute 'absent'" in one_line(exc)


def test_module_that_cannot_be_imported():
    with pytest.raises(ModelError) as exc:
        build_model("no_such_module_xyz:build", num_classes=10)
    assert "no_such_module_xyz" in one_line(exc)


def small_net(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, num_classes)
    )


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_safetensors_round_trip(tmp_path):
    source, target = small_net(seed=1), small_net(seed=2)
    save_safetensors(source, tmp_path / "w.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind
    load_weights(target, tmp_path / "w.safetensors")
    assert_same_weights(source, target)


def test_state_dict_and_checkpoint_files(tmp_path):
    source = small_net(seed=1)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    torch.save({"epoch": 3, "state_dict": source.state_dict()}, tmp_path / "ckpt.pth")
    for name in ("plain.pt", "ckpt.pth"):
        target = small_net(seed=2)
        load_weights(target, tmp_path / name)
        assert_same_weights(source, target)


def test_pickled_whole_model_is_refused(tmp_path):
    torch.save(small_net(), tmp_path / "whole.pt")
    with pytest.raises(ModelError) as exc:
        load_weights(small_net(), tmp_path / "whole.pt")
    message = one_line(exc)
    assert "needs pickle" in message and "state_dict" in message and ".safetensors" in message


def test_missing_weights_file(tmp_path):
    with pytest.raises(ModelError) as exc:
        load_weights(small_net(), tmp_path / "absent.safetensors")
    assert "absent.safetensors" in one_line(exc)


def test_weights_for_another_head_name_the_keys(tmp_path):
    torch.save(small_net(num_classes=5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(ModelError) as exc:
        load_weights(small_net(num_classes=3), tmp_path / "five.pt")
    message = one_line(exc)
    assert "shape mismatch" in message and "3.weight" in message


def test_weights_with_missing_and_unexpected_keys(tmp_path):
    state = small_net().state_dict()
    state["extra.weight"] = state.pop("0.weight")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(ModelError) as exc:
        load_weights(small_net(), tmp_path / "renamed.pt")
    message = one_line(exc)
    assert "missing keys: 0.weight" in message and "unexpected keys: extra.weight" in message


def test_not_a_weights_file(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    (tmp_path / "notes.safetensors").write_text("hello")
    for name in ("notes.pt", "notes.safetensors"):
        with pytest.raises(ModelError) as exc:
            load_weights(small_net(), tmp_path / name)
        assert name in one_line(exc)


def test_check_input_rejection_is_one_line():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    model.train()
    with pytest.raises(ModelError) as exc:
        check_input(model, (3, 16, 16))
    message = one_line(exc)
    assert "rejects input shape (3, 16, 16)" in message and "input.shape" in message
    assert model.training  # the caller's mode is restored


def test_check_input_wants_logits():
    with pytest.raises(ModelError) as exc:
        check_input(nn.Conv2d(3, 4, 1), (3, 8, 8))
    assert "(batch, classes)" in one_line(exc)


def test_auxiliary_classifiers_are_left_out(tmp_path):
    """GoogLeNet's training-only classifiers are not built (a training-mode forward would run
    them on pruned features); a checkpoint trained with them still loads."""
    import torchvision

    model = build_model("googlenet", num_classes=10)
    assert model.aux1 is None and model.aux2 is None
    model.train()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)  # plain logits, no aux outputs
    trained = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False)
    assert any(k.startswith("aux1.") for k in trained.state_dict())
    torch.save(trained.state_dict(), tmp_path / "googlenet.pt")
    load_weights(model, tmp_path / "googlenet.pt")
    torch.testing.assert_close(model.fc.weight, trained.fc.weight)
