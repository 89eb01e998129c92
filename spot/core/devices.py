"""Devices: where tensors live and the dtype models compute in there (bf16 autocast on CUDA)."""
from __future__ import annotations

import torch


def resolve_device(device: str | None = "auto"):
    """'auto' -> cuda if available else cpu; anything else is passed to torch.device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_device(t, device):
    """Tensor `t` on `device`. A copy from the CPU does not block: torch's default `.to` waits after
    every host-to-device copy until the GPU has run all the work queued before it, so the GPU idles
    while the next launches are prepared (`t` must not change in place afterwards)."""
    return t.to(device, non_blocking=t.device.type == "cpu")


AUTOCAST = {"cuda": "bfloat16"}          # device type -> the dtype models compute in there (autocast)


def autocast_dtype(device):
    """The torch dtype `autocast_for(device)` computes in (bf16 on CUDA), None where it is off."""
    name = AUTOCAST.get(torch.device(device).type)
    return None if name is None else getattr(torch, name)


def autocast_for(device):
    """Autocast to `autocast_dtype(device)` (evaluation, the searches, training), a no-op where it is
    None; the tokenizer samples in float32."""
    dtype = autocast_dtype(device)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)
