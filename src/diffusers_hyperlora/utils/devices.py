"""The one device and dtype policy of the front ends (command line, demo): which devices, and in which dtype;
and the one check of the port the demo serves on (`check_port`).

`check_device_name` needs no torch (the command line answers a wrong `--device` at once); `device_and_dtype`
checks the name, then that this machine has the device, and picks the dtype: float16 on CUDA, float32 elsewhere,
unless one is given. Both raise `InvalidArgumentError(argument="device")`; `label` is how the caller names the
setting (`"device"` for a Python argument, `"--device"` for the flag).

Example:
    >>> device_and_dtype("cpu")
    (device(type='cpu'), torch.float32)
    >>> device_and_dtype("cpu", "bf16")
    (device(type='cpu'), torch.bfloat16)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError

if TYPE_CHECKING:  # torch is imported only when a device is resolved
    import torch

DEVICE_NAME = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
DEVICE_NAMES = "cpu, cuda, cuda:N (e.g. cuda:1) or mps"
MAX_PORT = 65535


def _spelled(label: str, value: str) -> str:
    """`--device cpu` for a flag, `device='cpu'` for a Python argument."""
    return f"{label} {value}" if label.startswith("-") else f"{label}={value!r}"


def check_device_name(name: Any, label: str = "device") -> None:
    """Refuse a device name HyperLoRA does not run on (`None`, the default device, passes); imports no torch."""
    if name is None or DEVICE_NAME.match(str(name)):
        return
    raise InvalidArgumentError(
        f"{label} {str(name)!r} is not a device HyperLoRA runs on; use {DEVICE_NAMES}, or leave it out (cuda when "
        "available, else cpu).",
        argument="device",
    )


def _unavailable(label: str, name: str, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{label} {name!r}: {why}. Use {_spelled(label, 'cpu')}, or leave it out (cuda when available, else cpu).",
        argument="device",
    )


def _check_available(device: torch.device, name: str, label: str) -> None:
    import torch

    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _unavailable(
                label, name, f"this torch installation sees no CUDA GPU (torch {torch.__version__}; install its "
                "CUDA build for a GPU)"
            )  # fmt: skip
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise _unavailable(label, name, f"this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise _unavailable(label, name, f"this torch installation sees no Apple GPU (MPS) (torch {torch.__version__})")


def device_and_dtype(
    device: str | torch.device | None = None, dtype: torch.dtype | str | None = None, *, label: str = "device"
) -> tuple[torch.device, torch.dtype]:
    """The device to run on and its dtype, each checked before anything is loaded.

    Args:
        device: cpu, cuda, cuda:N or mps (a name or a `torch.device`); `None`: cuda when there is a GPU, else cpu.
        dtype: the dtype to run in (a torch dtype or a name: "fp16", "bf16", ...); `None`: float16 on CUDA,
            float32 elsewhere.
        label: how the caller's users name the setting, used in the error message (`"--device"` for a flag).
    """
    import torch

    from .checks import parse_dtype

    dtype = parse_dtype(dtype)  # checked first, like the device: before anything is loaded
    if device is None:
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        name = str(device)
        check_device_name(name, label)
        try:
            chosen = torch.device(name)
        except RuntimeError as error:  # e.g. an index beyond what torch counts
            raise _unavailable(label, name, f"torch {torch.__version__} refuses it ({error})") from error
        _check_available(chosen, name, label)
    if dtype is None:
        dtype = torch.float16 if chosen.type == "cuda" else torch.float32
    return chosen, dtype


def check_port(port: Any, label: str = "Port") -> int:
    """`port` if it is a port number (a whole number from 1 to 65535), else `InvalidArgumentError(argument="port")`;
    imports no torch. `label` names the setting (`"--port"` for the flag)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= MAX_PORT:
        raise InvalidArgumentError(
            f"{label} must be a whole number from 1 to {MAX_PORT} (e.g. 7860), got {port!r}.", argument="port"
        )
    return port


def parse_device(device: Any, label: str = "device") -> torch.device:
    """`device` (a `torch.device` or a name torch reads: "cpu", "cuda:1", ...) as a `torch.device` this machine has,
    else `InvalidArgumentError(argument="device")`: the library's methods that take a device check it here, before
    anything moves."""
    import torch

    try:
        chosen = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InvalidArgumentError(
            f"{label} must be a torch device or a name like 'cpu' or 'cuda:0', got {device!r}.", argument="device"
        ) from error
    _check_available(chosen, str(device), label)
    return chosen
