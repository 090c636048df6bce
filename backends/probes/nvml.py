"""GPU memory of this machine's GPUs through NVML (`nvidia-ml-py`, imported as `pynvml`).

Optional: pynvml is imported only when a probe is opened, and `NvmlProbe.open` raises
`NvmlUnavailable` where it is not installed, NVML does not load, or there is no GPU; the
service then runs without it. It is not a project dependency (most gateways do not share a
machine with their GPUs); install `nvidia-ml-py` where one does.

Its only signal is the fullest GPU's memory fraction. vLLM and TGI preallocate most of GPU
memory, so for them it reads "nearly full" at any load: use it for servers that allocate as
they go, or GPUs shared with other work, and prefer the server's own KV-cache metric.
NVML calls block (briefly), so they run in a worker thread.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import trio

from backends.probes.metrics import ModelProbe, ScrapeError
from scheduler.errors import SchedulerError
from scheduler.models.pressure import Scrape
from scheduler.models.pressure_config import ProbeConfig


class NvmlUnavailable(SchedulerError):
    """NVML cannot be used here: no nvidia-ml-py, no driver, or no GPU."""


class NvmlProbe(ModelProbe):
    """Reads used / total memory of local GPUs; open it with `NvmlProbe.open()`."""

    def __init__(self, nvml: Any, handles: Sequence[Any], config: ProbeConfig, name: str) -> None:
        super().__init__(name, config.pressure, config.interval_s)
        self._nvml = nvml
        self._handles = list(handles)

    @classmethod
    def open(
        cls,
        config: ProbeConfig | None = None,
        *,
        name: str = "nvml",
        device_indices: Sequence[int] | None = None,
        nvml: Any = None,
    ) -> NvmlProbe:
        """Load NVML (or use `nvml`, a module with pynvml's interface) and find the GPUs."""
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                raise NvmlUnavailable("nvidia-ml-py (pynvml) is not installed") from exc
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            indices = range(count) if device_indices is None else device_indices
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        except nvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML: {exc}") from exc
        if not handles:
            nvml.nvmlShutdown()
            raise NvmlUnavailable("NVML found no GPU")
        return cls(nvml, handles, config or ProbeConfig(), name)

    def close(self) -> None:
        self._nvml.nvmlShutdown()

    def _read_memory(self) -> float | None:
        fractions = []
        for handle in self._handles:
            info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            if info.total > 0:
                fractions.append(min(1.0, max(0.0, info.used / info.total)))
        return max(fractions, default=None)

    async def _scrape(self, now: float) -> Scrape:
        try:
            memory = await trio.to_thread.run_sync(self._read_memory)
        except self._nvml.NVMLError as exc:
            raise ScrapeError(f"NVML: {exc}") from exc
        return Scrape(at=now, gpu_memory=memory)
