"""One error path for every file the tool reads: missing, a folder, a pipe, a link loop, huge,
binary, malformed or nested too deep, each a typed one-line error (exit 2), never a traceback;
also `--out` where no run directory can go, corrupt manifests and unparsable arguments."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_main import main_in_process
from conftest import TINY_PROFILE

from pipeline.core.config import load_config, resume_config
from pipeline.core.errors import ConfigError, ModelError, PipelineError, PolicyError
from pipeline.core.policy import Policy
from pipeline.core.profile import load_profile
from pipeline.model.models import load_weights

PROFILE_TEXT = json.dumps(TINY_PROFILE)  # JSON is YAML


def bad_file(tmp_path: Path, kind: str) -> Path:
    """A file of the given kind of badness, named profile.yaml."""
    path = tmp_path / "profile.yaml"
    if kind == "missing":
        return path
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link loop":
        os.symlink(path.name, path)
    elif kind == "huge":
        with open(path, "wb") as fh:  # sparse: no disk is written
            fh.truncate((1 << 20) + 1)  # one byte over a profile's 1 MiB
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "nul bytes":
        path.write_bytes(b"name: a\x00b\n")
    elif kind == "malformed":
        path.write_text("name: cpu\nruntime: [onnxruntime-cpu\n")
    elif kind == "deep":
        path.write_text("a: " + "[" * 100_000)
    elif kind == "deep but parsable":
        path.write_text("a: " + "[" * 40 + "]" * 40)
    elif kind == "aliases":  # a billion values from a few lines
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
        path.write_text("\n".join(lines) + "\n")
    elif kind == "huge integer":
        path.write_text("threads: " + "9" * 5000 + "\n")
    elif kind == "not a mapping":
        path.write_text("- just\n- a list\n")
    return path


KINDS = {
    "missing": "not found",
    "folder": "is a folder",
    "fifo": "not a regular file",
    "link loop": "symbolic link loop",
    "huge": "over the 1 MiB",
    "binary": "not UTF-8",
    "nul bytes": "NUL",
    "malformed": "malformed YAML at line 3",
    "deep": "nested",
    "deep but parsable": "nested more than 32 levels",
    "aliases": "more than 1,000,000 values",
    "huge integer": "cannot be read",
    "not a mapping": "expected a mapping",
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_bad_profile_is_a_typed_one_line_error(tmp_path, kind) -> None:
    path = bad_file(tmp_path, kind)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert KINDS[kind] in str(info.value) and len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("kind", ["folder", "fifo", "link loop", "binary", "deep", "aliases"])
def test_bad_files_through_the_cli_exit_2(tmp_path, monkeypatch, kind) -> None:
    path = bad_file(tmp_path, kind)
    monkeypatch.chdir(tmp_path)
    for args in (
        ("validate", "--target", str(path), str(tmp_path)),
        ("run", "--target", "cpu", "--config", str(path)),
    ):
        result = main_in_process(*args)
        assert result.code == 2 and result.one_line_error, (args, result)
        assert "internal error" not in result.err


def test_a_policy_file_goes_through_the_same_loader(tmp_path) -> None:
    for kind, expected in (("binary", "not UTF-8"), ("folder", "is a folder")):
        (tmp_path / kind).mkdir()
        with pytest.raises(PolicyError, match=expected):
            Policy.load(bad_file(tmp_path / kind, kind))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PolicyError, match="nested"):
        Policy.load(deep)
    nan = tmp_path / "nan.json"
    nan.write_text('{"layers": {"fc": {"keep_ratio": NaN}}}')
    with pytest.raises(PolicyError, match="NaN"):
        Policy.load(nan)


def test_weights_that_are_a_folder_or_junk_are_model_errors(tmp_path, tiny_resnet) -> None:
    (tmp_path / "w.pt").mkdir()
    with pytest.raises(ModelError, match="is a folder"):
        load_weights(tiny_resnet, tmp_path / "w.pt")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_weights(tiny_resnet, tmp_path / "junk.safetensors")
    os.symlink("loop.pt", tmp_path / "loop.pt")
    with pytest.raises(ModelError, match="symbolic link loop"):
        load_weights(tiny_resnet, tmp_path / "loop.pt")


@pytest.mark.parametrize("content", [b"\x00\x01junk" * 50, b"", b"not an onnx graph"])
def test_bench_of_a_broken_graph_is_bad_input(tmp_path, monkeypatch, content) -> None:
    (tmp_path / "m.onnx").write_bytes(content)
    (tmp_path / "tiny.yaml").write_text(PROFILE_TEXT)
    monkeypatch.chdir(tmp_path)
    result = main_in_process("bench", "--target", "tiny.yaml", "m.onnx")
    assert result.code == 2 and result.one_line_error, result
    assert "m.onnx" in result.err and "internal error" not in result.err


def test_bench_of_a_folder_that_is_no_run_and_of_a_loop(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.symlink("loop.onnx", tmp_path / "loop.onnx")
    result = main_in_process("bench", "--target", "cpu", "loop.onnx")
    assert result.code == 2 and "symbolic link loop" in result.err, result
    result = main_in_process("bench", "--target", "cpu", str(tmp_path))
    assert result.code == 2 and "original.onnx" in result.err, result


def test_out_that_is_a_file_or_read_only_is_refused_before_any_work(tmp_path) -> None:
    (tmp_path / "taken").write_text("a file")
    for out in (tmp_path / "taken", tmp_path / "taken" / "runs"):
        with pytest.raises(ConfigError, match="is a file, not a folder"):
            _check_out(out)
    if Path("/proc/self").is_dir():  # a file system no one can create folders in
        with pytest.raises(ConfigError, match="not writable"):
            _check_out(Path("/proc/self/runs"))


def _check_out(out: Path) -> None:
    from pipeline.core.artifacts import check_out_dir

    check_out_dir(out)


def test_run_with_out_on_a_file_exits_2_without_a_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file")
    result = main_in_process("run", "--target", "cpu", "--out", "taken", "--no-progress")
    assert result.code == 2 and result.one_line_error and "taken" in result.err, result


def _run_dir(tmp_path: Path, manifest: bytes | str) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    data = manifest.encode() if isinstance(manifest, str) else manifest
    (run / "manifest.json").write_bytes(data)
    return run


GOOD_MANIFEST = {"status": "running", "config": {}, "profile": TINY_PROFILE}


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "not UTF-8"),
        (json.dumps(GOOD_MANIFEST)[:40], "invalid JSON"),
        ("[1, 2, 3]", "not a JSON object"),
        (json.dumps({"status": "running"}), "incomplete or corrupt (config"),
        (json.dumps({**GOOD_MANIFEST, "config": {"seed": "x"}}), "seed"),
        (json.dumps({**GOOD_MANIFEST, "config": []}), "config"),
        ("{}" + " " * 10, "incomplete or corrupt"),
    ],
)
def test_resume_of_a_corrupt_manifest_is_one_line(tmp_path, manifest, expected) -> None:
    run = _run_dir(tmp_path, manifest)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        resume_config(run)
    result = main_in_process("run", "--target", "cpu", "--resume", str(run))
    assert result.code == 2 and result.one_line_error, result
    result = main_in_process("validate", "--target", "cpu", str(run))
    assert result.code == 2 and result.one_line_error, result


def test_a_resumable_manifest_still_resumes(tmp_path) -> None:
    config = resume_config(_run_dir(tmp_path, json.dumps(GOOD_MANIFEST)))
    assert config.seed == 0


@pytest.mark.parametrize(
    "args",
    [
        ("run", "--bogus"),
        ("run", "--target"),
        ("run", "--target", "cpu", "--seed", "abc"),
        ("frobnicate",),
        ("bench", "--target", "cpu"),
        ("device", "serve", "--port", "x"),
    ],
)
def test_argument_errors_are_one_line_not_a_box(args) -> None:
    result = main_in_process(*args)
    assert result.code == 2 and result.one_line_error, result
    assert "╭" not in result.err and "--help" in result.err


def test_help_still_works() -> None:
    result = main_in_process("run", "--help")
    assert result.code == 0 and "--target" in result.out


def test_every_loader_error_is_a_pipeline_error(tmp_path, tiny_resnet) -> None:
    path = bad_file(tmp_path, "binary")
    for load in (
        lambda: load_profile(path),
        lambda: load_config(path, {}),
        lambda: Policy.load(path),
        lambda: load_weights(tiny_resnet, path),
    ):
        with pytest.raises(PipelineError):
            load()
