"""interp: a TransformerLens-style toolkit for vision-language models, built on nnsight.

>>> from interp import HookedVLM, ActivationCache
>>> from interp.tiny import tiny_vlm
"""
from .cache import ActivationCache
from .hooks import HookContext, first_steps, prefill_only
from .inputs import InputError, VLMInputs
from .model import Generation, HookedVLM
from .names import HookNameError

__all__ = ["ActivationCache", "Generation", "HookContext", "HookedVLM", "HookNameError", "InputError", "VLMInputs", "first_steps", "prefill_only"]
