"""Training objectives beyond SFT on the 4-bit base: DPO (sigmoid, IPO, hinge), ORPO, SimPO and KTO.

`losses` holds the formulas on log-probabilities; `objective` runs them on a model, with the reference
policy taken from the same base (adapter disabled, or a frozen copy of the starting adapter).
"""
from qlora.objectives.losses import (DPO_LOSS_TYPES, dpo_loss, kto_kl_estimate, kto_loss, orpo_odds_ratio,
                                     simpo_loss)
from qlora.objectives.objective import (OBJECTIVES, REFERENCE_ADAPTER, REFERENCE_OBJECTIVES, KTOObjective,
                                        Objective, PreferenceObjective, SFTObjective, Stats, build_objective,
                                        completion_logps, evaluate_preferences, lookup_reference,
                                        precompute_reference, reference_policy)

__all__ = [
    "DPO_LOSS_TYPES", "OBJECTIVES", "REFERENCE_ADAPTER", "REFERENCE_OBJECTIVES", "KTOObjective", "Objective",
    "PreferenceObjective", "SFTObjective", "Stats", "build_objective", "completion_logps", "dpo_loss",
    "evaluate_preferences", "kto_kl_estimate", "kto_loss", "lookup_reference", "orpo_odds_ratio",
    "precompute_reference", "reference_policy", "simpo_loss",
]
