"""One module per op family: each backend's implementation of the family's ops."""
import functools
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def _triton_version() -> Optional[tuple]:
    try:
        import triton
    except Exception:  # the backend's availability says why
        return None
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


def triton_dot_refuses(dtype: torch.dtype) -> Optional[str]:
    """Why this Triton's tl.dot cannot take `dtype` (float64 before triton 3.5), or None."""
    version = _triton_version()
    if dtype != torch.float64 or version is None or version >= (3, 5):
        return None
    return f"float64: tl.dot takes float64 from triton 3.5 on, this is triton {version[0]}.{version[1]}"
