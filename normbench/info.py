"""What ``normbench info`` reports: versions, devices, the dtypes the norm layers run in on each
device (probed by running one), CPU threads and the measured copy bandwidth."""

from __future__ import annotations

import platform
from typing import Any

import torch

from normbench import __version__
from normbench.axes import DTYPES
from normbench.results import cpu_model


def probe_dtype(device: str, dtype: torch.dtype) -> str | None:
    """None when an L2 and an L1 batch-norm run forward and backward in ``dtype`` on ``device``;
    otherwise the reason they do not."""
    from normbench.nn import LpBatchNorm2d

    try:
        for p in (2, 1):
            x = torch.randn(4, 3, 5, 5, device=device).to(dtype).requires_grad_()
            LpBatchNorm2d(3, p=p).to(device)(x).float().sum().backward()
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return str(exc).splitlines()[0][:120]
    return None


def devices() -> list[str]:
    """The devices torch can use here: ``cpu`` and each ``cuda:i``."""
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def run(measure_bandwidth: bool = True) -> dict[str, Any]:
    """Everything ``normbench info`` prints, as a JSON-ready dict."""
    from normbench.bench.bandwidth import copy_bandwidth

    out: dict[str, Any] = {
        "normbench_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cuda_version": torch.version.cuda,
        "devices": [],
    }
    for dev in devices():
        entry: dict[str, Any] = {"device": dev}
        if dev == "cpu":
            entry["name"] = cpu_model()
            entry["threads"] = torch.get_num_threads()
        else:
            entry["name"] = torch.cuda.get_device_name(dev)
        probes = {name: probe_dtype(dev, dt) for name, dt in DTYPES.items()}
        entry["dtypes"] = [n for n, why in probes.items() if why is None]
        entry["unsupported"] = {n: why for n, why in probes.items() if why is not None}
        entry["copy_gbps"] = copy_bandwidth(dev) if measure_bandwidth else None
        out["devices"].append(entry)
    return out
