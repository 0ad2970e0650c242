"""Offline data for tests, examples and the recipes' embedded defaults.

Nothing here is downloaded or committed: the English corpus is read at run time from the docstrings of the
installed Python standard library, the translation task is generated, and tokenizers are trained in seconds on
whatever text you pass.

- ``stdlib_docstring_corpus``: English prose paragraphs for causal language modelling.
- ``number_translation_pairs``: an English -> German task with numbers written out in words. German writes units
  before tens ("twenty-one" -> "einundzwanzig") and moves verbs to the end ("Yesterday I bought ..." ->
  "Gestern habe ich ... gekauft"), so a model has to reorder, not copy word by word.
- ``train_byte_level_bpe``: a GPT-2 or BART tokenizer (byte-level BPE, ``tokenizers``).
- ``train_marian_sentencepiece``: a ``MarianTokenizer`` backed by a freshly trained SentencePiece model.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import random
import re
import sysconfig
import tempfile
from collections.abc import Iterable


# stdlib folders whose docstrings are mostly code, test fixtures or vendored third-party text
_SKIPPED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}
)
# a paragraph counts as prose when at least this share of its characters are letters or spaces
_MIN_PROSE_SHARE = 0.85
_MIN_PARAGRAPH_CHARS = 40


def _stdlib_python_files() -> list[str]:
    """Every ``.py`` file of the installed standard library, in a fixed (sorted, depth-first) order."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirs, files in os.walk(root):
        # sorting in place fixes os.walk's traversal order, which is otherwise filesystem-dependent
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_STDLIB_DIRS and not d.startswith("config-"))
        paths.extend(os.path.join(directory, name) for name in sorted(files) if name.endswith(".py"))
    return paths


def _docstring_paragraphs(path: str) -> Iterable[str]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        source = handle.read()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node)
        if not docstring:
            continue
        for block in re.split(r"\n\s*\n", docstring):
            # doctest examples and indented code blocks are code, not English
            if ">>>" in block or re.search(r"^\s{4,}\S", block, flags=re.MULTILINE):
                continue
            paragraph = " ".join(block.split())
            if len(paragraph) < _MIN_PARAGRAPH_CHARS:
                continue
            prose = sum(ch.isalpha() or ch == " " for ch in paragraph)
            if prose / len(paragraph) >= _MIN_PROSE_SHARE:
                yield paragraph


@functools.lru_cache(maxsize=8)
def _corpus(max_chars: int | None) -> tuple[str, ...]:
    seen: set[str] = set()
    paragraphs: list[str] = []
    total = 0
    for path in _stdlib_python_files():
        for paragraph in _docstring_paragraphs(path):
            if paragraph in seen:
                continue
            seen.add(paragraph)
            paragraphs.append(paragraph)
            total += len(paragraph)
            if max_chars is not None and total >= max_chars:
                return tuple(paragraphs)
    return tuple(paragraphs)


def stdlib_docstring_corpus(max_chars: int | None = None) -> list[str]:
    """English prose paragraphs taken from the docstrings of the installed Python standard library.

    The standard library is parsed with ``ast`` (never imported, so no module side effects), files are visited in
    sorted order, doctest and code blocks are dropped, whitespace is normalised and duplicates are removed, so the
    result is the same on every call with the same Python installation. The full corpus is roughly a megabyte of
    text (a few seconds to gather; cached per ``max_chars``).

    Args:
        max_chars: stop once the paragraphs gathered hold at least this many characters (None: everything).

    Returns:
        A list of paragraphs, each a single line of English text.

    Example:

    ```python
    >>> from hf_gpam.data import stdlib_docstring_corpus
    >>> paragraphs = stdlib_docstring_corpus(max_chars=20_000)
    >>> len(paragraphs) > 50, all("\\n" not in p for p in paragraphs)
    (True, True)
    ```
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"stdlib_docstring_corpus: max_chars must be a positive integer or None, got {max_chars!r}")
    return list(_corpus(max_chars))


_EN_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
# German units as used inside compounds: "ein" (einundzwanzig, einhundert); the standalone form is "eins"
_DE_ONES = (
    "null ein zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn vierzehn fünfzehn sechzehn "
    "siebzehn achtzehn neunzehn"
).split()
_DE_TENS = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()
MAX_NUMBER = 9999


def _check_number(n: int, function: str) -> None:
    if not isinstance(n, int) or not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"{function}: expected an integer between 0 and {MAX_NUMBER}, got {n!r}")


def english_number_words(n: int) -> str:
    """``n`` (0-9999) in English words, American style (no "and"), tens and units joined by a hyphen.

    Example:

    ```python
    >>> from hf_gpam.data import english_number_words
    >>> english_number_words(7777)
    'seven thousand seven hundred seventy-seven'
    ```
    """
    _check_number(n, "english_number_words")
    if n < 20:
        return _EN_ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _EN_TENS[tens] + (f"-{_EN_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_EN_ONES[hundreds]} hundred" + (f" {english_number_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{_EN_ONES[thousands]} thousand" + (f" {english_number_words(rest)}" if rest else "")


def _german_below_100(n: int) -> str:
    if n < 20:
        return _DE_ONES[n]
    tens, ones = divmod(n, 10)
    # units come first: 21 = "ein-und-zwanzig"
    return (f"{_DE_ONES[ones]}und" if ones else "") + _DE_TENS[tens]


def german_number_words(n: int) -> str:
    """``n`` (0-9999) in German words, written as one word: 21 -> "einundzwanzig", 101 -> "einhunderteins".

    Hundreds and thousands are always counted ("einhundert", "eintausend"), and a final 1 is "eins"
    (1001 -> "eintausendeins"), as in the Duden's spelled-out numbers.

    Example:

    ```python
    >>> from hf_gpam.data import german_number_words
    >>> german_number_words(21), german_number_words(101), german_number_words(7777)
    ('einundzwanzig', 'einhunderteins', 'siebentausendsiebenhundertsiebenundsiebzig')
    ```
    """
    _check_number(n, "german_number_words")
    if n == 0:
        return "null"
    thousands, rest = divmod(n, 1000)
    hundreds, below_100 = divmod(rest, 100)
    words = ""
    if thousands:
        words += _DE_ONES[thousands] + "tausend"
    if hundreds:
        words += _DE_ONES[hundreds] + "hundert"
    if below_100:
        words += "eins" if below_100 == 1 else _german_below_100(below_100)
    return words


# (English, German) sentence templates; several put the verb last in German or invert subject and verb
_COUNT_TEMPLATES = (
    ("I have {n} {noun}.", "Ich habe {n} {noun}."),
    ("Yesterday I bought {n} {noun}.", "Gestern habe ich {n} {noun} gekauft."),
    ("We saw {n} {noun} in the garden.", "Wir haben im Garten {n} {noun} gesehen."),
    ("There are {n} {noun} here.", "Hier gibt es {n} {noun}."),
    ("She wants to sell {n} {noun}.", "Sie will {n} {noun} verkaufen."),
    ("Tomorrow he will count {n} {noun}.", "Morgen wird er {n} {noun} zählen."),
    ("They found {n} {noun} last week.", "Letzte Woche haben sie {n} {noun} gefunden."),
)
_NUMBER_TEMPLATES = (
    ("The number is {n}.", "Die Zahl ist {n}."),
    ("The answer is {n}.", "Die Antwort ist {n}."),
    ("He was born in the year {n}.", "Er wurde im Jahr {n} geboren."),
)
_NOUNS = (
    ("apples", "Äpfel"), ("books", "Bücher"), ("cats", "Katzen"), ("dogs", "Hunde"), ("houses", "Häuser"),
    ("trees", "Bäume"), ("cars", "Autos"), ("birds", "Vögel"), ("chairs", "Stühle"), ("letters", "Briefe"),
    ("children", "Kinder"), ("flowers", "Blumen"),
)


def _sample_number(rng: random.Random, max_number: int) -> int:
    # draw the digit count first, so short and long numbers are equally common instead of 90% four-digit ones
    digits = rng.randint(1, len(str(max_number)))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, min(10**digits - 1, max_number))


def number_translation_pairs(n: int, seed: int = 0, max_number: int = MAX_NUMBER) -> list[dict]:
    """A generated English -> German translation task with numbers written out in words.

    Each example is a short sentence from a fixed set of templates, a number drawn uniformly by digit count and
    uniformly within it (0 to ``max_number``) and, for counting templates, a plural noun. The target needs real
    reordering: German number words put units before tens and run together ("seven thousand seven hundred
    seventy-seven" -> "siebentausendsiebenhundertsiebenundsiebzig"), and several templates move the verb to the
    end. Counting templates skip numbers ending in 01, whose attributive German form ("hunderteins Äpfel" vs
    "hundertein Äpfel") is disputed.

    Args:
        n: number of pairs.
        seed: seed of the private random generator (the global ``random`` state is not touched).
        max_number: the largest number used (at most 9999).

    Returns:
        ``[{"translation": {"en": ..., "de": ...}}, ...]``, the layout of WMT-style ``datasets``.

    Example:

    ```python
    >>> from hf_gpam.data import number_translation_pairs
    >>> pair = number_translation_pairs(1, seed=3)[0]["translation"]
    >>> sorted(pair)
    ['de', 'en']
    ```
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"number_translation_pairs: n must be a non-negative integer, got {n!r}")
    _check_number(max_number, "number_translation_pairs(max_number)")
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        number = _sample_number(rng, max_number)
        if rng.random() < 0.75:
            if number < 2 or number % 100 == 1:
                continue
            en_template, de_template = rng.choice(_COUNT_TEMPLATES)
            en_noun, de_noun = rng.choice(_NOUNS)
        else:
            en_template, de_template = rng.choice(_NUMBER_TEMPLATES)
            en_noun = de_noun = ""
        en = en_template.format(n=english_number_words(number), noun=en_noun)
        de = de_template.format(n=german_number_words(number), noun=de_noun)
        # sentences start with a capital letter, also when the number comes first
        pairs.append({"translation": {"en": en[0].upper() + en[1:], "de": de[0].upper() + de[1:]}})
    return pairs


_TOKENIZER_CLASSES = ("gpt2", "bart")


def train_byte_level_bpe(
    texts: Iterable[str], vocab_size: int = 1000, model_type: str = "gpt2", save_directory: str | None = None
):
    """Train a byte-level BPE tokenizer (GPT-2 / BART style) on ``texts`` in seconds and return it.

    The BPE files are written to ``save_directory`` (a temporary folder when None) and loaded with
    ``GPT2Tokenizer`` or ``BartTokenizer``, so the result behaves like the pretrained tokenizers of those models
    and round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``. For GPT-2 the only special
    token is ``<|endoftext|>`` (also used for padding, as GPT-2 has no pad token); for BART the usual ``<s>``,
    ``<pad>``, ``</s>``, ``<unk>``, ``<mask>`` come first (ids 0-4, as in BART's own vocabulary).

    Args:
        texts: training text, one string per document or sentence.
        vocab_size: the size of the vocabulary, special tokens and the 256 byte symbols included.
        model_type: "gpt2" or "bart": which tokenizer class and special tokens to use.
        save_directory: where the tokenizer is saved (``save_pretrained`` layout).

    Example:

    ```python
    >>> from hf_gpam.data import train_byte_level_bpe
    >>> tokenizer = train_byte_level_bpe(["the cat sat on the mat"] * 10, vocab_size=300)
    >>> tokenizer.decode(tokenizer("the cat")["input_ids"])
    'the cat'
    ```
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartTokenizer, GPT2Tokenizer

    if model_type not in _TOKENIZER_CLASSES:
        raise ValueError(f"train_byte_level_bpe: model_type {model_type!r} is not one of {_TOKENIZER_CLASSES}")
    special_tokens = ["<|endoftext|>"] if model_type == "gpt2" else ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    # byte-level BPE needs the 256 byte symbols and the special tokens before any merge
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"train_byte_level_bpe: vocab_size must be at least {256 + len(special_tokens)}")
    save_directory = save_directory or tempfile.mkdtemp(prefix=f"hf_gpam_{model_type}_tokenizer_")
    os.makedirs(save_directory, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2, special_tokens=special_tokens)
    bpe.save_model(save_directory)
    if model_type == "gpt2":
        tokenizer = GPT2Tokenizer.from_pretrained(save_directory, pad_token="<|endoftext|>")
    else:
        tokenizer = BartTokenizer.from_pretrained(save_directory)
    tokenizer.save_pretrained(save_directory)
    return tokenizer


def train_marian_sentencepiece(
    texts: Iterable[str],
    vocab_size: int = 1000,
    save_directory: str | None = None,
    source_lang: str | None = None,
    target_lang: str | None = None,
):
    """Train a SentencePiece (unigram) model on ``texts`` and wrap it in a ``MarianTokenizer``.

    Marian checkpoints ship ``source.spm``, ``target.spm`` and a ``vocab.json`` shared by both sides. Here one
    SentencePiece model is trained on source and target text together and used for both sides, so the shared
    vocabulary is simply its pieces in order: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2. A few seconds for a few
    thousand sentences; the folder reloads offline with ``MarianTokenizer`` or ``AutoTokenizer``.

    Args:
        texts: training text of both languages, one sentence per string.
        vocab_size: the largest number of SentencePiece pieces (special tokens included). A small corpus may
            yield fewer pieces (``len(tokenizer)`` says how many), rather than failing as SentencePiece does by
            default.
        save_directory: where the tokenizer is saved (``save_pretrained`` layout).
        source_lang, target_lang: recorded on the tokenizer, as Marian tokenizers do.

    Example:

    ```python
    >>> from hf_gpam.data import number_translation_pairs, train_marian_sentencepiece
    >>> pairs = [p["translation"] for p in number_translation_pairs(500)]
    >>> tokenizer = train_marian_sentencepiece([p["en"] for p in pairs] + [p["de"] for p in pairs], 200)
    >>> tokenizer.pad_token_id, tokenizer.eos_token_id
    (0, 1)
    ```
    """
    import sentencepiece as spm
    from transformers import MarianTokenizer

    save_directory = save_directory or tempfile.mkdtemp(prefix="hf_gpam_marian_tokenizer_")
    os.makedirs(save_directory, exist_ok=True)
    model_prefix = os.path.join(save_directory, "spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        # keeps training and encoding identical whatever the machine's thread count
        num_threads=1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_file=model_prefix + ".model")
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    with open(os.path.join(save_directory, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    for side in ("source", "target"):
        with open(model_prefix + ".model", "rb") as src, open(os.path.join(save_directory, f"{side}.spm"), "wb") as dst:
            dst.write(src.read())
    os.remove(model_prefix + ".model")
    os.remove(model_prefix + ".vocab")
    tokenizer = MarianTokenizer(
        source_spm=os.path.join(save_directory, "source.spm"),
        target_spm=os.path.join(save_directory, "target.spm"),
        vocab=os.path.join(save_directory, "vocab.json"),
        source_lang=source_lang,
        target_lang=target_lang,
    )
    tokenizer.save_pretrained(save_directory)
    return tokenizer
