"""Erasure methods by name: each trainer registers itself, the CLI, the demo and the job runner read :data:`METHODS`.

    @register_method("salun", summary="SalUn: saliency-masked fine-tuning that relabels the concept")
    class SalUnTrainer(SaliencyMaskedTrainer):
        config_class = SalUnConfig
        ...

    trainer = make_trainer("salun", concept="circle", steps="200", lr="1e-5")  # YAML/CLI text is coerced

A trainer class may register under several names, each fixing some of its config's fields: decorators stack, and
ESD registers each variant with ``register_method(variant, summary=..., fixed={"variant": variant})(ESDTrainer)``.
Adding a method is one file (its config, its trainer) and this one registration line.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, TypeVar

from .errors import ConfigError
from .trainer import Trainer

__all__ = ["Method", "METHODS", "register_method", "make_trainer", "config_fields", "coerce"]

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Method:
    """One registered erasure method."""

    name: str  # the CLI/job name, e.g. "esd-x"
    trainer: type  # the Trainer subclass
    config: type  # its TrainerConfig subclass
    summary: str  # one line for help texts and the demo
    fixed: Mapping[str, Any] = field(default_factory=dict)  # config fields this name fixes, e.g. {"variant": "esd-x"}


#: method name -> :class:`Method`, in registration order (the order of the help texts and the demo)
METHODS: dict[str, Method] = {}


def register_method(name: str, *, summary: str, fixed: Optional[Mapping[str, Any]] = None) -> Callable[[T], T]:
    """Class decorator: register a :class:`~unsee.erasure.Trainer` subclass as the method ``name``.

    The trainer's config class is its ``config_class`` attribute; ``fixed`` names config fields that this name sets
    (a user setting of them is overridden). Decorators stack: one class may register several names.
    """

    def decorate(trainer: T) -> T:
        if not (isinstance(trainer, type) and issubclass(trainer, Trainer)):
            raise TypeError(f"register_method({name!r}) decorates a Trainer subclass, got {trainer!r}")
        config = getattr(trainer, "config_class", None)
        if config is None:
            raise TypeError(f"{trainer.__name__} has no config_class; set it to its TrainerConfig subclass")
        known = config_fields(config)
        for key in fixed or {}:
            if key not in known:
                raise TypeError(f"register_method({name!r}) fixes {key!r}, which {config.__name__} lacks")
        existing = METHODS.get(name)
        if existing is not None and existing.trainer.__qualname__ != trainer.__qualname__:
            raise ValueError(f"method {name!r} is registered already (by {existing.trainer.__qualname__})")
        METHODS[name] = Method(name=name, trainer=trainer, config=config, summary=summary,
                               fixed=dict(fixed or {}))
        return trainer

    return decorate


def config_fields(config_class: type) -> dict[str, Any]:
    """A config dataclass's fields: name -> type hint."""
    hints = typing.get_type_hints(config_class)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(config_class)}


def coerce(name: str, value: Any, hint: Any) -> Any:
    """YAML reads ``1e-5`` as a string and JSON has no ints vs floats: turn numbers into what the field holds."""
    args = typing.get_args(hint) or (hint,)
    if float in args and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if int in args and isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    if int in args and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def make_trainer(method: str, **settings: Any) -> Trainer:
    """A trainer for ``method`` (``esd-u``, ``salun``...) with ``settings`` as its config's fields.

    Text and whole-number floats (from YAML, JSON or the command line) become the numbers the fields hold; every
    value is checked by the config (limits included) before anything is built. Raises
    :class:`~unsee.erasure.ConfigError` for an unknown method or setting, or an invalid value.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    entry = METHODS[method]
    fields = config_fields(entry.config)
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ConfigError(f"{method} has no setting {unknown[0]!r}; its settings are: {', '.join(sorted(fields))}")
    values = {k: coerce(k, v, fields[k]) for k, v in settings.items()}
    values.update(entry.fixed)
    try:
        config = entry.config(**values)
    except TypeError as error:
        raise ConfigError(str(error)) from None
    return entry.trainer(config)
