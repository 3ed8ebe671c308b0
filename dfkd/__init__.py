"""dfkd: data-free knowledge distillation from activation metadata (Lopes, Fenu & Starner, 2017).

The API speaks in objects: ``train``, ``record``, ``reconstruct``, ``distill`` and ``evaluate``
take a ``torch.nn.Module``, data (a ``DataSource`` from ``open_data``, any ``Dataset`` or
``DataLoader`` yielding ``(input, label)``, or tensors) and a config; ``generate`` trains a generator
against a teacher and distils a student on its batches (``load_generator`` reads one back); ``run`` is the
whole pipeline on the paper's networks or a user's own pair. The modules are named after the steps (``recording``,
``reconstruction``, ...), so no function shadows its module; everything else (``Metadata`` in
``metadata``, ``SyntheticSet`` in ``synthetic``, ``DataInfo`` in ``data``, ...) is imported from its
module. docs/architecture.md shows the layers.
"""
from .checkpoint import load_model
from .config import DistillConfig, ExportConfig, GeneratorConfig, ReconstructConfig, RecordConfig, TrainConfig
from .deployment import export_model
from .distillation import distill
from .errors import DfkdError
from .evaluation import evaluate
from .generation import generate, load_generator
from .models import build_model
from .pipeline import run
from .reconstruction import reconstruct
from .recording import record
from .run_config import RunConfig
from .sources import open_data
from .training import train
from .version import __version__

__all__ = ["train", "record", "reconstruct", "distill", "generate", "load_generator", "evaluate", "run", "TrainConfig",
           "RecordConfig", "ReconstructConfig", "DistillConfig", "GeneratorConfig", "ExportConfig", "RunConfig", "open_data",
           "build_model", "load_model", "export_model", "DfkdError", "__version__"]
