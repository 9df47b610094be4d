"""English for the scenes' captions: stamp descriptions cleaned into noun phrases, and plurals."""

from __future__ import annotations

import itertools
import re

_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_PHRASE_END = re.compile(r"[(\u2014\u2013:;]| - ")
# Words that start a clause, a prepositional phrase or a second noun phrase after the head noun:
# "A candy cane is ...", "A walnut in its shell", "A hoverfly resembles a honeybee drone".
_CLAUSE_WORDS = frozenset({"is", "are", "was", "lets", "resembles", "carries", "means", "like", "in", "with",
                           "from", "at", "inside", "on", "for", "to", "that", "which", "who", "also",
                           "called", "making", "a", "an", "the"})
_PHRASE = re.compile(r"[a-z][a-z0-9'-]*(?: [a-z0-9'-]+)*")
MAX_PHRASE_WORDS = 5
_SIZE_WORDS = frozenset({"small", "large", "little", "big", "tiny", "huge", "giant", "mini"})
_INVARIANT_PLURALS = ("sheep", "deer", "fish", "bison", "moose", "shrimp", "trout", "swine", "aircraft",
                      "species", "series", "cattle", "salmon", "elk")
_IRREGULAR_PLURALS = {"mouse": "mice", "louse": "lice", "goose": "geese", "tooth": "teeth", "foot": "feet",
                      "man": "men", "woman": "women", "child": "children", "ox": "oxen", "knife": "knives",
                      "leaf": "leaves", "wolf": "wolves", "calf": "calves", "half": "halves", "loaf": "loaves",
                      "shelf": "shelves", "potato": "potatoes", "tomato": "tomatoes", "mango": "mangoes",
                      "buffalo": "buffaloes", "cactus": "cacti"}
# Compound words ending in these ("butterflyfish", "woodlouse") inflect like them.
_PLURAL_SUFFIXES = ("fish", "sheep", "deer", "mouse", "louse", "goose")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


def clean_description(line: str) -> tuple[str, str] | None:
    """``(article, noun phrase)`` of a stamp description's first line, or None if it is not one.

    "A ripe, red tomato!" -> ("a", "ripe red tomato"); "A peacock (a male peafowl)." -> ("a",
    "peacock"); "A candy cane is a traditional ..." -> ("a", "candy cane"). Descriptions that do not
    start with "A"/"An" (names, plurals, "The Sun.", "Eat your broccoli!") give None, as do phrases
    longer than ``MAX_PHRASE_WORDS`` words or with characters other than letters, digits, ``'``, ``-``.
    """
    text = line.strip().replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"[\"\u201c\u201d]", "", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", "", text)  # quotes around a word, not apostrophes
    text = _SENTENCE_END.split(text, maxsplit=1)[0]
    text = _PHRASE_END.split(text, maxsplit=1)[0]
    text = _join_adjective_commas(text).lower()
    words = text.split()
    if len(words) < 2 or words[0] not in ("a", "an"):
        return None
    phrase_words = list(itertools.takewhile(lambda word: word not in _CLAUSE_WORDS, words[1:]))
    if len(phrase_words) < len(words) - 1:
        # A participle that led into the cut clause: "a flower covered [in dew drops]".
        while len(phrase_words) > 1 and phrase_words[-1].endswith(("ed", "ing")):
            phrase_words.pop()
    phrase = " ".join(phrase_words)
    if not 1 <= len(phrase_words) <= MAX_PHRASE_WORDS or not _PHRASE.fullmatch(phrase):
        return None
    return words[0], phrase


def _join_adjective_commas(text: str) -> str:
    """Drop a comma between adjectives ("a ripe, red tomato"); cut at any other ("a lobster, from ...")."""
    head, comma, tail = text.partition(",")
    if not comma:
        return text
    tail_words = tail.lower().split()
    if tail_words and len(tail_words) <= 3 and not any(word in _CLAUSE_WORDS for word in tail_words):
        return _join_adjective_commas(f"{head} {tail.strip()}")
    return head


def has_size_word(phrase: str) -> bool:
    """Whether a noun phrase states a size already ("very small pitcher")."""
    return any(word in _SIZE_WORDS for word in phrase.split())


def pluralize(phrase: str) -> str:
    """English plural of a noun phrase: its head noun (the word before "of", else the last) inflected."""
    words = phrase.split()
    head = words.index("of") - 1 if "of" in words[1:] else len(words) - 1
    words[head] = _plural_word(words[head])
    return " ".join(words)


def _plural_word(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word in _INVARIANT_PLURALS:
        return word
    for suffix in _PLURAL_SUFFIXES:
        if word.endswith(suffix):
            return word[: -len(suffix)] + _plural_word(suffix)
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    return word + "s"
