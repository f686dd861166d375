"""Baselines MLLMEraser is compared with: training-based unlearning (GA, GradDiff, KL_Min, NPO, MMUnlearner) and
prompting.

>>> from eraser.baselines import METHODS
>>> sorted(METHODS)
['ga', 'grad_diff', 'kl_min', 'mmunlearner', 'npo']
"""
from .finetune import FORGET_TEXT, METHODS, Example, unlearn, unlearning_data
from .prompting import DEFAULT_INSTRUCTION, forget_names, instruction_for, prompted_generate_fn
from .select import DEFAULT_EPOCHS, DEFAULT_LRS, BaselineSelection, select_baseline, select_baselines

__all__ = [
    "METHODS", "FORGET_TEXT", "Example", "unlearn", "unlearning_data",
    "DEFAULT_INSTRUCTION", "forget_names", "instruction_for", "prompted_generate_fn",
    "DEFAULT_EPOCHS", "DEFAULT_LRS", "BaselineSelection", "select_baseline", "select_baselines",
]
