"""Distillation: a frozen teacher (a dinokit run, or an official backbone for feature distillation) into one or
several smaller students, on the shared training engine (``dinokit distill``)."""

from .run import distill, student_sections
from .task import DistillationTask, feature_distillation_loss
from .teacher import TeacherSource, build_teacher, resolve_teacher

__all__ = [
    "DistillationTask",
    "TeacherSource",
    "build_teacher",
    "distill",
    "feature_distillation_loss",
    "resolve_teacher",
    "student_sections",
]
