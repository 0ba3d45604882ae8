import pytest

from captioner.vocab import SPECIALS, Vocabulary


def test_build_respects_min_count_and_specials():
    vocab = Vocabulary.build(["A dog runs.", "a dog sits", "a cat"], min_count=2)
    assert vocab.tokens == [*SPECIALS, "a", "dog"]
    assert vocab.token_id("cat") == vocab.unk_id


def test_ids_are_deterministic_most_frequent_first():
    captions = ["b a", "a c", "c a b", "d"]
    assert (
        Vocabulary.build(captions, min_count=1).tokens == Vocabulary.build(list(reversed(captions)), min_count=1).tokens
    )
    assert Vocabulary.build(captions, min_count=1).tokens[4] == "a"


def test_encode_decode_round_trip():
    vocab = Vocabulary.build(["A man, in a red shirt, rides a bike."], min_count=1)
    ids = vocab.encode("A man rides a bike!")
    assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id
    assert vocab.decode(ids) == "a man rides a bike"
    assert vocab.decode([vocab.bos_id, vocab.token_id("man"), vocab.eos_id, vocab.token_id("bike")]) == "man"


def test_max_size_and_plain_list_storage():
    vocab = Vocabulary.build(["a b c d e f"], min_count=1, max_size=6)
    assert len(vocab) == 6
    assert Vocabulary(list(vocab.tokens)) == vocab


def test_rejects_bad_token_lists():
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary(["a", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary([*SPECIALS, "a", "a"])
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.build(["a"], min_count=0)
