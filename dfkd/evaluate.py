"""Accuracy on the real test set against the true labels, and agreement with a teacher."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .data import ImageSet, load_mnist, to_input
from .errors import DfkdError
from .models import model_input_shape, predict_logits


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` whose argmax logit equals the true label ``y``."""
    return (predict_logits(model, x).argmax(1) == y).float().mean().item()


def evaluate_model(model: nn.Module, data: ImageSet, teacher: nn.Module | None = None) -> dict:
    """Test accuracy of ``model``; with a teacher, also its accuracy, agreement and share."""
    x = to_input(data.test_x, model_input_shape(model))
    pred = predict_logits(model, x).argmax(1)
    out = {"n": len(pred), "accuracy": (pred == data.test_y).float().mean().item()}
    if teacher is not None:
        tpred = predict_logits(teacher, to_input(data.test_x, model_input_shape(teacher))).argmax(1)
        out["teacher_accuracy"] = (tpred == data.test_y).float().mean().item()
        out["agreement"] = (pred == tpred).float().mean().item()
        out["share_of_teacher"] = out["accuracy"] / max(out["teacher_accuracy"], 1e-12)
    return out


def evaluate(model_path: str | Path, teacher_path: str | Path | None = None, data_dir: str | None = None) -> dict:
    """``dfkd evaluate``: load saved models and measure them on the real test set."""
    from .checkpoint import load_model

    model, _ = load_model(model_path)
    teacher = load_model(teacher_path)[0] if teacher_path else None
    data = load_mnist(data_dir)
    if data.num_classes != getattr(model, "num_classes", data.num_classes):
        raise DfkdError(model_path, f"model has {model.num_classes} classes, data has {data.num_classes}")
    return evaluate_model(model, data, teacher)
