"""Every module imports on a machine with neither CUDA nor TensorRT, and GPU targets say why
they cannot run here in one line instead of failing on import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.errors import RuntimeNotAvailable
from pipeline.core.profile import InputSpec, TargetProfile, load_profile
from pipeline.measure.runners import check_runtime, get_runner, runner_class

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "exporters", "agents")
# Optional GPU modules that only a runner's activation or an engine build may import.
LAZY = ("tensorrt", "pycuda", "polygraphy")
GPU_RUNTIMES = ("onnxruntime-cuda", "onnxruntime-trt", "tensorrt")

_IMPORT_ALL = """
import importlib, json, pkgutil, sys
failed, names = {}, []
for package in %r:
    root = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.walk_packages(root.__path__, prefix=package + "."):
        names.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed[info.name] = f"{type(exc).__name__}: {exc}"
lazy = [m for m in %r if m in sys.modules]
print(json.dumps({"failed": failed, "names": names, "lazy_imported": lazy}))
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_every_module_imports_without_gpu_packages() -> None:
    result = _run(_IMPORT_ALL % (PACKAGES, LAZY))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["failed"], report["failed"]
    assert not report["lazy_imported"], report["lazy_imported"]
    # The walk really covered the GPU modules, not just the package roots.
    for name in (
        "exporters.tensorrt",
        "exporters.tensorrt_build",
        "pipeline.measure.runners.trt",
        "pipeline.measure.runners.ort_trt",
    ):
        assert name in report["names"]


def test_top_level_packages_import() -> None:
    result = _run("import pipeline, exporters, agents")
    assert result.returncode == 0, result.stderr


def _gpu_usable(runtime: str) -> bool:
    try:
        runner_class(runtime)
    except RuntimeNotAvailable:
        return False
    return True


def test_gpu_trt_profile_is_refused_here_in_one_line(tmp_path: Path) -> None:
    profile = load_profile(ROOT / "profiles" / "gpu-trt.yaml")
    if _gpu_usable(profile.runtime):
        pytest.skip("this machine runs TensorRT: tests/gpu covers it")
    artifact = tmp_path / "model.engine"
    artifact.write_bytes(b"not an engine")
    with pytest.raises(RuntimeNotAvailable) as info:
        get_runner(profile, artifact)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("runtime 'tensorrt' (profile 'gpu-trt') is not available on this machine")
    assert "onnxruntime-cpu" in msg  # the way out


@pytest.mark.parametrize("runtime", GPU_RUNTIMES)
def test_gpu_runtimes_give_a_reason(runtime: str) -> None:
    if _gpu_usable(runtime):
        pytest.skip(f"this machine runs {runtime}: tests/gpu covers it")
    profile = TargetProfile(name="g", runtime=runtime, input=InputSpec(shape=(3, 16, 16)))
    with pytest.raises(RuntimeNotAvailable) as info:
        check_runtime(profile)
    msg = str(info.value)
    assert "\n" not in msg and f"runtime '{runtime}' (profile 'g') is not available" in msg
    reason = msg.split("is not available on this machine: ", 1)[1]
    assert "CUDA" in reason or "pip install .[gpu]" in reason, reason
