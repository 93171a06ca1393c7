"""The budgets of this machine when none is given; sizes as users type them (``24GiB``) parse with
:func:`grass_ft.config.parse_size`."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import parse_size

GiB = 2**30


def format_size(n: int) -> str:
    """``25769803776`` -> ``24.00GiB`` (parses back with :func:`parse_size`)."""
    return f"{n / GiB:.2f}GiB"


@dataclass(frozen=True)
class Budgets:
    """The two memory budgets a setting must fit, in bytes, and where each figure came from.

    ``device`` bounds weights, gradients, activations and device-resident optimizer state; ``host`` bounds the
    host-resident optimizer state (and the weights while they load, before they move to the device). On a
    CPU-only machine both live in the same RAM: they stay separate so a CPU run rehearses a GPU plan, and when
    neither was given their sum must fit the RAM too (``shared``).
    """

    device: int
    host: int
    device_source: str
    host_source: str
    shared: int | None = None  # CPU-only and both detected: the RAM both must share


def available_ram() -> int:
    """The host's available memory (``MemAvailable`` of /proc/meminfo, else total physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect_budgets(device_memory: str | None, host_memory: str | None, device_type: str | None = None) -> Budgets:
    """Budgets from the keys, each unset one from this machine: the free memory of the GPU it would train on
    (``torch.cuda.mem_get_info``), or the available RAM on a CPU-only machine; the host's available RAM."""
    import torch

    cuda = (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    ram = available_ram()
    if device_memory is not None:
        dev, dev_src = parse_size("device_memory", device_memory), "given"
    elif cuda:
        dev, dev_src = int(torch.cuda.mem_get_info()[0]), f"free on {torch.cuda.get_device_name()}"
    else:
        dev, dev_src = ram, "available RAM (CPU-only machine)"
    if host_memory is not None:
        host, host_src = parse_size("host_memory", host_memory), "given"
    else:
        host, host_src = ram, "available RAM"
    shared = ram if (not cuda and device_memory is None and host_memory is None) else None
    return Budgets(dev, host, dev_src, host_src, shared)
