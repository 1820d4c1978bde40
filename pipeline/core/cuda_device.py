"""Is there a CUDA device here, and which one: the facts GPU runners and engine metadata need.

torch (a core dependency) is asked, so the answer needs neither TensorRT nor onnxruntime-gpu,
and importing this module needs no CUDA at all.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.errors import RuntimeNotAvailable


def no_cuda_reason() -> str | None:
    """Why no CUDA device can be used from this process, or None when device 0 is usable."""
    import torch

    if torch.version.cuda is None:
        return (
            "no CUDA device: this torch build has no CUDA support (install a CUDA build of torch)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False: no GPU or no NVIDIA driver)"
    return None


def device_info(index: int = 0) -> dict[str, Any]:
    """Name and compute capability of a CUDA device, as engine metadata records them.

    Args:
        index: The CUDA device ordinal (after CUDA_VISIBLE_DEVICES), 0 for the default device.

    Returns:
        {"name": e.g. "NVIDIA H100 80GB HBM3", "compute_capability": e.g. "9.0"}.

    Raises:
        RuntimeNotAvailable: No CUDA device is usable here.
    """
    reason = no_cuda_reason()
    if reason is not None:
        raise RuntimeNotAvailable(reason)
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}
