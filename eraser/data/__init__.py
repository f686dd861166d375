"""Benchmark data: the MLLMU-Bench schema, its real-data loader and the embedded MiniMLLMU generator."""
from .schema import SPLITS, Benchmark, ClassificationQ, ClozeQ, GenerationQ, Profile, Request

__all__ = ["SPLITS", "Benchmark", "ClassificationQ", "ClozeQ", "GenerationQ", "Profile", "Request"]
