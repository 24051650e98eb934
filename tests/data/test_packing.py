import numpy as np
import pytest

from jetmoe.data.packing import document_position_ids, index_dtype, pack_documents, pack_stream

EOS = 2


def test_pack_stream_windows_wrap_and_positions():
    # three documents (EOS-terminated) of 3, 5 and 2 tokens; windows of 4 -> 3 windows, last one wrapped
    stream = np.array([5, 6, EOS, 7, 8, 9, 10, EOS, 11, EOS], dtype=np.uint16)
    packed = pack_stream(stream, np.array([3, 5, 2]), seq_len=4, eos_token_id=EOS)

    np.testing.assert_array_equal(packed.input_ids, [[5, 6, EOS, 7], [8, 9, 10, EOS], [11, EOS, 5, 6]])
    # restart at 0 after every EOS and at each window start
    np.testing.assert_array_equal(packed.position_ids, [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1]])
    assert packed.num_tokens == 10 and packed.num_documents == 3
    assert packed.packing_efficiency == pytest.approx(10 / 12)
    assert packed.cut_documents == 1  # only the 5-token document straddles a window boundary
    stats = packed.stats("train")
    assert stats["train_windows"] == 3 and stats["train_mean_document_tokens"] == pytest.approx(10 / 3)


def test_pack_stream_exact_fit_has_full_efficiency():
    stream = np.array([4, EOS, 5, 6, 7, EOS], dtype=np.uint16)
    packed = pack_stream(stream, np.array([2, 4]), seq_len=3, eos_token_id=EOS)
    assert packed.input_ids.shape == (2, 3) and packed.packing_efficiency == 1.0
    np.testing.assert_array_equal(packed.position_ids, [[0, 1, 0], [0, 1, 2]])


def test_pack_stream_rejects_empty_stream():
    with pytest.raises(ValueError, match="nothing to pack"):
        pack_stream(np.zeros(0, np.uint16), np.zeros(0, np.int64), seq_len=4, eos_token_id=EOS)


def test_position_ids_match_a_loop_reference():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, size=(7, 50))  # ~1/6 of tokens are EOS
    expected = np.zeros_like(ids)
    for n in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            expected[n, t] = 0 if ids[n, t - 1] == EOS else expected[n, t - 1] + 1
    np.testing.assert_array_equal(document_position_ids(ids, EOS), expected)


def test_pack_documents_appends_one_eos_per_document(tiny_tokenizer, make_docs):
    docs = make_docs(9, seed=3)
    packed = pack_documents(tiny_tokenizer, docs, seq_len=16, eos_token_id=EOS, vocab_size=400)

    assert packed.input_ids.dtype == np.uint16 and packed.input_ids.shape[1] == 16
    stream = packed.input_ids.reshape(-1)[: packed.num_tokens]
    ends = np.flatnonzero(stream == EOS)
    assert len(ends) == len(docs) == packed.num_documents and ends[-1] == len(stream) - 1
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert [tiny_tokenizer.decode(stream[s:e].tolist()) for s, e in zip(starts, ends)] == docs


def test_index_dtype_boundaries():
    assert index_dtype(65535) == np.uint16
    assert index_dtype(65536) == np.int32
