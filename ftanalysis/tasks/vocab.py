"""The shared word-level vocabulary of the procedural tasks and its Hugging Face tokenizer.

Every procedural task writes prompts with words from this one vocabulary, so one tokenizer serves the whole
zoo and a model pretrained on one task mixture can be fine-tuned on any other task without new embeddings.
Words are separated by single spaces; punctuation is written as separate words (``"box F ,"``).

The tokenizer is a :class:`transformers.PreTrainedTokenizerFast` over a ``WordLevel`` model. It prepends
``<bos>`` to every encoded text (a fixed first token gives tiny models a place to park attention) and is saved
and loaded with the model by ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]

NUMBERS = [str(i) for i in range(100)]
UPPER = [chr(c) for c in range(ord("A"), ord("Z") + 1)]  # box labels and recall keys
LOWER = [chr(c) for c in range(ord("a"), ord("z") + 1)]  # symbols for copy / count
OBJECTS = [
    "apple", "key", "coin", "book", "ring", "cup", "pen", "hat", "ball", "lamp",
    "shoe", "bell", "card", "drum", "egg", "fork", "glove", "jar", "kite", "leaf",
    "map", "nut", "pear", "rose", "sock", "toy", "watch", "bottle", "brush", "candle",
]
NAMES = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "karl", "lena", "mike", "nina", "oscar", "peggy", "quinn", "rita", "sam", "tara",
    "uma", "victor", "wendy", "xena",
]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito", "dakar", "perth", "riga", "sofia"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
FUNCTION_WORDS = [
    "the", "is", "in", "box", "contains", "lives", "likes", "mod",
    "count", "copy", "reverse", "recall", "sort", "first", "last",
    ",", ".", ":", "=", "+", "-", "*", "?",
]
# Spare tokens with no meaning in any pretraining task: fine-tuning experiments can give them one
# (a new instruction word, a new symbol) without resizing the embeddings.
EXTRA_TOKENS = [f"<extra_{i}>" for i in range(16)]

VOCAB: list[str] = (
    SPECIAL_TOKENS + NUMBERS + UPPER + LOWER + OBJECTS + NAMES + CITIES + COLORS + FUNCTION_WORDS + EXTRA_TOKENS
)


def build_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Build the shared word-level tokenizer (deterministic: the same ids on every machine).

    Examples
    --------
    >>> tok = build_tokenizer()
    >>> tok.convert_ids_to_tokens(tok("box F contains the")["input_ids"])
    ['<bos>', 'box', 'F', 'contains', 'the']
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    if len(set(VOCAB)) != len(VOCAB):
        duplicated = sorted({w for w in VOCAB if VOCAB.count(w) > 1})
        raise RuntimeError(f"The task vocabulary has duplicated words: {duplicated}")
    vocab = {word: i for i, word in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=model_max_length,
        padding_side="right",
    )
