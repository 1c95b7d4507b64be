"""Training objectives beyond SFT's masked cross-entropy: preference losses on per-sequence scores (DPO, ORPO)."""

from .preference import DPO, DPO_LOSSES, ORPO, PreferenceObjective, adapters_off


def objective_for(settings) -> PreferenceObjective | None:
    """The objective a run's settings ask for (--train-mode); None for SFT (the engine's own cross-entropy)."""
    if settings.train_mode == "dpo":
        return DPO(settings.beta, settings.dpo_cpo_loss_type)
    if settings.train_mode == "orpo":
        return ORPO(settings.beta)
    return None


__all__ = ["DPO", "DPO_LOSSES", "ORPO", "PreferenceObjective", "adapters_off", "objective_for"]
