"""dfkd: data-free knowledge distillation from activation metadata (Lopes, Fenu & Starner, 2017)."""
__version__ = "0.1.0"

from .errors import DfkdError  # noqa: E402
from .models import MODELS, build_model  # noqa: E402
from .data import load_mnist  # noqa: E402
from .checkpoint import load_model, save_model  # noqa: E402
from .train import train, train_model  # noqa: E402
from .evaluate import evaluate, evaluate_model  # noqa: E402
from .metadata import Metadata  # noqa: E402
from .record import record  # noqa: E402
from .reconstruct import reconstruct  # noqa: E402
from .distill import distill  # noqa: E402
from .pipeline import run  # noqa: E402

__all__ = ["DfkdError", "MODELS", "build_model", "load_mnist", "load_model", "save_model", "train", "train_model",
           "evaluate", "evaluate_model", "Metadata", "record", "reconstruct", "distill", "run", "__version__"]
