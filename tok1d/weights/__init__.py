"""Weights: the workdir layout, the loaders, the released-weights registry and the converters.

    import tok1d.weights
    model, params = tok1d.weights.load("titok_l32")   # fetched, checked, converted, cached

`load` and `resolve` are `tok1d.weights.loaders.load` / `.resolve`; the names are in
`tok1d.weights.registry.RELEASED`.
"""

from tok1d.weights.loaders import load, resolve

__all__ = ["load", "resolve"]
