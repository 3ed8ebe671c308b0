"""The recipes ``dfkd run`` makes its students with, as plain data: the network pairs (``PAIRS``), each profile's
recipe for them (``PROFILES``, ``GENERATOR``) and for a user's own pair (``OWN``), and the published numbers its
table shows beside its own (``PAPER``, ``DAFL_NOISE``). ``profiles`` turns them into a run's pairs."""
from __future__ import annotations

SYNTHESES = ("optimise", "generator")
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
# Per profile: epochs for the teacher (--teacher-epochs overrides) and, per network, the real-data baselines; the
# reconstruction batch; the distillation recipe; per network the reconstruction recipe (``ReconstructConfig`` fields:
# synthetic images ``n``, Adam ``steps`` per image, priors, start) and, where a profile picks them, the objectives it
# runs by default. ``paper``: the paper's losses as written (plain squared distance, no whitening, no priors, noise
# start, no augmentation) at its sizes; ``quick`` and ``best``: dfkd's recipe (see README) at two budgets (``best``
# matches both networks' all-layers per-unit records by the batch, ``unit_targets``: LeNet-5 98.70 % -> 98.87 %,
# mean of 3 seeds; its Hinton-800 is distilled under --synthesis optimise with half of each batch pushed towards
# student-teacher disagreement, ``optimise_distill``: 98.15 % mean of 3 seeds); ``tiny``: the tests' smoke run.
PROFILES = {
    "quick": dict(teacher_epochs=10, baseline_epochs={"lenet5": 10, "hinton-1200": 2}, batch_size=500,
                  distill=dict(epochs=20, batch_size=64, lr=1e-3, augment="affine+cutmix", eval_every=5),
                  recipe={"lenet5": dict(n=5000, steps=40), "hinton-1200": dict(n=5000, steps=40, jitter=2)}),
    "best": dict(teacher_epochs=10, baseline_epochs={"lenet5": 10, "hinton-1200": 10}, batch_size=500,
                 distill=dict(epochs=60, batch_size=64, lr=1e-3, augment="affine+cutmix", schedule="cosine",
                              eval_every=10),
                 recipe={"lenet5": dict(n=24000, steps=40), "hinton-1200": dict(n=24000, steps=20, jitter=2)},
                 unit_targets={"lenet5": "batch", "hinton-1200": "batch"},
                 optimise_distill={"hinton-1200": dict(adversarial=0.5)},
                 objectives={"lenet5": ("all-layers",), "hinton-1200": ("all-layers",)}),
    "paper": dict(teacher_epochs=10, baseline_epochs={"lenet5": 10, "hinton-1200": 10}, batch_size=1000,
                  distill=dict(epochs=30, batch_size=64, lr=1e-3, augment="none"),
                  recipe={net: dict(n=64000, steps=1000, whiten=False, init="noise") for net in ("lenet5", "hinton-1200")}),
    "tiny": dict(teacher_epochs=1, baseline_epochs={"lenet5": 1, "hinton-1200": 1}, batch_size=20,
                 distill=dict(epochs=1, batch_size=64, lr=1e-3, augment="affine+cutmix"),
                 recipe={"lenet5": dict(n=40, steps=5), "hinton-1200": dict(n=40, steps=5, jitter=2)}),
}

# --synthesis generator, per profile (``GeneratorConfig`` fields): the generator's steps and sizes; the student's
# steps take the profile's distillation recipe (its lr, batch, views, temperature)
GENERATOR = {
    "quick": dict(iterations=400),
    "best": dict(iterations=1600),
    "paper": dict(iterations=1600),
    "tiny": dict(iterations=4, batch_size=16, latent=8, width=8, bank=64, student_steps=1, eval_every=2),
}

# A user's own pair (``dfkd run --teacher ... --student ...``), per profile: the teacher's epochs (where the run
# trains it), the reconstruction recipe (``ReconstructConfig`` fields; the teacher sees each input under the
# student's views: natural-background digits 39.10 % -> 67.95 %, docs/colour.md) and the distillation's (its views
# recoloured too: colour digits 71.20 % -> 87.70 %, README); the real-data students train for its epochs. Under
# --synthesis optimise ``optimise_recipe`` replaces the recipe's entries: 3,000 inputs x 120 steps (natural digits,
# mean of 3 seeds: 2,000 x 200 82.13 %, 3,000 x 120 84.43 % at 0.9x the image-steps, docs/colour.md), and
# ``optimise_distill`` the distillation's: 100 epochs with the lr annealed by a cosine (4,700 steps on 3,000
# inputs, about the baselines' 4,710 in 30 epochs of a 10,000-image set; 30 epochs at a constant lr left the
# student swinging between 61 and 72 %: natural digits 68.52 % (2 seeds) -> 82.13 % (3 seeds)); --epochs sets
# both; ``optimise_unit_targets`` matches every per-unit record by the batch (photograph patches, BN ResNet:
# 74.13 % -> 88.87 %, seed 0; 85.00 % the mean of 3; docs/colour.md). Under --synthesis generator ``generator_recipe``
# replaces the recipe's (its student sees the views already; seen views cost it 2 points on colour digits), and
# ``generator_without_bn`` those for all-layers without bn-stats (a teacher without BatchNorm: per-unit records
# matched by the batch; GroupNorm teacher on colour digits 84.60 % -> 89.50 %, docs/beyond-bn.md). The objective
# follows from what the teacher offers (``own.offered``). ``colour_probe``: --colour auto's inputs per class
# (``least`` to ``most`` in all), their steps, and the fewest the teacher must give their class (``colour.decide``).
# ``optimise_budget_steps``: the steps --minutes plans at where the recipe's inputs do not fit the budget at its
# steps and --steps is not given (``budget.fit``): more inputs instead (third outside pair, 15 minutes, means of 3
# seeds: 120 steps 68.69 %, 60 steps 75.33 %; 30 steps 65.67 % on two; docs/colour.md, "Fewer steps, more inputs").
OWN = {
    "quick": dict(teacher_epochs=3, recipe=dict(n=2000, steps=200, batch_size=500, lr=0.2, jitter=2, tv=0.05,
                                                views="affine+colour"),
                  distill=dict(epochs=30, batch_size=64, lr=0.01, augment="affine+cutmix+colour"),
                  optimise_recipe=dict(n=3000, steps=120), optimise_unit_targets="batch",
                  optimise_distill=dict(epochs=100, schedule="cosine", eval_every=10), optimise_budget_steps=60,
                  generator=dict(iterations=800, eval_every=100), generator_recipe=dict(views="none"),
                  generator_without_bn=dict(unit_targets="batch"), colour_probe=dict(per_class=10, least=100, most=200, steps=60, intended=10)),
    "tiny": dict(teacher_epochs=1, recipe=dict(n=40, steps=5, batch_size=20, lr=0.2, jitter=2, tv=0.05, views="affine+colour"),
                 distill=dict(epochs=1, batch_size=64, lr=0.01, augment="affine+cutmix+colour"), optimise_unit_targets="batch",
                 optimise_distill=dict(schedule="cosine"), optimise_budget_steps=3, generator_recipe=dict(views="none"),
                 generator_without_bn=dict(unit_targets="batch"), colour_probe=dict(per_class=4, least=20, most=40, steps=20, intended=10)),
}
