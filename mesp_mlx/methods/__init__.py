from .base import Method
from .mebp import MeBP

METHODS = {"mebp": MeBP}


def make_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (available: {', '.join(sorted(METHODS))})")
    return METHODS[name](**options)
