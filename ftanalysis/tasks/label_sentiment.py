"""Sentiment as a label word, for decoders: VADER-lexicon sentences with a one-token answer.

The sentences of :mod:`ftanalysis.tasks.sentences` (Hutto and Gilbert 2014, VADER lexicon), put in a prompt
for a causal LM; the answer is a label word, in the style of prompt-based fine-tuning (Gao et al. 2021,
"Making Pre-trained Language Models Better Few-shot Learners", arXiv 2012.15723)::

    Review: "the movie was delightful." Sentiment:      ->  " positive"
    Review: "the movie was not delightful." Sentiment:  ->  " negative"     (negation_rate > 0)

The label is the sentiment word's VADER sign, flipped by "not". Splits never share a sentiment word (the
generator assigns words to train / val / test by a stable hash), so test accuracy is on unseen words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from .._validation import check_float
from .base import Example
from .natural import NaturalTask
from .sentences import SentimentNegation

LABELS = (" negative", " positive")


@dataclass(frozen=True)
class LabelSentiment(NaturalTask):
    """Sentiment of a VADER-lexicon sentence as the next word: ``... Sentiment:`` -> ``" positive"``.

    Parameters
    ----------
    negation_rate : float, default=0.0
        Share of sentences with "not", which flips the label. The default 0.0 is plain lexical sentiment
        (the word's own polarity); 0.5 gives the harder ``sentiment_negation`` task.
    min_valence : float, default=1.0
        Keep words whose |mean valence| is at least this (VADER's scale is -4..4).
    seed : int, default=0
        Seed of the example streams.

    Notes
    -----
    Needs the VADER lexicon (``pip install vadersentiment``, part of the ``real`` extra). The generator writes
    punctuation as a separate word for the word-level tokenizers ("delightful ."); here the full stop is
    attached ("delightful."), as a BPE tokenizer expects in running text. ``evaluate`` adds
    ``choice_accuracy``: " positive" vs " negative" by their logits at the last position; ``chance`` is 0.5.

    Examples
    --------
    >>> task = LabelSentiment(seed=0)
    >>> ex = task.examples(1)[0]
    >>> ex.prompt.startswith('Review: "') and ex.answer in (" negative", " positive")
    True
    """

    negation_rate: float = 0.0
    min_valence: float = 1.0

    name: ClassVar[str] = "label_sentiment"

    def __post_init__(self):
        check_float(self.negation_rate, "negation_rate", "LabelSentiment", 0.0, 1.0)
        check_float(self.min_valence, "min_valence", "LabelSentiment", 0.0, 4.0)

    @cached_property
    def _sentences(self) -> SentimentNegation:
        return SentimentNegation(seed=self.seed, negation_rate=self.negation_rate, min_valence=self.min_valence)

    @property
    def chance(self) -> float:
        return 0.5

    def single_tokens(self) -> set[str]:
        return set(LABELS)

    def candidates(self, example: Example) -> tuple[str, str]:
        return LABELS

    def sample(self, rng: random.Random, split: str = "train") -> Example:  # type: ignore[override]
        text, valence, negated, _ = self._sentences.sentence(rng, split)
        positive = (valence > 0) != negated
        return Example(prompt=f'Review: "{text.replace(" .", ".")}" Sentiment:', answer=LABELS[int(positive)])

    def _draw(self, rng: random.Random, split: str) -> Example:
        return self.sample(rng, split)  # the split is chosen by word, not by prompt hash
