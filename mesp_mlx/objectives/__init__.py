"""Training objectives beyond SFT's masked cross-entropy: preference losses on per-sequence scores (DPO, ORPO) and
GRPO's clipped, advantage-weighted token loss on sampled completions."""

from .base import SequenceObjective, adapters_off
from .grpo import GRPO, GRPO_LOSSES
from .preference import DPO, DPO_LOSSES, ORPO, PreferenceObjective


def objective_for(settings) -> SequenceObjective | None:
    """The objective a run's settings ask for (--train-mode); None for SFT (the engine's own cross-entropy)."""
    if settings.train_mode == "dpo":
        return DPO(settings.beta, settings.dpo_cpo_loss_type)
    if settings.train_mode == "orpo":
        return ORPO(settings.beta)
    if settings.train_mode == "grpo":
        return GRPO(settings.beta, settings.epsilon, settings.epsilon_high, settings.grpo_loss_type,
                    settings.importance_sampling_level, settings.max_completion_length)
    return None


__all__ = ["DPO", "DPO_LOSSES", "GRPO", "GRPO_LOSSES", "ORPO", "PreferenceObjective", "SequenceObjective",
           "adapters_off", "objective_for"]
