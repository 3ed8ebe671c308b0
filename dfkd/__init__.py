"""dfkd: data-free knowledge distillation from activation metadata (Lopes, Fenu & Starner, 2017).

The API speaks in objects: ``train``, ``record``, ``reconstruct``, ``distill`` and ``evaluate``
take a ``torch.nn.Module``, data (a ``DataSource`` from ``open_data``, any ``Dataset`` or
``DataLoader`` yielding ``(input, label)``, or tensors) and a config; ``run`` is the whole
pipeline on the paper's networks. The modules are named after the steps (``recording``,
``reconstruction``, ...), so no function shadows its module.
"""
__version__ = "0.2.0"

from .errors import DfkdError  # noqa: E402
from .data import DataInfo, DataSource  # noqa: E402
from .sources import open_data  # noqa: E402
from .models import MODELS, build_model  # noqa: E402
from .checkpoint import load_model, save_model  # noqa: E402
from .config import DistillConfig, ReconstructConfig, RecordConfig, TrainConfig  # noqa: E402
from .metadata import Metadata  # noqa: E402
from .training import train  # noqa: E402
from .recording import record  # noqa: E402
from .reconstruction import reconstruct  # noqa: E402
from .synthetic import SyntheticSet  # noqa: E402
from .distillation import distill  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .pipeline import run  # noqa: E402

__all__ = ["DfkdError", "DataInfo", "DataSource", "open_data", "MODELS", "build_model", "load_model", "save_model",
           "TrainConfig", "RecordConfig", "ReconstructConfig", "DistillConfig", "Metadata", "SyntheticSet",
           "train", "record", "reconstruct", "distill", "evaluate", "run", "__version__"]
