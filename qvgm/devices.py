"""Which torch device a policy or trainer runs on: one resolver for the CLIs, the policy node and the benches."""

from __future__ import annotations

import torch

DEVICE_CHOICES_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when torch sees a CUDA device, else cpu; "cpu", "cuda", "cuda:N" -> that device.

    Raises ValueError naming the problem for an unknown name, CUDA asked for but not available, or an index
    beyond the visible devices (never a silent fallback: a trainer asked for a GPU must not crawl on the CPU).
    """
    if isinstance(name, torch.device):
        dev = name
    else:
        text = str(name).strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(text)
        except RuntimeError as e:
            raise ValueError(f"unknown device {name!r}: use {DEVICE_CHOICES_HELP}") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"unsupported device {name!r}: use {DEVICE_CHOICES_HELP}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda}); use --device cpu or auto")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev
