"""Offline data helpers: the stdlib corpus, the number-words translation task and the tokenizer trainers."""

import pytest
from transformers import AutoTokenizer

from hf_gpam.data import (
    english_number_words,
    german_number_words,
    number_translation_pairs,
    stdlib_docstring_corpus,
    train_byte_level_bpe,
    train_marian_sentencepiece,
)


GERMAN_CASES = {
    0: "null",
    1: "eins",
    7: "sieben",
    11: "elf",
    12: "zwölf",
    16: "sechzehn",
    17: "siebzehn",
    21: "einundzwanzig",
    30: "dreißig",
    71: "einundsiebzig",
    99: "neunundneunzig",
    100: "einhundert",
    101: "einhunderteins",
    116: "einhundertsechzehn",
    700: "siebenhundert",
    1000: "eintausend",
    1001: "eintausendeins",
    2020: "zweitausendzwanzig",
    6017: "sechstausendsiebzehn",
    7777: "siebentausendsiebenhundertsiebenundsiebzig",
    9999: "neuntausendneunhundertneunundneunzig",
}
ENGLISH_CASES = {
    0: "zero",
    15: "fifteen",
    21: "twenty-one",
    40: "forty",
    101: "one hundred one",
    1000: "one thousand",
    7777: "seven thousand seven hundred seventy-seven",
}


@pytest.mark.parametrize("number", sorted(GERMAN_CASES), ids=lambda n: f"n{n}")
def test_german_number_words(number):
    assert german_number_words(number) == GERMAN_CASES[number]


@pytest.mark.parametrize("number", sorted(ENGLISH_CASES), ids=lambda n: f"n{n}")
def test_english_number_words(number):
    assert english_number_words(number) == ENGLISH_CASES[number]


def _parse_german(words: str) -> int:
    """An independent German number-word parser (right to left), used to check every number 0-9999."""
    units = {
        "null": 0, "eins": 1, "ein": 1, "zwei": 2, "drei": 3, "vier": 4, "fünf": 5, "sechs": 6, "sieben": 7,
        "acht": 8, "neun": 9, "zehn": 10, "elf": 11, "zwölf": 12, "dreizehn": 13, "vierzehn": 14,
        "fünfzehn": 15, "sechzehn": 16, "siebzehn": 17, "achtzehn": 18, "neunzehn": 19,
    }
    tens = {"zwanzig": 20, "dreißig": 30, "vierzig": 40, "fünfzig": 50, "sechzig": 60, "siebzig": 70,
            "achtzig": 80, "neunzig": 90}

    def below_100(text):
        if text in units:
            return units[text]
        for word, value in tens.items():
            if text == word:
                return value
            if text.endswith("und" + word):
                return value + units[text[: -len("und" + word)]]
        raise AssertionError(f"cannot parse {text!r}")

    total = 0
    for scale_word, scale in (("tausend", 1000), ("hundert", 100)):
        if scale_word in words:
            count, words = words.split(scale_word, 1)
            total += below_100(count) * scale
    return total + (below_100(words) if words else 0)


def test_german_number_words_round_trip_all_numbers():
    for number in range(10000):
        assert _parse_german(german_number_words(number)) == number, number


@pytest.mark.parametrize("bad", [-1, 10000, 3.0])
def test_number_words_reject_out_of_range(bad):
    with pytest.raises(ValueError, match="between 0 and 9999"):
        german_number_words(bad)


def test_number_translation_pairs_layout_and_determinism():
    pairs = number_translation_pairs(200, seed=7)
    assert len(pairs) == 200
    assert pairs == number_translation_pairs(200, seed=7)
    assert pairs != number_translation_pairs(200, seed=8)
    for pair in pairs:
        assert set(pair) == {"translation"} and set(pair["translation"]) == {"en", "de"}
        assert pair["translation"]["en"][0].isupper() and pair["translation"]["de"][0].isupper()
    sentences = {p["translation"]["de"] for p in pairs}
    assert any(s.endswith("gekauft.") for s in sentences), "the verb-final templates should appear"


def test_number_translation_pairs_translate_the_number():
    words_to_number = {english_number_words(n): n for n in range(10000)}
    for pair in number_translation_pairs(300, seed=1, max_number=2500):
        en, de = pair["translation"]["en"], pair["translation"]["de"]
        # the longest English number phrase in the sentence, found independently of the generator's templates
        candidates = [w for w in words_to_number if f" {w} " in f" {en.lower()[:-1]} "]
        number = words_to_number[max(candidates, key=len)]
        assert number <= 2500
        assert f" {german_number_words(number)}" in f" {de.lower()}", (en, de)


def test_stdlib_docstring_corpus_non_empty_and_deterministic():
    corpus = stdlib_docstring_corpus(max_chars=50_000)
    assert sum(map(len, corpus)) >= 50_000
    assert len(corpus) == len(set(corpus)), "paragraphs must be de-duplicated"
    assert all("\n" not in p and ">>>" not in p for p in corpus)
    assert stdlib_docstring_corpus(max_chars=50_000) == corpus
    # a smaller limit is a prefix of the larger one: the order does not depend on the limit
    assert stdlib_docstring_corpus(max_chars=10_000) == corpus[: len(stdlib_docstring_corpus(max_chars=10_000))]
    with pytest.raises(ValueError, match="max_chars"):
        stdlib_docstring_corpus(max_chars=0)


@pytest.mark.parametrize("model_type", ["gpt2", "bart"])
def test_train_byte_level_bpe_round_trips(model_type, tmp_path):
    texts = stdlib_docstring_corpus(max_chars=30_000)
    tokenizer = train_byte_level_bpe(texts, vocab_size=500, model_type=model_type, save_directory=str(tmp_path))
    assert len(tokenizer) == 500
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    sample = texts[3]
    assert reloaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert reloaded.decode(reloaded(sample)["input_ids"], skip_special_tokens=True) == sample
    assert tokenizer.pad_token_id is not None
    with pytest.raises(ValueError, match="model_type"):
        train_byte_level_bpe(texts, vocab_size=500, model_type="t5")


def test_train_marian_sentencepiece_round_trips(tmp_path):
    pairs = [p["translation"] for p in number_translation_pairs(1000, seed=0)]
    texts = [p["en"] for p in pairs] + [p["de"] for p in pairs]
    tokenizer = train_marian_sentencepiece(texts, vocab_size=300, save_directory=str(tmp_path))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(reloaded).__name__ == "MarianTokenizer"
    batch = reloaded(pairs[5]["en"], text_target=pairs[5]["de"])
    assert batch["input_ids"][-1] == reloaded.eos_token_id
    assert reloaded.decode(batch["labels"], skip_special_tokens=True) == pairs[5]["de"]
