"""Resolve the configured device and precision to what this machine can do."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from fedrir.algorithms.base import Runtime
from fedrir.config import Config
from fedrir.errors import ConfigError


def cpu_has_native_bf16() -> bool:
    """True on CPUs with BF16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_runtime(config: Config) -> Runtime:
    """Device ``auto`` takes CUDA when present; precision ``auto`` takes bf16 where it is native."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "invalid value for 'device': CUDA is not available here; use --device cpu"
            )
    if config.precision == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        dtype = torch.bfloat16 if native else None
    else:
        dtype = torch.bfloat16 if config.precision == "bf16" else None
    return Runtime(device=device, autocast_dtype=dtype, channels_last=config.channels_last)


def available_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def thread_count(config: Config) -> int:
    """Torch threads for client code: ``threads``, or every available CPU. The same on either
    engine (Flower's workers included, which would otherwise get one), because oneDNN's sums,
    and so the accuracies, depend on the thread count."""
    return config.threads or available_cpus()


@contextlib.contextmanager
def torch_threads(config: Config) -> Iterator[None]:
    """Torch's intra-op thread count set to :func:`thread_count` for a run or a client's step,
    and restored after: a library call does not change the rest of the caller's process."""
    before = torch.get_num_threads()
    torch.set_num_threads(thread_count(config))
    try:
        yield
    finally:
        torch.set_num_threads(before)
