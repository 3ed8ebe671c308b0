"""The command line is made from the config dataclasses (``cli_fields``): an oracle over
``dataclasses.fields`` and the parser's actions. Every field has a flag (or says in its metadata why
not), with help; the parser's default is the field's own; a verb's config built from the parser's
defaults is the config's default; and a value given on the command line reaches its field. The
device is picked once, in ``cli.main``, and reaches every verb's library call."""
from __future__ import annotations

import argparse
import types
import typing
from dataclasses import fields

import pytest
import torch

from dfkd import cli, cli_commands
from dfkd.cli_fields import config_from, dest
from dfkd.cli_parser import build_parser
from dfkd.config import DistillConfig, ReconstructConfig, RecordConfig, Runtime, TrainConfig, flag
from dfkd.run_config import RunConfig

CONFIGS = {"train": TrainConfig, "record": RecordConfig, "reconstruct": ReconstructConfig, "distill": DistillConfig,
           "run": RunConfig}
REQUIRED = {"record": ["--teacher", "t"], "reconstruct": ["--teacher", "t"], "distill": ["--synthetic", "s", "--out", "o"]}


def _sub(verb: str) -> argparse.ArgumentParser:
    p = build_parser()
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]


def _flagged(cls: type):
    return [f for f in fields(cls) if flag(f) is not None]


@pytest.mark.parametrize("cls", list(CONFIGS.values()), ids=list(CONFIGS))
def test_every_field_has_a_flag_and_help_or_says_why_not(cls):
    for f in fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
        if flag(f) is None:
            assert f.metadata.get("why"), f"{cls.__name__}.{f.name} has no flag and no reason for none"


@pytest.mark.parametrize("verb", list(CONFIGS))
def test_the_parsers_default_is_the_fields_own(verb):
    cls, sub = CONFIGS[verb], _sub(verb)
    for f in _flagged(cls):
        action = sub._option_string_actions.get(flag(f))
        assert action is not None, f"{verb} has no {flag(f)} for {cls.__name__}.{f.name}"
        assert action.dest == dest(f) and action.help, (verb, f.name)
        if isinstance(action, argparse._StoreTrueAction):  # the flag sets the opposite of the field's default
            assert typing.get_type_hints(cls)[f.name] is bool and action.default is False, (verb, f.name)
            continue
        d = action.default
        if isinstance(d, str) and action.type is not None:
            d = action.type(d)  # argparse parses a string default as it parses a given value
        assert (tuple(d) if isinstance(action, argparse._AppendAction) else d) == f.default, (verb, f.name, d)
    args = sub.parse_args(REQUIRED.get(verb, []))
    assert config_from(args, cls) == cls(), verb


def _other(cls: type, f) -> tuple[list[str], object]:
    """A command-line value for ``f`` other than its default, and the value the field should then hold."""
    hint, d = typing.get_type_hints(cls)[f.name], f.default
    how, name = f.metadata.get("parse"), flag(f)
    if hint is bool:
        return [name], not d
    if how == "clip":
        return [name, "top-layer=5", name, "all-layers/fc1=60"], (("top-layer", 5.0), ("all-layers/fc1", 60.0))
    if how == "range":
        return [f"{name}=-1,2"], (-1.0, 2.0)
    if "choices" in f.metadata:
        v = next(c for c in f.metadata["choices"] if c != d)
        return [name, v], v
    base = typing.get_args(hint)[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    if typing.get_origin(base) is tuple:
        return [name, "a, b"], ("a", "b")
    if base is int:
        v = (d or 0) + 3
        return [name, str(v)], v
    if base is float:
        v = (d or 0.0) * 2 + 0.5
        return [name, repr(v)], v
    return [name, "other"], "other"


@pytest.mark.parametrize("verb", list(CONFIGS))
def test_a_value_on_the_command_line_reaches_its_field(verb):
    cls, p = CONFIGS[verb], build_parser()
    for f in _flagged(cls):
        if f.name == "device":  # resolved by cli.main, below
            continue
        argv, want = _other(cls, f)
        cfg = config_from(p.parse_args([verb, *REQUIRED.get(verb, []), *argv]), cls)
        assert getattr(cfg, f.name) == want, (verb, f.name, argv)
        assert cfg == cls(**{f.name: want}), (verb, f.name)  # and nothing else moved


@pytest.mark.parametrize("verb", ["train", "record", "reconstruct", "distill", "evaluate", "run", "leakage",
                                  "publish"])
def test_the_device_is_picked_once_at_the_entry_point(verb, monkeypatch):
    seen = []
    monkeypatch.setitem(cli_commands.COMMANDS, verb, lambda a: seen.append(a.device) or 0)
    argv = {"record": ["--teacher", "t"], "reconstruct": ["--teacher", "t"], "distill": ["--synthetic", "s", "--out", "o"],
            "evaluate": ["m"], "leakage": ["--teacher", "t"], "publish": ["--teacher", "t", "--out", "o"]}.get(verb, [])
    assert cli.main([verb, *argv, "--device", "auto"]) == 0
    assert seen == ["cuda" if torch.cuda.is_available() else "cpu"] or seen[0].startswith("cuda")


def test_every_verb_runs_on_the_picked_device(monkeypatch):
    """train, record, reconstruct and distill take it in their Runtime (with --quiet), run in its config;
    evaluate as an argument."""
    got = {}

    def stop(name):
        def call(*a, **k):
            got[name] = a
            raise KeyboardInterrupt  # the call is what is checked; cli.main answers 130
        return call
    for name in ("train_file", "record_file", "reconstruct_file", "distill_file", "run", "evaluate_file"):
        monkeypatch.setattr(cli_commands, name, stop(name))
    argvs = {"train_file": ["train"], "record_file": ["record", "--teacher", "t"],
             "reconstruct_file": ["reconstruct", "--teacher", "t"], "distill_file": ["distill", "--synthetic", "s",
                                                                                      "--out", "o"],
             "run": ["run"], "evaluate_file": ["evaluate", "m"]}
    for name, argv in argvs.items():
        assert cli.main([*argv, "--device", "auto", "--quiet"]) == 130
        a = got[name]
        if name not in ("run", "evaluate_file"):  # the verb's Runtime, made from its flags
            (rt,) = [x for x in a if isinstance(x, Runtime)]
            assert rt.progress is False and rt is a[-1]
        device = a[-1] if name == "evaluate_file" else next(x for x in a if hasattr(x, "device")).device
        assert device == str(torch.device("cuda" if torch.cuda.is_available() else "cpu")) or device.startswith("cuda")


@pytest.mark.parametrize("verb", ["train", "record", "reconstruct", "distill"])
def test_how_a_verb_runs_is_its_runtime_from_the_runtime_fields(verb):
    """``Runtime`` (device, progress, rank) is no method config's: its fields make the run-wide flags
    (``--device``, ``--quiet``; reconstruct also ``--rank``, ``--world-size``) with the fields' defaults and
    help, the defaults make ``Runtime()``, and a value given reaches its field."""
    names = {"device", "progress"} | ({"rank", "world_size"} if verb == "reconstruct" else set())
    sub, argv = _sub(verb), REQUIRED.get(verb, [])
    for f in fields(Runtime):
        assert f.metadata.get("help"), f.name
        action = sub._option_string_actions.get(flag(f))
        assert (action is not None) == (f.name in names), (verb, f.name)
        if action is not None and not isinstance(action, argparse._StoreTrueAction):
            assert action.default == f.default, (verb, f.name)
    assert cli_commands.runtime_of(sub.parse_args(argv)) == Runtime()
    given = ["--quiet", "--device", "meta"] + (["--rank", "1", "--world-size", "3"] if verb == "reconstruct" else [])
    want = Runtime(device="meta", progress=False, **({"rank": 1, "world_size": 3} if verb == "reconstruct" else {}))
    assert cli_commands.runtime_of(sub.parse_args(argv + given)) == want
