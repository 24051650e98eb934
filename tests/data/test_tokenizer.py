import pytest

from jetmoe.data.tokenizer import BOS, EOS, PAD, SpecialTokens, load_tokenizer, train_tokenizer

CODE = 'def f(x):\n\tif x:\r\n        return  "<s> é </s>"\n\n\n    # trailing   \n'


@pytest.mark.parametrize("special", [SpecialTokens(0, 1, 2), SpecialTokens(2, 0, 1)])
def test_special_tokens_land_at_the_given_ids(special, make_docs):
    tokenizer = train_tokenizer(make_docs(20), vocab_size=300, special=special)
    assert tokenizer.token_to_id(PAD) == special.pad_token_id
    assert tokenizer.token_to_id(BOS) == special.bos_token_id
    assert tokenizer.token_to_id(EOS) == special.eos_token_id
    assert tokenizer.get_vocab_size() <= 300


def test_special_ids_outside_0_1_2_are_rejected(make_docs):
    with pytest.raises(ValueError, match="must be 0, 1, 2"):
        train_tokenizer(make_docs(5), vocab_size=300, special=SpecialTokens(0, 1, 5))


def test_vocab_smaller_than_the_byte_alphabet_is_rejected(make_docs):
    with pytest.raises(ValueError, match="model.vocab_size must be >= 259"):
        train_tokenizer(make_docs(5), vocab_size=200, special=SpecialTokens())


def test_round_trip_of_code_keeps_whitespace_and_treats_special_strings_as_text(tiny_tokenizer):
    ids = tiny_tokenizer.encode(CODE).ids
    assert tiny_tokenizer.decode(ids) == CODE
    assert not {0, 1, 2} & set(ids)  # "<s>" / "</s>" in the text are not special tokens


def test_saved_tokenizer_reloads_identically(tiny_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tiny_tokenizer.save(str(path))
    loaded = load_tokenizer(path, vocab_size=400, special=SpecialTokens())
    assert loaded.encode(CODE).ids == tiny_tokenizer.encode(CODE).ids


def test_loading_an_oversized_tokenizer_names_the_file(tiny_tokenizer, tmp_path):
    path = tmp_path / "big.json"
    tiny_tokenizer.save(str(path))
    size = tiny_tokenizer.get_vocab_size()
    with pytest.raises(ValueError, match=rf"big.json: tokenizer vocab {size} > model.vocab_size 300"):
        load_tokenizer(path, vocab_size=300, special=SpecialTokens())


def test_loading_requires_eos_to_be_a_special_token(tiny_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tiny_tokenizer.save(str(path))
    with pytest.raises(ValueError, match="eos_token_id 7 is not a special token"):
        load_tokenizer(path, vocab_size=400, special=SpecialTokens(eos_token_id=7))


def test_loading_a_missing_or_invalid_file(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        load_tokenizer(tmp_path / "nope.json", vocab_size=400, special=SpecialTokens())
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a valid tokenizer.json"):
        load_tokenizer(bad, vocab_size=400, special=SpecialTokens())
