"""The objectives on normalisation layers' inputs (``objectives`` registers them): DeepInversion's BatchNorm
matching (Yin et al. 2020) against the teacher's running statistics, and its recorded analogue for LayerNorm /
GroupNorm (``norm-stats``), against a statistics file's class Gaussians."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import DfkdError
from .models import batchnorms
from .moments import moments
from .normstats import NORMS, batch_moments, features, mixture, norm_rows
from .objective import Objective
from .taps import input_key


class BNStats(Objective):
    """DeepInversion's feature-distribution loss, which needs no metadata: for every BatchNorm
    layer ``l`` (teacher in eval mode), the batch mean ``mu_l`` and biased variance ``s2_l`` of
    its input over samples and positions against its running statistics,
    ``B * bn_weight * sum_l (||mu_l - running_mean_l||_2 + ||s2_l - running_var_l||_2)``, plus
    the cross-entropy of the intended labels (which makes the batch class-conditional)."""
    name, kind = "bn-stats", None

    def __init__(self, meta, model, cfg):
        super().__init__(None, model, cfg)
        self._bn = batchnorms(model)
        if not self._bn:
            raise DfkdError("objective", f"bn-stats needs BatchNorm layers with running statistics, and "
                            f"{type(model).__name__} has none; use a metadata objective (e.g. all-layers)")

    def inputs(self):
        return [p for p, _ in self._bn]

    def loss(self, logits, acts, tg, labels):
        total = logits.new_zeros(())
        for p, m in self._bn:
            x = acts[input_key(p)]
            dims = [0] + list(range(2, x.dim()))
            mean, var = moments(x, dims)
            total = total + torch.linalg.vector_norm(mean - m.running_mean) + \
                torch.linalg.vector_norm(var - m.running_var)
        return len(labels) * self.cfg.bn_weight * total + F.cross_entropy(logits, labels.to(logits.device),
                                                                          reduction="sum")


class NormStats(Objective):
    """``bn-stats`` with recorded targets, for LayerNorm / GroupNorm (``normstats``; needs ``norm-stats``): for
    every recorded norm layer ``l``, the batch's per-feature mean ``m_l`` and biased variance ``s2_l`` of its
    input over samples and positions against the mixture of the stored class Gaussians in the batch's label
    proportions, ``B * bn_weight * sum_l (||m_l - mu_l||_2 + ||s2_l - var_l||_2)``, plus the intended labels'
    cross-entropy."""
    name, kind = "norm-stats", "norm-stats"

    def __init__(self, meta, model, cfg):
        super().__init__(meta, model, cfg)
        mods, self._norms = dict(model.named_modules()), []
        for n in meta.header.get("norms", []):
            m = mods.get(n["path"])
            if not isinstance(m, NORMS) or features(m) != n["features"] or type(m).__name__ != n["type"]:
                there = "no such layer" if m is None else f"{n['path']} is a {type(m).__name__}" + (
                    f" of {features(m)} features" if isinstance(m, NORMS) else "")
                raise DfkdError(meta.path or "stats", f"its norm layer {n['path']} (a {n['type']} of "
                                f"{n['features']} features) is not in this teacher ({there}): record its "
                                "statistics from this teacher (dfkd record --teacher TEACHER)")
            g = self.stored(n["path"])
            self._norms.append((n["path"], m, g["mean"].to(self.dev), g["std"].to(self.dev).pow(2)))

    def layers(self):
        return []

    def inputs(self):
        return [p for p, *_ in self._norms]

    def loss(self, logits, acts, tg, labels):
        labels = labels.to(logits.device)
        share = torch.bincount(labels, minlength=logits.shape[1]).to(logits.dtype) / len(labels)
        total = logits.new_zeros(())
        for p, m, mean, var in self._norms:
            bm, bv = batch_moments(norm_rows(acts[input_key(p)], m))
            tm, tv = mixture(share, mean, var)
            total = total + torch.linalg.vector_norm(bm - tm) + torch.linalg.vector_norm(bv - tv)
        return len(labels) * self.cfg.bn_weight * total + F.cross_entropy(logits, labels, reduction="sum")
