"""eraser: MLLMEraser (test-time unlearning by gated activation steering), its baselines, data and evaluation."""
from .method import ArtifactError, ArtifactMismatchError, EraserConfig, MLLMEraser

__all__ = ["ArtifactError", "ArtifactMismatchError", "EraserConfig", "MLLMEraser"]
