"""eraser: MLLMEraser (test-time unlearning by gated activation steering), its baselines, data and evaluation."""
from .artifact import ArtifactError, ArtifactMismatchError
from .direction import ErasureDirection
from .gate import NullSpaceGate
from .config import EraserConfig
from .method import MLLMEraser

__all__ = ["ArtifactError", "ArtifactMismatchError", "EraserConfig", "ErasureDirection", "MLLMEraser", "NullSpaceGate"]
