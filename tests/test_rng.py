"""cnn_core.rng: the counter-based uniforms behind dropout masks."""
import numpy as np
import pytest

from cnn_core.rng import GOLDEN, mix64, uniform


@pytest.mark.parametrize("dtype,bits", [(np.float32, 24), (np.float64, 53)])
def test_uniform_is_splitmix64_element_by_element(dtype, bits):
    """The vectorized passes against SplitMix64 written out on Python ints."""
    key, counter = 123456789, 7
    start = mix64(mix64(key) ^ mix64(counter + GOLDEN))
    expected = [(mix64(start + (i + 1) * GOLDEN) >> (64 - bits)) * 2.0 ** -bits for i in range(1000)]
    got = uniform(np, key, counter, (10, 100), dtype)
    assert got.dtype == dtype and got.shape == (10, 100)
    np.testing.assert_array_equal(got.reshape(-1), np.array(expected, dtype=dtype))


def test_mix64_reference_values():
    """SplitMix64 seeded with 0 starts 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4 (Vigna's reference code)."""
    assert mix64(GOLDEN) == 0xE220A8397B1DCDAF
    assert mix64(2 * GOLDEN) == 0x6E789E6AA1B965F4


def test_uniform_statistics():
    n = 1_000_000
    u = uniform(np, 2024, 0, (n,), np.float32).astype(np.float64)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    counts = np.bincount((u * 16).astype(int), minlength=16)
    chi2 = ((counts - n / 16) ** 2 / (n / 16)).sum()
    assert chi2 < 60, chi2                                    # 15 degrees of freedom: p < 1e-6 above 60
    lag1 = np.corrcoef(u[:-1], u[1:])[0, 1]
    assert abs(lag1) < 5 / np.sqrt(n), lag1


def test_draws_are_pure_functions_of_key_and_counter_and_differ_otherwise():
    a = uniform(np, 5, 3, (4096,))
    np.testing.assert_array_equal(a, uniform(np, 5, 3, (4096,)))
    for other in (uniform(np, 5, 4, (4096,)), uniform(np, 6, 3, (4096,))):
        assert not np.array_equal(a, other)
        assert abs(np.corrcoef(a, other)[0, 1]) < 5 / np.sqrt(a.size)
    assert np.array_equal(uniform(np, 5, 3, (2, 8)).reshape(-1), uniform(np, 5, 3, (16,)))   # the shape only reshapes


def test_chunks_do_not_change_the_numbers(monkeypatch):
    """On the CPU a draw runs in cache-sized chunks; the numbers are those of one piece."""
    import cnn_core.rng as rng
    whole = uniform(np, 11, 2, (3, 1000), np.float64)
    monkeypatch.setattr(rng, "CPU_CHUNK", 7)                 # 3000 = 428 chunks of 7, then 4
    np.testing.assert_array_equal(uniform(np, 11, 2, (3, 1000), np.float64), whole)
    start = mix64(mix64(11) ^ mix64(2 + GOLDEN))
    for i in (6, 7, 2995, 2999):                              # either side of a chunk's edge, and the last
        assert whole.reshape(-1)[i] == (mix64(start + (i + 1) * GOLDEN) >> 11) * 2.0 ** -53


def test_offset_draws_a_slice_of_the_larger_draw(monkeypatch):
    """What a batch run in chunks relies on: rows lo..hi of a (N, F) draw are the
    draw of shape (hi - lo, F) at offset lo * F, whatever the CPU chunking."""
    import cnn_core.rng as rng
    whole = uniform(np, 13, 4, (10, 300), np.float32)
    monkeypatch.setattr(rng, "CPU_CHUNK", 128)               # chunk edges fall inside the rows
    for lo, hi in ((0, 3), (3, 10), (7, 8), (9, 10)):
        np.testing.assert_array_equal(uniform(np, 13, 4, (hi - lo, 300), np.float32, offset=lo * 300),
                                      whole[lo:hi])
    assert not np.array_equal(uniform(np, 13, 4, (2, 300), np.float32, offset=301), whole[1:3])
