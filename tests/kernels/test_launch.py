"""The launchers' host arithmetic agrees with Triton's own."""

import triton

from kernels.launch import cdiv, next_power_of_2


def test_next_power_of_2_and_cdiv_match_triton():
    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(0) == 1  # (callers pass max(x, 1))
