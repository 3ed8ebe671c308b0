"""What a private statistics file says about itself, beyond its noise (``privacy``):

- which values in its header are public, and why: every value that is not released through the
  accountant is given by the user, belongs to the model, or is fixed by the command; a value
  that would be read off the training examples is refused (``check_inputs``), never written;
- how good each privately chosen clip bound is, judged from released (noisy) quantities only
  (``clip_report``, ``clip_warnings``);
- ``dfkd inspect``'s lines (``describe``).

Refusals and warnings go to the data's owner on the command line, who holds the data anyway;
only the file is released, and it holds nothing exact about the examples.
"""
from __future__ import annotations

import re

from .errors import DfkdError

LOOSE = 10.0  # a chosen bound this many times the released median norm is reported as loose
FEW = 10.0  # fewer examples (released count) than this many histogram noise stds: the choice is reported

# where each data-description value came from (``DataSource.origin``) -> what the header says of it
NORMALISATION = {
    "model": "the teacher's own normalisation, part of the model and published with it by the publisher's choice: "
             "not protected; its model file says it was given as public values (--normalize MEAN/STD) or none "
             "(a teacher whose normalisation dfkd train --normalize auto computed from the data is refused, and so "
             "is one whose file does not say, unless it is mean 0, std 1)",
    "user": "declared public by the user (--normalize MEAN/STD)",
    "caller": "given by the caller in the DataInfo: declared public",
    None: "none (mean 0, std 1)",
}
RANGE = {
    "user": "declared public by the user (--range LOW,HIGH)",
    "caller": "given by the caller in the DataInfo: declared public",
    None: "the data format's fixed range (8-bit images: 0..1), not read from the examples",
}


def check_inputs(origin: dict, declared_range: bool, info=None) -> None:
    """Refuse, before any pass, a data description that would carry values read off the training examples.
    A saved teacher's normalisation (``normalisation`` ``model``) is taken only where its model file says it
    was given as public values or none (``model_normalisation``: ``user`` or ``none``, written by ``dfkd
    train``); one computed from data (``data``: ``--normalize auto``) is refused, and so is one whose file does
    not say (older files, other savers) unless it is the identity (mean 0, std 1, nothing to leak)."""
    if origin.get("normalisation") == "model":
        saved = origin.get("model_normalisation")
        identity = info is not None and set(info.mean) <= {0.0} and set(info.std) <= {1.0}
        fix = "retrain it with --normalize MEAN/STD given as public values (e.g. 0.5/0.25), or with none"
        if saved == "data":
            raise DfkdError("teacher", "its normalisation was computed from the training data (dfkd train "
                            f"--normalize auto): its exact mean and std cannot go into a private file; {fix}")
        if saved not in ("user", "none") and not identity:
            raise DfkdError("teacher", "its model file does not say where its normalisation (mean "
                            f"{list(getattr(info, 'mean', []))}, std {list(getattr(info, 'std', []))}) came from, "
                            f"so it may be the training data's exact mean and std: {fix}")
    if origin.get("normalisation") == "data":
        raise DfkdError("normalize", "auto is the training data's exact per-channel mean and std, which a private "
                        "file cannot carry: give public values as MEAN/STD (e.g. 0.5/0.25), or none")
    if origin.get("range") == "data" and not declared_range:
        raise DfkdError("value_range", "needed with --privacy for this data: its range would be read from the "
                        "examples (their exact minimum and maximum); declare public bounds, e.g. --range 0,1")


def public_values(origin: dict, declared_range: bool, delta_given: bool) -> dict[str, str]:
    """The header's values that the accountant does not cover, each with where it comes from."""
    norm = origin.get("normalisation")
    rng = "user" if declared_range else origin.get("range")
    return {
        "data.shape, data.num_classes, layers, top, teacher_sha256": "the model's (its input shape, its outputs, its "
                                                                     "layers and weights): public with the model",
        "data.mean, data.std": NORMALISATION.get(norm, NORMALISATION["caller"]),
        "data.low, data.high, recorded_on.input_min, recorded_on.input_max": RANGE.get(rng, RANGE["caller"]),
        "data.class_names, data.name, recorded_on.dataset": "the model's or the data source's names (class "
                                                            "folders, 0..C-1) and the data spec as given",
        "kinds, temperature, spectral settings, clip bounds given by the user, delta": "the command's settings" + (
            "" if delta_given else " (delta: the fixed default 1e-6, not derived from the data)"),
    }


PROTECTED = {  # what the accountant covers: released with noise, or computed from noisy releases only
    "every tensor": "class means and covariances (or stds, spectral coefficients) from noisy clipped sums",
    "count, recorded_on.n_samples, recorded_on.per_class": "noisy counts",
    "clip bounds chosen here (with their median_norm, stood_out, loose, noise_to_signal)": "read off noisy histograms",
    "spectral kept coefficients, closed_form, tensors_sha256": "computed from the noisy releases",
}


HEADER_FIELDS = [  # every key path a private file's header holds ("*": any text, "[]": a list's items), its status
    # and where it comes from: the README's table lists each pattern (a test records a file and checks both ways)
    (("format", "version", "dfkd_version"), "public", "the file format, its version and the dfkd that wrote it"),
    (("data.shape", "data.num_classes", "num_classes", "top.*", "layers[].*", "norms[].*", "teacher_sha256", "teacher"),
     "public", "the model: input shape, outputs, recorded layers (path, type, shape, stat, dim, nodes, cov mode), "
     "norm layers (path, type, features), weights hash, spec"),
    (("recorded_on.sample_bytes",), "public", "values per example: the model's input shape"),
    (("data.mean", "data.std"), "public", "normalisation: the teacher's own (its model file says it was given as "
     "MEAN/STD or none; computed by --normalize auto, or unknown and not mean 0 / std 1, is refused), or "
     "--normalize MEAN/STD for a spec teacher (--normalize auto is refused)"),
    (("data.low", "data.high", "recorded_on.input_min", "recorded_on.input_max"), "public",
     "value range: the format's (8-bit images: 0..1; --range must equal it there), or declared with --range "
     "LOW,HIGH (a float npz set needs it: its observed range is refused)"),
    (("data.class_names", "data.name", "recorded_on.dataset"), "public",
     "the model's or the data source's names (class folders, 0..C-1), the data spec as given"),
    (("kinds", "temperature", "spectral.keep", "spectral.operator", "spectral.conv_nodes", "spectral.select_n",
      "spectral.kept_by", "spectral.all.name", "spectral.all.layers", "spectral.all.nodes", "spectral.pairs[].name",
      "spectral.pairs[].layers", "spectral.pairs[].nodes"), "public", "the command's settings and the model's graph"),
    (("privacy.epsilon", "privacy.target_epsilon", "privacy.delta", "privacy.scale", "privacy.neighbouring",
      "privacy.mechanism", "privacy.accountant", "privacy.accountant_version", "privacy.noise", "privacy.covers",
      "privacy.events[].*", "privacy.public.*", "privacy.protected.*"), "public",
     "the privacy plan: targets (delta: --delta or the fixed default 1e-6), accountant, each release's share, "
     "sensitivity (1 or a clip bound) and multiplier, fixed text"),
    (("privacy.clip_bounds.*.bound", "privacy.clip_bounds.*.by", "privacy.clip_bounds.*.histogram_noise"),
     "public or protected", "a bound given with --clip (public: the command), or chosen on a noisy norm histogram "
     "(protected); histogram_noise is that histogram's multiplier"),
    (("privacy.clip_bounds.*.median_norm", "privacy.clip_bounds.*.stood_out", "privacy.clip_bounds.*.loose",
      "privacy.clip_bounds.*.released_n", "privacy.clip_bounds.*.mean_noise",
      "privacy.clip_bounds.*.noise_to_signal"), "protected", "noisy norm histograms and noisy counts"),
    (("recorded_on.n_samples", "recorded_on.per_class"), "protected", "noisy counts (and the count tensor)"),
    (("spectral.all.kept", "spectral.pairs[].kept", "closed_form[].*", "tensors_sha256"), "protected",
     "computed from the noisy releases (every tensor is: class means, covariances or stds, spectral coefficients)"),
]


def key_paths(h: dict, prefix: str = ""):
    """A header's leaf key paths (``a.b``; a list of objects as ``a[].b``)."""
    if isinstance(h, dict):
        for k, v in h.items():
            yield from key_paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(h, list) and h and all(isinstance(v, dict) for v in h):
        for v in h:
            yield from key_paths(v, prefix + "[]")
    else:
        yield prefix


def field_status(path: str) -> str | None:
    """The status ``HEADER_FIELDS`` gives a key path (None: not listed)."""
    for patterns, status, _ in HEADER_FIELDS:
        for p in patterns:
            if re.fullmatch(re.escape(p).replace(r"\*", ".*"), path):
                return status
    return None


def clip_report(bound: float, median_norm: float, stood_out: bool, histogram_noise: float, released_n: float,
                mean_noise: float) -> dict:
    """What released quantities say of a bound chosen on a noisy histogram: ``loose`` is ``guess`` (no cell
    stood out of the noise: the fullest noisy cell), ``few`` (fewer than ``FEW`` x the histogram's noise std
    examples by the released count: one noise cell can carry the bound), ``far`` (more than ``LOOSE`` x the
    histogram's median norm) or None; ``mean_noise`` is the noise std on a class mean's norm (the smallest
    released class), ``noise_to_signal`` that over the median norm."""
    loose = "guess" if not stood_out else "few" if released_n < FEW * histogram_noise else \
        "far" if bound > LOOSE * median_norm else None
    return {"loose": loose, "mean_noise": mean_noise, "noise_to_signal": mean_noise / median_norm if stood_out else None}


def clip_warnings(privacy: dict | None) -> list[str]:
    """One line per privately chosen bound that is loose or a guess, with what it costs."""
    out = []
    for r, b in ((privacy or {}).get("clip_bounds") or {}).items():
        if not isinstance(b, dict) or b.get("loose") not in ("guess", "few", "far"):
            continue
        why = {"guess": f"no cell of its noisy norm histogram stood out of the noise, so the bound {b['bound']:.3g} "
                        "is a guess",
               "few": f"the released count {b.get('released_n', 0):.0f} is under {FEW:g}x its histogram's noise std "
                      f"{b.get('histogram_noise', 0):.3g}, so one noise cell can carry the bound {b['bound']:.3g}",
               "far": f"the bound {b['bound']:.3g} is {b['bound'] / b['median_norm']:.0f}x the median norm "
                      f"{b['median_norm']:.3g} of its noisy histogram (a noise cell above the data moved it)"}[b["loose"]]
        cost = f"; noise std on a class mean's norm {b['mean_noise']:.3g}" if isinstance(b.get("mean_noise"), float) else ""
        if isinstance(b.get("noise_to_signal"), float):
            cost += f" ({b['noise_to_signal']:.2g}x the median norm)"
        out.append(f"clip {r}: {why}{cost}; give --clip {r}=BOUND, a larger epsilon or more data")
    return out


def not_private(p: dict | None) -> str | None:
    """Why a header's privacy section does NOT make the file private (None where it does): noise drawn from
    a seed the user gave (``noise_seed``, written by older versions' ``--noise-seed``: the seed, the public
    code and the header regenerate every draw), a section without the ``noise`` key (written before the
    noise came from ``os.urandom``: it may have been seeded), or the tests' insecure noise."""
    if not p:
        return None
    if "noise_seed" in p:
        return (f"its noise was drawn from a user-given seed (noise_seed {p['noise_seed']}), which with the public "
                "code and this header regenerates every draw and so the exact statistics")
    if "noise" not in p:
        return ("its header does not say where its noise came from (written by an older dfkd, whose noise could be "
                "seeded with --noise-seed and so regenerated)")
    if "NOT private" in str(p.get("noise", "")):
        return str(p["noise"])
    return None


def describe(h: dict) -> list[str]:
    """``dfkd inspect``'s lines on a header's privacy."""
    p = h.get("privacy")
    if not p:
        return ["privacy: none: every statistic is exact on the training set (record with --privacy EPSILON "
                "for a differential-privacy guarantee)"]
    target = p.get("target_epsilon", p["epsilon"])
    why = not_private(p)
    if "noise_seed" in p or "noise" not in p:  # an older, possibly seeded file: no guarantee to state
        return [f"privacy: NOT private: {why}; its claimed ({target:g}, {p['delta']:.3g})-differential privacy "
                "does not hold (record again with --privacy EPSILON)"]
    lines = [f"privacy: ({target:g}, {p['delta']:.3g})-differential privacy (the accountant's epsilon: "
             f"{p['epsilon']:.6g}), {p['neighbouring']}; "
             f"{p['mechanism']} noise, accountant {p['accountant']} {p['accountant_version']}; covers {p['covers']}"]
    if why:
        lines.append(f"  WARNING: {why}")
    for r, b in p["clip_bounds"].items():
        lines.append(f"  clip {r}: {b['bound']:.4g} ({b['by']})")
    for e in p["events"]:
        lines.append(f"  noise {e['release']}: multiplier {e['noise_multiplier']:.4g} x sensitivity "
                     f"{e['sensitivity']:.4g} = sigma {e['sigma']:.4g} (share {e['share']:.3f})")
    for k, v in (p.get("protected") or {}).items():
        lines.append(f"  protected: {k}: {v}")
    for k, v in (p.get("public") or {}).items():
        lines.append(f"  public, not protected: {k}: {v}")
    lines += [f"  warning: {w}" for w in clip_warnings(p)]
    return lines
