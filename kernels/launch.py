"""Host-side arithmetic of the kernel launchers in plain Python. Triton's ``next_power_of_2``
and ``cdiv`` are constexpr functions: called from host code they unwrap their arguments
first, ~4 us a call on the 2-core VM, and a mixed step's attention launchers made eight such
calls a layer (a third of their Python)."""


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
