"""Generated inputs through the loaders and the CLI: every profile, run config, policy and
manifest, valid, mutated, binary or nested deep, is accepted or refused with a typed error
(exit 2 at the CLI, one line), never an internal error.

Bounded for the unit suite: a fixed number of examples per test, derandomised, so every run
takes the same cases in about the same time. `PIPELINE_FUZZ=deep` takes ten times as many,
drawn afresh each run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_main import main_in_process
from conftest import make_tiny_resnet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.config import load_config, resume_config
from pipeline.core.errors import ConfigError, PolicyError
from pipeline.core.policy import Policy, Precision, check_policy, policy_layers
from pipeline.core.profile import load_profile

settings.register_profile(
    "unit",
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep", settings.get_profile("unit"), max_examples=1000, derandomize=False
)
FUZZ = settings.get_profile(os.environ.get("PIPELINE_FUZZ", "unit"))

# --- values: what a careless hand or a hostile file puts where a number or a name goes ---

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
ANY = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def numbers(low: int, high: int) -> st.SearchStrategy[Any]:
    """Mostly sensible numbers, with the far ends and the wrong types mixed in."""
    return st.one_of(st.integers(low, high), st.floats(low, high), SCALARS)


MEASURE = st.fixed_dictionaries(
    {},
    optional={
        "warmup": numbers(0, 10**6),
        "repeats": numbers(0, 10**8),
        "rounds": numbers(0, 1000),
        "statistic": st.sampled_from(["median", "p90", "mean", "mode"]),
        "max_cv": numbers(-1, 10),
    },
)
INPUT = st.fixed_dictionaries(
    {},
    optional={
        "shape": st.lists(numbers(0, 40_000), min_size=0, max_size=4) | SCALARS,
        "batch": numbers(0, 10**5),
    },
)
DEVICE = st.one_of(
    st.just("local"),
    st.fixed_dictionaries(
        {"url": st.text(max_size=20)},
        optional={"timeout_s": numbers(0, 10**6), "retries": numbers(-1, 1000), "x": ANY},
    ),
    ANY,
)
PROFILE_KEYS = {
    "description": st.text(max_size=20),
    "device": DEVICE,
    "devices": st.lists(DEVICE, max_size=3),
    "precisions": st.lists(st.sampled_from(["int8", "fp16", "fp32", "fp64", ""]), max_size=4),
    "input": INPUT,
    "threads": numbers(-1, 10**6),
    "channel_multiple": numbers(0, 10**5),
    "min_keep_ratio": numbers(-1, 2),
    "budget_ms": numbers(-1, 10**8),
    "max_accuracy_drop": numbers(-1, 2),
    "measure": MEASURE,
    "int8": st.dictionaries(st.sampled_from(["format", "calib_samples", "per_channel"]), ANY),
    "peaks": st.dictionaries(st.sampled_from(["gflops", "bandwidth_gbs"]), numbers(-1, 10**12)),
    "unknown_key": ANY,
}
PROFILES = st.fixed_dictionaries(
    {
        "name": st.text(max_size=20),
        "runtime": st.sampled_from(["onnxruntime-cpu", "tensorrt", "onnxruntime-cuda", "x"]),
    },
    optional=PROFILE_KEYS,
)
SECTION_KEYS = {
    "search": st.fixed_dictionaries(
        {},
        optional={
            "agent": st.text(max_size=8),
            "episodes": numbers(-1, 10**7),
            "timeout_s": numbers(-1, 10**6),
            "parallel": st.dictionaries(st.sampled_from(["workers", "backend", "x"]), ANY),
            "reward": ANY,
        },
    ),
    "finetune": st.fixed_dictionaries(
        {}, optional={"steps": numbers(-1, 10**8), "lr": numbers(-1, 1000), "qat": ANY}
    ),
}
CONFIGS = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.none(), st.sampled_from(["resnet18", "conftest:make_tiny_resnet"])),
        "weights": st.one_of(st.none(), st.text(max_size=10)),
        "random_init": SCALARS,
        "num_classes": numbers(-1, 10**7),
        "seed": numbers(-(2**40), 2**40),
        "budget_ms": numbers(-1, 10**8),
        "opset": numbers(0, 100),
        "x": ANY,
        **SECTION_KEYS,
    },
)
LAYER_NAMES = policy_layers(make_tiny_resnet())
ACTIONS = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "keep_ratio": numbers(-1, 2),
            "precision": st.sampled_from(["int8", "fp16", "fp32", "int4"]),
        },
    ),
    ANY,
)
POLICIES = st.fixed_dictionaries(
    {"layers": st.dictionaries(st.sampled_from(LAYER_NAMES) | st.text(max_size=6), ACTIONS)},
    optional={
        "version": st.one_of(st.just(1), SCALARS),
        "removed": st.lists(st.text(max_size=6) | st.sampled_from(["layer1", "layer2.0"])) | ANY,
        "channel_scores": st.dictionaries(st.sampled_from(LAYER_NAMES), st.lists(SCALARS)) | ANY,
        "extra": ANY,
    },
)
MANIFESTS = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["running", "failed", "complete"]) | SCALARS,
        "stages_done": st.lists(st.text(max_size=6)) | SCALARS,
        "config": CONFIGS | ANY,
        "profile": PROFILES | ANY,
    },
)

# --- files: the documents above as text, then mutated, binary or nested deep ---


def as_yaml(data: Any) -> bytes:
    return yaml.safe_dump(data, allow_unicode=True).encode()


def as_json(data: Any) -> bytes:
    return json.dumps(data).encode()


@st.composite
def mutated(draw: st.DrawFn, documents: st.SearchStrategy[bytes]) -> bytes:
    """A document with a few bytes replaced, inserted or cut."""
    data = bytearray(draw(documents))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 3))
        data[at : at + cut] = draw(st.binary(max_size=3))
    return bytes(data)


NESTED = st.one_of(
    st.integers(1, 5000).map(lambda n: b"a: " + b"[" * n + b"]" * n),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 2000).map(lambda n: b"{a: " * n + b"1" + b"}" * n),
    st.integers(1, 2000).map(lambda n: b'{"layers": ' * n + b"{}" + b"}" * n),
    st.integers(1, 300).map(lambda n: "".join(f"{' ' * i}k{i}:\n" for i in range(n)).encode()),
    st.integers(1, 9).map(
        lambda n: b"\n".join(
            [b"a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
            + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]".encode() for i in range(1, n)]
        )
    ),
)


def files_of(documents: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    text = st.one_of(documents.map(as_yaml), documents.map(as_json))
    return st.one_of(text, mutated(text), st.binary(max_size=600), NESTED)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def write(folder: Path, name: str, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    return path


@FUZZ
@given(content=files_of(PROFILES))
def test_profiles_load_or_are_refused_with_a_config_error(work: Path, content: bytes) -> None:
    path = write(work, "profile.yaml", content)
    try:
        load_profile(path)
    except ConfigError as exc:
        assert len(str(exc).splitlines()) == 1


@FUZZ
@given(content=files_of(CONFIGS))
def test_run_configs_load_or_are_refused_with_a_config_error(work: Path, content: bytes) -> None:
    path = write(work, "pipeline.yaml", content)
    try:
        load_config(path, {})
    except ConfigError as exc:
        assert len(str(exc).splitlines()) == 1


TINY = make_tiny_resnet()


@FUZZ
@given(content=files_of(POLICIES))
def test_policies_load_or_are_refused_with_a_policy_error(work: Path, content: bytes) -> None:
    path = write(work, "policy.json", content)
    try:
        check_policy(Policy.load(path), TINY, [Precision.INT8, Precision.FP32])
    except PolicyError as exc:
        assert len(str(exc).splitlines()) == 1


@FUZZ
@given(content=files_of(MANIFESTS))
def test_manifests_load_or_are_refused_with_a_config_error(work: Path, content: bytes) -> None:
    run = work / "run"
    write(run, "manifest.json", content)
    try:
        resume_config(run)
    except ConfigError as exc:
        assert len(str(exc).splitlines()) == 1


def assert_bad_input_or_ok(result: Any) -> None:
    assert "internal error" not in result.err and "Traceback" not in result.err, result.err
    assert result.code in (0, 2), result
    if result.code == 2:
        assert result.one_line_error, result.err


@FUZZ
@given(profile=files_of(PROFILES), manifest=files_of(MANIFESTS))
def test_the_cli_reads_any_profile_and_manifest_without_an_internal_error(
    work: Path, profile: bytes, manifest: bytes
) -> None:
    target = write(work / "cli", "target.yaml", profile)
    run = work / "cli" / "run"
    write(run, "manifest.json", manifest)
    # `validate` reads the profile, then the manifest; the folder has no models, so a run
    # that gets that far stops with exit 2 before any work
    result = main_in_process("validate", "--target", str(target), str(run))
    assert_bad_input_or_ok(result)
    assert result.code == 2


OPTIONS = {
    "--model": st.sampled_from(["resnet18", "conftest:make_tiny_resnet", "x:y", ""]),
    "--weights": st.text(max_size=6),
    "--num-classes": st.integers(-5, 10**7).map(str),
    "--seed": st.one_of(st.integers(-(2**40), 2**40).map(str), st.text(max_size=4)),
    "--episodes": st.integers(-5, 10**9).map(str),
    "--budget-ms": st.one_of(st.floats().map(str), st.text(max_size=4)),
    "--policy": st.sampled_from(["uniform:0.5", "uniform:7", "p.json"]),
    "--agent": st.sampled_from(["ppo", "dqn", "nosuch"]),
    "--candidate-steps": st.integers(-5, 10**12).map(str),
    "--resume": st.sampled_from(["run", "nowhere", "."]),
    "--random-init": st.just(None),
    "--allow-over-budget": st.just(None),
    "--config": st.sampled_from(["pipeline.yaml", "missing.yaml"]),
}


@FUZZ
@given(
    options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.just(""), max_size=5).flatmap(
        lambda chosen: st.fixed_dictionaries({k: OPTIONS[k] for k in chosen})
    ),
    config=files_of(CONFIGS),
)
def test_run_options_and_configs_never_cause_an_internal_error(
    work: Path, options: dict[str, Any], config: bytes
) -> None:
    folder = work / "args"
    write(folder, "pipeline.yaml", config)
    write(folder, "taken", b"a file where --out wants a folder")
    args = ["run", "--target", "cpu", "--no-progress", "--out", str(folder / "taken")]
    for flag, value in options.items():
        args += [flag] if value is None else [flag, value]
    cwd = Path.cwd()
    os.chdir(folder)  # relative names (run, pipeline.yaml) resolve here
    try:
        result = main_in_process(*args)
    finally:
        os.chdir(cwd)
    assert_bad_input_or_ok(result)
    assert result.code == 2  # every run stops: bad input, or --out is a file
