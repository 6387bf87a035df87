"""The option flags of ``fxprune prune`` and ``inspect``, derived from :class:`~fxprune.options.PruneOptions`:
one flag per field (``round_to`` -> ``--round-to``) with its help, choices and checks, so the command line
can never drift from the API.

>>> parser = argparse.ArgumentParser()
>>> add_option_flags(parser)
>>> given_options(parser.parse_args(["--round-to", "8"]))
{'round_to': 8}
"""
from __future__ import annotations

import argparse
import typing
from collections import abc
from typing import Any, Callable, Sequence, Union

from fxprune.data.criteria import CRITERIA
from fxprune.errors import InvalidOptionError
from fxprune.options import PruneOptions, public_fields


#: Option flags every command takes (they shape the capture or the random model), the others ``prune`` only.
MODEL_FLAGS = ("capture", "seed")


def add_option_flags(parser: argparse.ArgumentParser, only: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
    """One flag per :class:`~fxprune.options.PruneOptions` field (``round_to`` -> ``--round-to``), with
    its help, choices and checks. A flag not given is absent from the namespace, so the option keeps
    its one default (see :func:`given_options`)."""
    hints = typing.get_type_hints(PruneOptions)
    for name, f in public_fields().items():
        if (only and name not in only) or name in exclude:
            continue
        route = "; hf: SPECs only" if f.metadata["route"] else ""  # fxprune.hf's options (PruneOptions)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": f"{f.metadata['help']} (default {_shown(f.default)}{route})"}
        if hints[name] is bool:
            kwargs["action"] = "store_true"
        elif hints[name] == Union[bool, str]:  # the flag alone is True, with a word that word
            kwargs.update(nargs="?", const=True, type=_option_value(name, str), metavar=f.metadata["metavar"],
                          choices=f.metadata["choices"])
        elif name == "ignore":
            kwargs.update(nargs="+", action="extend", metavar=f.metadata["metavar"])
        else:
            choices = CRITERIA if name == "criterion" else f.metadata["choices"]
            kwargs.update(type=_option_value(name, hints[name]), metavar=f.metadata["metavar"],
                          choices=choices or None)
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The option flags given on the command line, by option name."""
    given = {name: getattr(args, name) for name in public_fields() if hasattr(args, name)}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in given.items()}


def _shown(default: Any) -> str:
    return "none" if default in ((), None) else str(default).lower() if isinstance(default, bool) else str(default)


def _option_value(name: str, hint: Any) -> Callable[[str], Any]:
    """The flag's text as the option's value, checked by PruneOptions itself (one place)."""
    def parse(text: str) -> Any:
        try:
            value = _sparsity(text) if _takes_mapping(hint) else _number(text, hint)
            PruneOptions(**{name: value})
        except (InvalidOptionError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"bad {name.replace('_', ' ')} {text!r}: {exc}") from exc
        return value
    parse.__name__ = name.replace("_", "-")  # argparse names the type in its errors
    return parse


def _takes_mapping(hint: Any) -> bool:
    """``sparsity`` (a ratio or a mapping) and ``target`` (a mapping): written ``KEY=VALUE,...``."""
    args = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    return any(typing.get_origin(a) is abc.Mapping for a in args)


def _number(text: str, hint: Any) -> Any:
    if hint not in (int, float):
        return text
    try:
        return hint(text)
    except ValueError:
        raise ValueError(f"expected {'an integer' if hint is int else 'a number'}") from None


def _sparsity(text: str) -> Any:
    """``0.5``, or ``PATTERN=RATIO[,PATTERN=RATIO...]`` (module patterns, or HF config fields; a budget
    ``params=0.8``, ``active_params=0.8``, ``macs=0.5``)."""
    if "=" not in text:
        return _number(text, float)
    pairs = [item.rpartition("=") for item in text.split(",")]
    if any(not key or not sep for key, sep, _ in pairs):
        raise ValueError("expected a number or PATTERN=RATIO,...")
    return {key: _number(value, float) for key, _, value in pairs}
