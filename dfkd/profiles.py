"""What ``dfkd run`` makes: the network pairs and each profile's recipe (``PAIRS``, ``PROFILES``), and
the published numbers its table shows beside its own (``PAPER``, ``DAFL_NOISE``)."""
from __future__ import annotations

from .config import RunConfig
from .kinds import KINDS
from .objectives import OBJECTIVES

PAIRS = {"lenet5": "lenet5-half", "hinton-1200": "hinton-800"}
# Lopes et al. (2017), Table 1 (MNIST test accuracy, %). The paper has no noise baseline.
PAPER = {
    "lenet5": {"teacher": 98.91, "real-data": 98.65, "real-kd": 98.91, "top-layer": 77.30, "all-layers": 85.61,
               "spectral-all": 90.28, "spectral-pairs": 92.47},
    "hinton-1200": {"teacher": 96.95, "real-data": 95.70, "real-kd": 95.74, "top-layer": 68.75, "all-layers": 76.38,
                    "all-layers-dropout": 76.23, "spectral-all": 89.41, "spectral-pairs": 91.24},
}
# DAFL (Chen et al. 2019) distilled on its own Gaussian noise (N(0, 1) after normalisation, unclamped);
# ours is the paper's starting distribution N(0.15, 0.1) clamped to [0, 1]: not the same baseline.
DAFL_NOISE = {"lenet5": 88.01, "hinton-1200": 87.58}
# Per profile: epochs for the teacher and, per network, the real-data baselines; the reconstruction
# batch; the distillation recipe; per network the reconstruction recipe (``ReconstructConfig`` fields:
# synthetic images ``n``, Adam ``steps`` per image, priors, start) and, where a profile picks them,
# the objectives it runs by default. ``paper``: the paper's losses as written (plain squared
# distance, no whitening, no priors, noise start, no augmentation) at its sizes; ``quick`` and
# ``best``: dfkd's recipe (see README) at two budgets; ``tiny``: the tests' smoke run.
PROFILES = {
    "quick": dict(teacher_epochs=10, baseline_epochs={"lenet5": 10, "hinton-1200": 2}, batch_size=500,
                  distill=dict(epochs=20, batch_size=64, lr=1e-3, augment="affine+cutmix", eval_every=5),
                  recipe={"lenet5": dict(n=5000, steps=40), "hinton-1200": dict(n=5000, steps=40, jitter=2)}),
    "best": dict(teacher_epochs=10, baseline_epochs={"lenet5": 10, "hinton-1200": 10}, batch_size=500,
                 distill=dict(epochs=60, batch_size=64, lr=1e-3, augment="affine+cutmix", schedule="cosine",
                              eval_every=10),
                 recipe={"lenet5": dict(n=24000, steps=40), "hinton-1200": dict(n=24000, steps=20, jitter=2)},
                 objectives={"lenet5": ("all-layers",), "hinton-1200": ("all-layers",)}),
    "paper": dict(teacher_epochs=10, baseline_epochs={"lenet5": 10, "hinton-1200": 10}, batch_size=1000,
                  distill=dict(epochs=30, batch_size=64, lr=1e-3, augment="none"),
                  recipe={net: dict(n=64000, steps=1000, whiten=False, init="noise") for net in ("lenet5", "hinton-1200")}),
    "tiny": dict(teacher_epochs=1, baseline_epochs={"lenet5": 1, "hinton-1200": 1}, batch_size=20,
                 distill=dict(epochs=1, batch_size=64, lr=1e-3, augment="affine+cutmix"),
                 recipe={"lenet5": dict(n=40, steps=5), "hinton-1200": dict(n=40, steps=5, jitter=2)}),
}


def recipe(cfg: RunConfig, net: str) -> dict:
    """The ``ReconstructConfig`` fields for ``net`` under ``cfg`` (the profile's, with its overrides)."""
    r = dict(PROFILES[cfg.profile]["recipe"][net])
    if cfg.images is not None:
        r["n"] = cfg.images
    if cfg.steps is not None:
        r["steps"] = cfg.steps
    return r


def objectives(cfg: RunConfig, net: str) -> tuple[str, ...]:
    if cfg.objectives is not None:
        return tuple(cfg.objectives)
    # by default every objective on the default kinds (which dfkd run records), and noise; not bn-stats
    return PROFILES[cfg.profile].get("objectives", {}).get(net, tuple(
        o for o, cls in OBJECTIVES.items() if o != "bn-stats" and cls.kind in (None, *KINDS)))
