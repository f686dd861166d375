"""Benchmark data: the MLLMU-Bench schema, its real-data loader and the embedded MiniMLLMU generator."""
from .mini import MiniMLLMU
from .mllmu import BenchmarkFormatError, load_mllmu, save_mllmu
from .schema import SPLITS, Benchmark, ClassificationQ, ClozeQ, GenerationQ, Profile, Request

__all__ = [
    "SPLITS", "Benchmark", "BenchmarkFormatError", "ClassificationQ", "ClozeQ", "GenerationQ", "MiniMLLMU",
    "Profile", "Request", "load_mllmu", "save_mllmu",
]
