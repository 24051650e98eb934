import numpy as np

from jetmoe.data.packing import document_position_ids, index_dtype

EOS = 2


def test_position_ids_match_a_loop_reference():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, size=(7, 50))  # ~1/6 of tokens are EOS
    expected = np.zeros_like(ids)
    for n in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            expected[n, t] = 0 if ids[n, t - 1] == EOS else expected[n, t - 1] + 1
    np.testing.assert_array_equal(document_position_ids(ids, EOS), expected)


def test_index_dtype_boundaries():
    assert index_dtype(65535) == np.uint16
    assert index_dtype(65536) == np.int32
