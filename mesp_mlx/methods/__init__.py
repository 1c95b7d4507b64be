from .base import Method
from .mebp import MeBP
from .mesp import MeSP

METHODS = {"mesp": MeSP, "mebp": MeBP}


def make_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (available: {', '.join(sorted(METHODS))})")
    return METHODS[name](**options)
