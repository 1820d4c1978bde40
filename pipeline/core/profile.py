"""TargetProfile: what a target is and how to measure on it. Loaded from profiles/*.yaml."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.errors import ConfigError
from pipeline.core.policy import Precision
from pipeline.core.schema import StrictModel, parse_model, read_yaml

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"

Runtime = Literal["onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt"]


# Runtimes that hand the graph to TensorRT (or CUDA kernels built for its Q/DQ rules).
SYMMETRIC_INT8_RUNTIMES = ("tensorrt", "onnxruntime-cuda", "onnxruntime-trt")

# Upper bounds of the numbers a profile holds. Each lies far beyond what a real target needs;
# without them a typo (threads: 100000) hangs a measurement or exhausts memory.
MAX_THREADS = 1024  # the largest servers have a few hundred hardware threads
MAX_BATCH = 4096
MAX_DIM = 16384  # channels, height or width of the input
MAX_INPUT_ELEMENTS = 1 << 28  # one input batch: 1 GiB of float32
MAX_WARMUP = 100_000
MAX_REPEATS = 10_000_000  # a soak of a fast model; the timings stay under 100 MB
MAX_ROUNDS = 100
MAX_TIMEOUT_S = 86_400.0  # one day
MAX_BUDGET_MS = 3_600_000.0  # one hour per inference

Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]


class InputSpec(StrictModel):
    """The model input as the target sees it: (channels, height, width) and batch size."""

    shape: tuple[Dim, Dim, Dim] = (3, 32, 32)
    batch: int = Field(1, ge=1, le=MAX_BATCH)

    @model_validator(mode="after")
    def _fits_in_memory(self) -> InputSpec:
        elements = self.batch * self.shape[0] * self.shape[1] * self.shape[2]
        if elements > MAX_INPUT_ELEMENTS:
            raise ValueError(
                f"batch x shape is {elements:,} values per input, over the limit of "
                f"{MAX_INPUT_ELEMENTS:,} (1 GiB of float32); lower input.batch or input.shape"
            )
        return self


class MeasureSpec(StrictModel):
    """How latency is measured: warm-up runs, timed runs, the statistic the search uses."""

    warmup: int = Field(10, ge=1, le=MAX_WARMUP)
    repeats: int = Field(50, ge=30, le=MAX_REPEATS)
    statistic: Literal["median", "p90", "mean"] = "median"
    max_cv: float = Field(0.25, gt=0, description="above this the report flags a noisy measure")
    rounds: int = Field(
        3,
        ge=1,
        le=MAX_ROUNDS,
        description="rounds of the final comparisons, and of the original's measurement in "
        "each precision before a search: each round measures every side once, in turn, and "
        "each side's figure is its median over rounds",
    )
    report_batches: list[Annotated[int, Field(ge=1, le=MAX_BATCH)]] = Field(
        default_factory=list,
        max_length=16,
        description="batch sizes at which a run's report also gives the original's and the "
        "deployed model's latency and throughput, measured in one interleaved session",
    )


class Int8Scheme(StrictModel):
    """How INT8 is written into the graph for ONNX Runtime.

    U8 activations with S8 per-channel weights in QDQ form is the fast scheme on x86 CPUs
    without VNNI; S8S8 is what TensorRT requires.
    """

    format: Literal["qdq", "qoperator"] = "qdq"
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calib_samples: int = Field(500, ge=1, le=100_000)


class Tolerance(StrictModel):
    """How far a deployed artifact may stray from the original's logits."""

    atol: float = Field(gt=0)
    rtol: float = Field(gt=0)
    min_top1_agreement: float = Field(ge=0, le=1)
    # Which per-image error atol / rtol judge: the quantile over the images (1.0: the worst).
    # INT8's error has a long tail: over thousands of images the worst one is an outlier of a
    # correct model, and a max criterion fails more models the larger the test set.
    error_quantile: float = Field(1.0, ge=0.5, le=1.0)


class Tolerances(StrictModel):
    """Per-precision tolerances; the loosest precision in a deployed model decides."""

    fp32: Tolerance = Tolerance(atol=1e-3, rtol=1e-3, min_top1_agreement=0.999)
    fp16: Tolerance = Tolerance(atol=5e-2, rtol=5e-2, min_top1_agreement=0.99)
    int8: Tolerance = Tolerance(atol=1.5, rtol=0.5, min_top1_agreement=0.97, error_quantile=0.99)


class RemoteDevice(StrictModel):
    """A device agent reached over HTTP (the agent runs on the target)."""

    url: str = Field(max_length=2048)
    token_env: str = Field("PIPELINE_DEVICE_TOKEN", max_length=256)
    timeout_s: float = Field(300, gt=0, le=MAX_TIMEOUT_S)
    retries: int = Field(3, ge=0, le=100)


class Peaks(StrictModel):
    """The device's peak throughput, used for the physical latency floor (measured if absent)."""

    gflops: float | None = Field(None, gt=0, le=1e9)  # 1 EFLOP/s
    bandwidth_gbs: float | None = Field(None, gt=0, le=1e7)  # 10 PB/s


class TargetProfile(StrictModel):
    """A deployment target: its runtime, device, precisions and measurement settings."""

    name: str = Field(min_length=1, max_length=128)
    description: str = Field("", max_length=4096)
    runtime: Runtime
    device: Literal["local"] | RemoteDevice = "local"
    devices: list[RemoteDevice] = Field(
        default_factory=list,
        max_length=256,
        description="several identical device agents that share a search's measurements "
        "(pipeline.search.parallel); `device` is then the first of them",
    )
    precisions: list[Precision] = Field(default_factory=lambda: [Precision.FP32], max_length=3)
    input: InputSpec = InputSpec()
    threads: int = Field(1, ge=1, le=MAX_THREADS, description="intra-op threads of the runtime")
    channel_multiple: int = Field(8, ge=1, le=1024)
    min_keep_ratio: float = Field(0.1, gt=0, le=1)
    budget_ms: float | None = Field(None, gt=0, le=MAX_BUDGET_MS)
    max_accuracy_drop: float = Field(0.015, ge=0, le=1)
    measure: MeasureSpec = MeasureSpec()
    int8: Int8Scheme = Int8Scheme()
    tolerances: Tolerances = Tolerances()
    peaks: Peaks = Peaks()

    @field_validator("precisions")
    @classmethod
    def _non_empty(cls, value: list[Precision]) -> list[Precision]:
        if not value:
            raise ValueError("list at least one precision (int8, fp16, fp32)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _symmetric_int8_by_default(cls, data: Any) -> Any:
        """GPU runtimes read INT8 as symmetric S8S8 Q/DQ: their profiles default to it."""
        if isinstance(data, dict) and data.get("runtime") in SYMMETRIC_INT8_RUNTIMES:
            int8 = data.get("int8") or {}
            if isinstance(int8, dict):
                data = {**data, "int8": {"activation_type": "int8", **int8}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _first_of_the_devices(cls, data: Any) -> Any:
        """With `devices:`, `device` is the first one: what measures one model at a time (the
        original, the deployed model, validation) needs no change."""
        if isinstance(data, dict) and data.get("devices"):
            first = data["devices"][0]
            given = data.get("device")
            if given is None:
                # A malformed first device is reported where it is written, under `devices`.
                return {**data, "device": first} if _is_device(first) else data
            if _as_dict(given) != _as_dict(first):
                raise ValueError(
                    "give one agent as `device:` or several identical ones as `devices:`; "
                    "with both, `device` must be the first of `devices`"
                )
        return data

    @model_validator(mode="after")
    def _report_batches_fit_in_memory(self) -> TargetProfile:
        largest = max(self.measure.report_batches, default=1)
        shape = self.input.shape
        elements = largest * shape[0] * shape[1] * shape[2]
        if elements > MAX_INPUT_ELEMENTS:
            raise ValueError(
                f"measure.report_batches: batch {largest} x shape is {elements:,} values per "
                f"input, over the limit of {MAX_INPUT_ELEMENTS:,} (1 GiB of float32)"
            )
        return self

    @model_validator(mode="after")
    def _devices_are_distinct(self) -> TargetProfile:
        urls = [d.url.rstrip("/") for d in self.devices]
        twice = sorted({u for u in urls if urls.count(u) > 1})
        if twice:
            raise ValueError(f"devices lists {', '.join(twice)} more than once; list each once")
        return self

    @property
    def fleet(self) -> list[RemoteDevice]:
        """Every device agent that may measure for this profile (none when it runs locally)."""
        if self.devices:
            return list(self.devices)
        return [self.device] if isinstance(self.device, RemoteDevice) else []

    @model_validator(mode="after")
    def _int8_scheme_fits_the_runtime(self) -> TargetProfile:
        scheme = (self.int8.format, self.int8.activation_type, self.int8.weight_type)
        if self.runtime in SYMMETRIC_INT8_RUNTIMES and scheme != ("qdq", "int8", "int8"):
            raise ValueError(
                f"runtime {self.runtime} needs symmetric S8S8 Q/DQ INT8 (TensorRT takes only "
                "int8 Q/DQ with zero point 0); set int8.format: qdq, int8.activation_type: int8, "
                "int8.weight_type: int8"
            )
        return self

    @property
    def default_precision(self) -> Precision:
        """FP32 when allowed (the safe choice), else the first precision listed."""
        return Precision.FP32 if Precision.FP32 in self.precisions else self.precisions[0]

    def tolerance_for(self, precisions: set[Precision]) -> Tolerance:
        """The loosest tolerance among the precisions a deployed model uses."""
        for p in (Precision.INT8, Precision.FP16, Precision.FP32):
            if p in precisions:
                return getattr(self.tolerances, p.value)
        return self.tolerances.fp32


def _is_device(data: Any) -> bool:
    try:
        RemoteDevice.model_validate(data)
    except ValueError:  # pydantic's ValidationError is a ValueError
        return False
    return True


def _as_dict(device: Any) -> Any:
    """A device as plain data, to compare what YAML and a dumped profile give."""
    return device.model_dump() if isinstance(device, RemoteDevice) else device


def resolve_profile_path(spec: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped profile (`cpu`, or `jetson.yaml` when no
    such file is in the working directory: the command the tool is known by works anywhere)."""
    path = Path(spec)
    if os.path.isfile(path):
        return path
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    shipped = PROFILES_DIR / f"{name}.yaml"
    bare = path.parent == Path(".") and path.suffix in ("", ".yaml", ".yml")
    if bare and re.fullmatch(r"[\w.-]+", name) and shipped.is_file():
        return shipped
    if os.path.lexists(path):  # a folder, a pipe or a link loop: the loader says which
        return path
    names = ", ".join(p.stem for p in shipped_profiles())
    raise ConfigError(f"target profile not found: {spec} (give a YAML path or one of: {names})")


def parse_shape(text: str) -> tuple[int, int, int]:
    """'3x224x224' -> (3, 224, 224); anything else is a one-line ConfigError."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input shape {text!r}: give channels x height x width, e.g. 3x224x224")
    return shape  # type: ignore[return-value]


def with_input_shape(profile: TargetProfile, shape: tuple[int, int, int] | None) -> TargetProfile:
    """The profile measuring inputs of `shape` (the model's); the profile's own shape is only
    a default, since one profile per device serves every model. Validated like a loaded one."""
    if shape is None or tuple(shape) == tuple(profile.input.shape):
        return profile
    data = profile.model_dump(mode="json")
    data["input"]["shape"] = list(shape)
    return parse_model(TargetProfile, data, f"{profile.name} with input shape {shape}")


def load_profile(spec: str | Path) -> TargetProfile:
    """Load and validate a target profile; every problem is a one-line ConfigError."""
    path = resolve_profile_path(spec)
    return parse_model(TargetProfile, read_yaml(path, "target profile"), str(path))


def shipped_profiles() -> list[Path]:
    """The profiles shipped with the tool."""
    return sorted(PROFILES_DIR.glob("*.yaml"))
