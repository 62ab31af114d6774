"""Host-side arithmetic the launchers do on every call."""


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
