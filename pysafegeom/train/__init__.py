"""Safety fine-tuning: ``run(model, tokenizer, examples, TrainConfig(...), out_dir)`` with a recipe from
:data:`RECIPES` (SFT, and R2D2 adversarial training in :mod:`.r2d2`; full or LoRA), deterministic, checkpointed and resumable.
"""

from .data import DEFAULT_REFUSALS, Example, build_safety_dataset, encode_examples, end_of_turn_ids, read_answers
from ..generation import greedy_generate
from ..refusal import REFUSAL_SUBSTRINGS, is_refusal, refusal_rate
from .sft import RECIPES, Recipe, SFTRecipe, TrainConfig, TrainResult, checkpoints, export_adapter, run
from .r2d2 import R2D2Config, R2D2Recipe, check_disjoint, load_training_behaviors  # registers the "r2d2" recipe

__all__ = ["DEFAULT_REFUSALS", "Example", "build_safety_dataset", "encode_examples", "end_of_turn_ids", "read_answers",
           "REFUSAL_SUBSTRINGS", "greedy_generate", "is_refusal", "refusal_rate",
           "RECIPES", "Recipe", "SFTRecipe", "R2D2Config", "R2D2Recipe", "check_disjoint", "load_training_behaviors", "TrainConfig", "TrainResult", "checkpoints", "export_adapter", "run"]
