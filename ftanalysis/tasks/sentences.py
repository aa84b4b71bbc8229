"""Real-word sentence tasks built from the VADER sentiment lexicon (Hutto and Gilbert 2014).

The lexicon ships offline in the PyPI package ``vadersentiment`` (the ``real`` extra). Sentences read::

    the movie was not delightful .      sentiment_negation -> negative     subject_category -> media

- ``sentiment_negation``: the word's sentiment (VADER mean valence > 0), flipped by "not". A frozen MiniLM
  with a linear probe gets about 0.8; fine-tuning reaches about 0.97 (measured, see the reference notes).
- ``subject_category``: what the subject is (food, media, place or person); the same sentences, another
  property, used as a retention probe (a frozen MiniLM already encodes it).
- ``sentiment``: the word's own sentiment, ignoring "not" (lexical polarity).
- ``intensity``: is the word's sentiment strong (|valence| >= 2.5) or mild (|valence| < 2), whatever its sign.

Words (|valence| >= ``min_valence``, alphabetic, 3+ letters) are assigned to train / val / test by a stable
hash, so the splits never share a sentiment word.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

from .._validation import check_float
from .base import Example, _check_split
from .classification import ClassificationTask

SUBJECTS = {
    "food": ["pizza", "soup", "cake", "salad", "burger", "pasta", "bread", "coffee"],
    "media": ["movie", "film", "book", "song", "show", "album", "novel", "play"],
    "place": ["hotel", "beach", "city", "park", "museum", "airport", "village", "garden"],
    "person": ["teacher", "doctor", "waiter", "neighbor", "coach", "manager", "nurse", "driver"],
}
TEMPLATES = ["the {s} was {neg}{w} .", "this {s} is {neg}{w} .", "i think the {s} is {neg}{w} .", "that {s} was {neg}{w} ."]
REAL_EXTRA_HINT = "pip install 'ftanalysis[real]'  (or: pip install vadersentiment)"


@lru_cache(maxsize=1)
def vader_lexicon() -> dict[str, float]:
    """``{word: mean valence}`` from the VADER lexicon shipped by ``vadersentiment``."""
    try:
        import vaderSentiment
    except ImportError as err:
        raise ImportError(f"The real-word sentence tasks need the VADER lexicon from the 'real' extra: {REAL_EXTRA_HINT}") from err
    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    lexicon = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            lexicon[parts[0]] = float(parts[1])
    return lexicon


def word_split(word: str) -> str:
    """``train`` / ``val`` / ``test`` for a word (80/10/10 by a stable hash)."""
    bucket = zlib.crc32(("word|" + word).encode()) % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


@lru_cache(maxsize=8)
def sentiment_words(min_valence: float = 1.0) -> dict[str, tuple[tuple[str, float], ...]]:
    """``{split: ((word, valence), ...)}`` for the lexicon's clear-sentiment words."""
    out: dict[str, list[tuple[str, float]]] = {"train": [], "val": [], "test": []}
    for word, valence in sorted(vader_lexicon().items()):
        if word.isalpha() and word.isascii() and len(word) >= 3 and abs(valence) >= min_valence:
            out[word_split(word)].append((word, valence))
    return {k: tuple(v) for k, v in out.items()}


@dataclass(frozen=True)
class _VaderSentences(ClassificationTask):
    negation_rate: float = 0.5
    min_valence: float = 1.0

    def __post_init__(self):
        owner = type(self).__name__
        check_float(self.negation_rate, "negation_rate", owner, 0.0, 1.0)
        check_float(self.min_valence, "min_valence", owner, 0.0, 4.0)

    def sentence(self, rng: random.Random, split: str) -> tuple[str, float, bool, str]:
        """``(sentence, valence, negated, category)``."""
        _check_split(split, type(self).__name__)
        word, valence = rng.choice(sentiment_words(self.min_valence)[split])
        category = rng.choice(sorted(SUBJECTS))
        subject = rng.choice(SUBJECTS[category])
        negated = rng.random() < self.negation_rate
        text = rng.choice(TEMPLATES).format(s=subject, neg="not " if negated else "", w=word)
        return text, valence, negated, category


@dataclass(frozen=True)
class SentimentNegation(_VaderSentences):
    """Sentiment of "the <subject> was (not) <word> .": the word's VADER sign, flipped by "not".

    Parameters
    ----------
    negation_rate : float, default=0.5
        Share of sentences with "not".
    min_valence : float, default=1.0
        Keep words whose |mean valence| is at least this (VADER's scale is -4..4).
    """

    name: ClassVar[str] = "sentiment_negation"
    labels: ClassVar[tuple[str, ...]] = ("negative", "positive")

    def sample(self, rng: random.Random, split: str = "train") -> Example:
        text, valence, negated, _ = self.sentence(rng, split)
        positive = (valence > 0) != negated
        return Example(prompt=text, answer=self.labels[int(positive)])


@dataclass(frozen=True)
class SubjectCategory(_VaderSentences):
    """Category of the sentence's subject (food, media, place, person), on the same sentences."""

    name: ClassVar[str] = "subject_category"
    labels: ClassVar[tuple[str, ...]] = tuple(sorted(SUBJECTS))

    def sample(self, rng: random.Random, split: str = "train") -> Example:
        text, _, _, category = self.sentence(rng, split)
        return Example(prompt=text, answer=category)


@dataclass(frozen=True)
class LexicalSentiment(_VaderSentences):
    """The sentiment word's own polarity (VADER sign), ignoring any "not"."""

    name: ClassVar[str] = "sentiment"
    labels: ClassVar[tuple[str, ...]] = ("negative", "positive")

    def sample(self, rng: random.Random, split: str = "train") -> Example:
        text, valence, _, _ = self.sentence(rng, split)
        return Example(prompt=text, answer=self.labels[int(valence > 0)])


@dataclass(frozen=True)
class Intensity(_VaderSentences):
    """Strong (|valence| >= ``strong``) or mild (|valence| < ``mild``) sentiment word, whatever its sign.

    Words in between are not used. Parameters as for :class:`SentimentNegation`, plus ``mild`` (default 2.0)
    and ``strong`` (default 2.5).
    """

    mild: float = 2.0
    strong: float = 2.5

    name: ClassVar[str] = "intensity"
    labels: ClassVar[tuple[str, ...]] = ("mild", "strong")

    def __post_init__(self):
        super().__post_init__()
        check_float(self.mild, "mild", "Intensity", self.min_valence, 4.0, low_open=True)
        check_float(self.strong, "strong", "Intensity", self.mild, 4.0)

    def sample(self, rng: random.Random, split: str = "train") -> Example:
        label = rng.randrange(2)  # balanced classes
        for _ in range(1000):
            text, valence, _, _ = self.sentence(rng, split)
            if (abs(valence) >= self.strong) if label else (abs(valence) < self.mild):
                return Example(prompt=text, answer=self.labels[label])
        raise RuntimeError("Intensity could not draw a word in the requested band.")
