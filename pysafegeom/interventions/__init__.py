"""Interventions (PROTOCOL.md section 4): directional ablation, activation addition and weight
orthogonalisation (:mod:`.hooks`), and the ActAdd / partial-ablation sweeps with matched controls (:mod:`.sweeps`)."""

from .hooks import ablate, add, export_orthogonalized, orthogonalize
from .sweeps import ABLATE_BETAS, ADD_ALPHAS, SweepResult, control_directions, sweep

__all__ = ["ABLATE_BETAS", "ADD_ALPHAS", "SweepResult", "ablate", "add", "control_directions", "export_orthogonalized",
           "orthogonalize", "sweep"]
