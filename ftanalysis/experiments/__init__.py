"""Experiments: the recipes that build the fine-tunes the notebooks ship, above every other layer.

Each module holds the recipes of one notebook (data, method, optimiser settings), the function that trains
and saves one recipe with a card of what it measured, the loader the notebook uses, and a ``main`` that
rebuilds everything from the command line. Nothing below this package imports it.
"""
