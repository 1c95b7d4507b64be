"""On-device personalization (docs/design.md §6): select a user's most informative dialogues into a bounded buffer, ask for
few annotations, multiply the kept prompts with the model's own paraphrases, fine-tune with MeSP within a budget."""

from .buffer import POLICIES, Candidate, SelectionBuffer, make_policy
from .pipeline import PersonalizeConfig, evaluate, make_candidates, run, select
from .scores import dss, eoe, idd, load_lexicons, rouge1

__all__ = [
           "POLICIES",
           "Candidate",
           "PersonalizeConfig",
           "SelectionBuffer",
           "dss",
           "eoe",
           "evaluate",
           "idd",
           "load_lexicons",
           "make_candidates",
           "make_policy",
           "rouge1",
           "run",
           "select",
]
