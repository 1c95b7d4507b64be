from .base import Method
from .lcsb import LCSB
from .mebp import MeBP
from .mesp import MeSP
from .mezo import MeZO

METHODS = {"mesp": MeSP, "mebp": MeBP, "lcsb": LCSB, "mezo": MeZO}


def make_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (available: {', '.join(sorted(METHODS))})")
    return METHODS[name](**options)


def method_for(cfg) -> Method:
    """The method a TrainConfig asks for, with its options."""
    keep_attention = bool(cfg.keep_attention)  # None: the speed plan decides (train.choose_levers sets it)
    if cfg.method == "mesp":
        return MeSP(store_h=cfg.store_h, keep_attention=keep_attention)
    if cfg.method == "lcsb":
        return LCSB(cfg.lcsb_fraction, cfg.lcsb_schedule, cfg.lcsb_skipped, cfg.seed,
                    MeSP(store_h=cfg.store_h, keep_attention=keep_attention))
    if cfg.method == "mezo":
        return MeZO(cfg.learning_rate, cfg.zo_eps, cfg.zo_samples, cfg.zo_weight_decay, cfg.seed)
    return make_method(cfg.method)
