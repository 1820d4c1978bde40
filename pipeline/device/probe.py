"""What the agent can tell about the device it runs on, probed safely.

Every probe is optional: a missing file, tool or library gives None, never an error, so the agent
runs the same on a Jetson, a GPU server and a CPU-only machine. Nothing here initialises CUDA;
runtime libraries are probed in the job process (`runtime_versions`).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Compute capability of the GPUs of Jetson modules (they have no nvidia-smi to ask).
_JETSON_GPUS = (
    ("orin", ("Ampere GA10B", "8.7")),
    ("xavier", ("Volta GV10B", "7.2")),
    ("tx2", ("Pascal GP10B", "6.2")),
    ("nano", ("Maxwell GM20B", "5.3")),
)
_TOOL_TIMEOUT_S = 5.0


def read_text(path: str | Path) -> str | None:
    """A small sysfs / procfs file, stripped of NULs and whitespace; None when unreadable."""
    try:
        return Path(path).read_bytes().replace(b"\0", b"").decode(errors="replace").strip()
    except OSError:
        return None


def run_tool(*args: str) -> str | None:
    """Stdout of a device tool (nvidia-smi, nvpmodel) if it exists and succeeds, else None."""
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def device_name() -> str:
    """The board or machine name: the device tree's model on Jetsons, else DMI, else the CPU."""
    for path in ("/proc/device-tree/model", "/sys/class/dmi/id/product_name"):
        text = read_text(path)
        if text:
            return text
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, Any] | None:
    """Name, compute capability and driver of the first GPU; None without one."""
    out = run_tool(
        "nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"
    )
    if out:
        fields = [f.strip() for f in out.splitlines()[0].split(",")]
        if len(fields) == 3:
            return {"name": fields[0], "compute_capability": fields[1], "driver": fields[2]}
    model = (read_text("/proc/device-tree/model") or "").lower()
    if "jetson" in model:
        for key, (name, capability) in _JETSON_GPUS:
            if key in model:
                return {"name": name, "compute_capability": capability, "driver": None}
    return None


def jetson_power() -> dict[str, Any] | None:
    """The nvpmodel power mode and the current clocks (MHz) of a Jetson; None elsewhere."""
    out = run_tool("nvpmodel", "-q")
    if out is None:
        return None
    return {**parse_nvpmodel(out), "clocks_mhz": clocks_mhz()}


def parse_nvpmodel(text: str) -> dict[str, str | None]:
    """`nvpmodel -q` output ("NV Power Mode: 15W" then the mode id) -> name and id."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    mode = next((ln.split(":", 1)[1].strip() for ln in lines if "Power Mode" in ln), None)
    mode_id = next((ln for ln in lines if ln.isdigit()), None)
    return {"power_mode": mode, "power_mode_id": mode_id}


def clocks_mhz() -> dict[str, float]:
    """Current clocks of the CPU and of every devfreq unit (GPU, memory), in MHz."""
    clocks: dict[str, float] = {}
    cpu = read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    if cpu and cpu.isdigit():
        clocks["cpu0"] = int(cpu) / 1e3  # kHz
    for unit in sorted(Path("/sys/class/devfreq").glob("*")):
        freq = read_text(unit / "cur_freq")
        if freq and freq.isdigit():
            clocks[unit.name] = int(freq) / 1e6  # Hz
    return clocks


def temperatures_c() -> dict[str, float]:
    """Every thermal zone's temperature in degrees Celsius, by zone type (cpu-thermal, ...)."""
    temps: dict[str, float] = {}
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        kind, milli = read_text(zone / "type"), read_text(zone / "temp")
        if kind and milli and milli.lstrip("-").isdigit():
            temps[kind if kind not in temps else f"{kind}.{zone.name}"] = int(milli) / 1e3
    return temps


def gpu_temperature_c() -> float | None:
    """The first GPU's temperature from nvidia-smi (Jetsons report it as a thermal zone)."""
    out = run_tool("nvidia-smi", "--query-gpu=temperature.gpu", "--format=csv,noheader")
    try:
        return float(out.splitlines()[0]) if out else None
    except ValueError:
        return None


def mem_available_mb() -> float | None:
    """MemAvailable from /proc/meminfo, in MiB; None where there is no procfs."""
    for line in (read_text("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return None


def health() -> dict[str, Any]:
    """A snapshot taken before and after every job: load, free memory, temperatures."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "time": time.time(),
        "load_avg": load,
        "mem_available_mb": mem_available_mb(),
        "temperatures_c": temperatures_c(),
        "gpu_temperature_c": gpu_temperature_c(),
    }


def system_info() -> dict[str, Any]:
    """What the device is: names, OS, Python, GPU, Jetson power mode (no runtime imports)."""
    return {
        "device": device_name(),
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "gpu": gpu_info(),
        "jetson": jetson_power(),
    }


def runtime_versions() -> dict[str, Any]:
    """Versions of the inference runtimes importable here (None when absent).

    Imports onnxruntime and TensorRT, so the agent calls it in its job process only.
    """
    found: dict[str, Any] = {"pipeline": _dist_version("pipeline")}
    try:
        import onnxruntime as ort

        found["onnxruntime"] = ort.__version__
        found["onnxruntime_providers"] = list(ort.get_available_providers())
    except Exception:  # a broken install is as good as none here
        found["onnxruntime"] = None
    try:
        import tensorrt

        found["tensorrt"] = str(tensorrt.__version__)
    except Exception:
        found["tensorrt"] = None
    return found


def usable_runtimes() -> dict[str, str | None]:
    """Each pipeline runtime name -> None when its runner works here, else why not."""
    from pipeline.core.errors import RuntimeNotAvailable
    from pipeline.measure.runners.registry import available_runtimes, runner_class

    usable: dict[str, str | None] = {}
    for runtime in available_runtimes():
        try:
            runner_class(runtime, "agent")
            usable[runtime] = None
        except RuntimeNotAvailable as exc:
            # Keep the reason only: the registry's wording around it speaks of the host.
            text = str(exc).strip().splitlines()[0]
            usable[runtime] = text.split("on this machine: ", 1)[-1].split("; use a profile")[0]
        except Exception as exc:  # a runner module that fails to import for another reason
            usable[runtime] = f"{type(exc).__name__}: {exc}"
    return usable


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
