"""Host-side arithmetic the launchers do on every call."""
import contextlib

import torch


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2.
    Triton 3.8 made its own a constexpr function, 4 us a call from host code
    (measured here): a launcher calling it three to five times paid more for
    block sizes than for its strides."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0 < b, as triton.cdiv, which is a constexpr function like
    triton.next_power_of_2 (4.5 us a call; grids call it on every launch)."""
    return -(-a // b)


def on_tensors_device(args):
    """The device of the first tensor among `args` made current where it is another GPU:
    Triton launches on the current device and its stream, whatever the pointers' device
    (tensors on cuda:1 under device_map="auto" ran on cuda:0: an illegal address, or
    unordered reads over peer access). A no-op context otherwise."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is None or device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
