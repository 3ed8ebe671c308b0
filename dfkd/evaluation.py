"""Accuracy on the real test set against the true labels, and agreement with a teacher."""
from __future__ import annotations

from torch import nn

from .data import DataSource
from .errors import DfkdError
from .loop import predictions
from .runtime import pick_device
from .specs import DataRef, ModelRef, open_model, open_with_data


def evaluate(model: nn.Module, data, teacher: nn.Module | None = None, teacher_data=None) -> dict:
    """Test accuracy of ``model`` on ``data`` (a DataSource's test split, or any test set); with a
    teacher (fed ``teacher_data`` when its inputs differ), also its accuracy, agreement and share,
    and the accuracy per class."""
    names = None
    if isinstance(data, DataSource):
        names = data.info.class_names
        if data.test is None:
            raise DfkdError("data", "has no test split; give one with test_data")
        data = data.test
    if isinstance(teacher_data, DataSource):
        teacher_data = teacher_data.test
    pred, y = predictions(model, data)
    out = {"n": len(pred), "accuracy": (pred == y).float().mean().item()}
    k = int(y.max()) + 1
    per = [(pred[y == c] == c).float().mean().item() if (y == c).any() else None for c in range(k)]
    out["per_class"] = dict(zip(names or [str(c) for c in range(k)], per))
    if teacher is not None:
        tpred, _ = predictions(teacher, teacher_data if teacher_data is not None else data)
        out["teacher_accuracy"] = (tpred == y).float().mean().item()
        out["agreement"] = (pred == tpred).float().mean().item()
        out["share_of_teacher"] = out["accuracy"] / max(out["teacher_accuracy"], 1e-12)
    return out


def evaluate_file(model: ModelRef, data: DataRef, teacher: ModelRef | None = None, device: str = "cpu") -> dict:
    """``dfkd evaluate``: saved models on the real test set of a data spec (default: their own), run
    on ``device``."""
    net, _, source = open_with_data(model, data)
    dev = pick_device(device)
    net.to(dev)
    tnet, tsource = None, None
    if teacher is not None:
        tnet, _, tinfo = open_model(teacher)
        tnet.to(dev)
        same = (tinfo.shape, tinfo.mean, tinfo.std) == (source.info.shape, source.info.mean, source.info.std)
        tsource = source if same else open_with_data(teacher, data)[2]
    return evaluate(net, source, tnet, tsource)
