"""The guidance methods and their user-facing options: one description that the CLI flags, the demo's controls and
the PNG ``parameters`` keys are all built from.

This module imports nothing heavy (no torch): ``unsee --help`` builds its guidance flags from it. A method is
registered with one :class:`MethodEntry` in :data:`METHODS` (its class is imported only when an object is built).
Each :class:`Option` maps one constructor field to a CLI flag (``--pag``), a generate option name (``pag``, also
the keyword the CLI and the PNG reader use) and a PNG key (``PAG scale``); each :class:`Control` maps a demo
widget to a field, with the value that turns the method off.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional


class OptionError(ValueError):
    """A CLI or demo value a method cannot take (the interfaces turn it into their own error)."""


@dataclass(frozen=True)
class Option:
    """One CLI flag / generate option / PNG key for a constructor field.

    kind: "float", "int", "str", "choice", "floats" (comma-separated numbers) or "layers" (comma-separated names).
    low/high: the CLI's inclusive range (each number, for "floats"; count: 1 to ``count`` of them).
    switches_on: giving this option turns the method on (PAG's layers alone do not).
    exclusive: options of one method with the same name here are mutually exclusive on the command line.
    """

    dest: str
    field: str
    key: str
    kind: str
    help: str
    low: float = -math.inf
    high: float = math.inf
    metavar: Optional[str] = None
    choices: tuple = ()
    default: Any = None
    count: int = 1
    switches_on: bool = True
    exclusive: Optional[str] = None

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    def to_field(self, value: Any) -> Any:
        if self.kind == "layers":
            return tuple(part for part in str(value).split(",") if part)
        if self.kind == "floats":
            return tuple(float(v) for v in value)
        return value

    def from_field(self, value: Any) -> Any:
        """The option's value for a method's field value (None stays None)."""
        if value is None:
            return None
        if self.kind == "layers":
            return ",".join(value)
        if self.kind == "floats":
            return tuple(float(v) for v in value)
        if self.kind == "float":
            return float(value)
        return value


@dataclass(frozen=True)
class Control:
    """One demo widget: ``name`` is the demo's argument, ``widget`` "slider", "text" or "dropdown".

    off: the value that leaves the method out; low/high/step: the slider's range; label: the widget's label;
    what: the value's name in error messages.
    """

    name: str
    field: str
    widget: str
    label: str
    what: str
    default: Any
    off: Any = None
    low: float = 0.0
    high: float = 1.0
    step: float = 0.05
    choices: tuple = ()
    placeholder: str = ""


@dataclass(frozen=True)
class MethodEntry:
    """A registered guidance method: its class (``module:Class``), its options and its demo controls.

    demo_fields: turns the demo's checked control values into constructor fields (None: the method is off); the
    default keeps a method whose controls are not all at their ``off`` value, with those fields.
    """

    target: str
    options: tuple[Option, ...] = ()
    controls: tuple[Control, ...] = ()
    demo_fields: Optional[Callable[[dict], Optional[dict]]] = None

    @property
    def name(self) -> str:
        return self.target.rpartition(":")[2]

    def load(self) -> type:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    def from_options(self, values: Mapping[str, Any]) -> Optional[Any]:
        """The method the CLI options ask for (``values``: dest -> value, None when not given), or None."""
        if not any(values.get(o.dest) is not None for o in self.options if o.switches_on):
            return None
        fields = {o.field: o.to_field(values[o.dest]) for o in self.options if values.get(o.dest) is not None}
        return self.load()(**fields)

    def options_of(self, method: Any) -> dict[str, Any]:
        """The generate options that give ``method`` (the inverse of :meth:`from_options`)."""
        return {o.dest: o.from_field(getattr(method, o.field)) for o in self.options}

    def from_controls(self, values: Mapping[str, Any]) -> Optional[Any]:
        """The method the demo's controls ask for (``values``: control name -> checked value), or None."""
        mine = {c.name: values[c.name] for c in self.controls if c.name in values}
        if self.demo_fields is not None:
            fields = self.demo_fields(mine)
        elif all(mine.get(c.name, c.off) == c.off for c in self.controls):
            fields = None
        else:
            fields = {c.field: mine[c.name] for c in self.controls if c.name in mine}
        return None if fields is None else self.load()(**fields)


def _negative_steer_demo(values: dict) -> Optional[dict]:
    """The demo's "negative steering" dropdown and start slider: the slider is the start fraction, except in the
    adaptive mode, which detects its own start."""
    mode = values.get("negative_mode", "off")
    if mode == "off":
        return None
    return {"mode": mode, "start_fraction": None if mode == "adaptive" else values.get("negative_start")}


NEGATIVE_MODES = ("fixed", "adaptive", "dng")

METHODS: tuple[MethodEntry, ...] = (
    MethodEntry(
        "unsee.guidance.cfgpp:CFGpp",
        options=(Option("cfgpp", "lam", "CFGpp lambda", "float", "CFG++ with this lambda in [0, 1] (replaces CFG)",
                        0.0, 1.0, metavar="LAMBDA"),),
        controls=(Control("cfgpp", "lam", "slider", "CFG++ λ (replaces CFG)", "CFG++ lambda", 0.0, off=0.0),),
    ),
    MethodEntry(
        "unsee.guidance.pag:PAG",
        options=(Option("pag", "scale", "PAG scale", "float", "perturbed-attention guidance scale, 0 to 100", 0.0, 100.0,
                        metavar="SCALE"),
                 Option("pag_layers", "layers", "PAG layers", "layers", "comma-separated PAG layers (default: mid)",
                        default="mid", switches_on=False)),
        controls=(Control("pag", "scale", "slider", "PAG scale", "PAG scale", 0.0, off=0.0, high=10.0, step=0.5),),
    ),
    MethodEntry(
        "unsee.guidance.fdg:FDG",
        options=(Option("fdg", "scales", "FDG scales", "floats",
                        "frequency-decoupled guidance scales per band (1 to 8 bands, each 0 to 100)", 0.0, 100.0,
                        metavar="HIGH,...,LOW", count=8),),
        controls=(Control("fdg", "scales", "text", "FDG scales, high to low frequency (replaces CFG)", "FDG scales", "",
                          off=None, low=1.0, high=30.0, placeholder="10, 5"),),
    ),
    MethodEntry(
        "unsee.guidance.negative:NegativeSteer",
        options=(Option("negative_start_fraction", "start_fraction", "Negative start fraction", "float",
                        "delay the negative prompt to this fraction of the steps, 0 to 1 (1: never); default 0.2 in "
                        "fixed mode, step 0 in dng mode, not with adaptive", 0.0, 1.0, metavar="FRACTION",
                        exclusive="negative_start"),
                 Option("negative_start_step", "start_step", "Negative start step", "int",
                        "delay the negative prompt to this 0-based step, 0 to 1000", 0, 1000, metavar="STEP",
                        exclusive="negative_start"),
                 Option("negative_mode", "mode", "Negative mode", "choice",
                        "negative steering mode: fixed start, adaptive (start detected per image), or dng (Dynamic "
                        "Negative Guidance); default fixed when a start is given. Without any negative steering flag "
                        "the negative prompt acts from the first step, as in diffusers", choices=NEGATIVE_MODES)),
        controls=(Control("negative_mode", "mode", "dropdown", "Negative steering", "negative steering mode", "off",
                          off="off", choices=("off",) + NEGATIVE_MODES),
                  Control("negative_start", "start_fraction", "slider", "Negative start (fraction; fixed and DNG modes)",
                          "negative start", 0.3)),
        demo_fields=_negative_steer_demo,
    ),
    MethodEntry(
        "unsee.guidance.nasa:NASA",
        options=(Option("nasa", "alpha", "NASA alpha", "float",
                        "NASA: subtract the negative prompt inside cross-attention (alpha 0 to 10)", 0.0, 10.0,
                        metavar="ALPHA"),),
        controls=(Control("nasa", "alpha", "slider", "NASA α (uses the negative prompt)", "NASA alpha", 0.0, off=0.0),),
    ),
    MethodEntry(
        "unsee.guidance.nag:NAG",
        options=(Option("nag", "scale", "NAG scale", "float",
                        "NAG: normalized attention guidance away from the negative prompt, scale 1 (off) to 20", 1.0,
                        20.0, metavar="SCALE"),),
        controls=(Control("nag", "scale", "slider", "NAG scale (1: off; uses the negative prompt)", "NAG scale", 1.0,
                          off=1.0, low=1.0, high=10.0, step=0.5),),
    ),
)


def entry_for(method: Any) -> Optional[MethodEntry]:
    """The registry entry of a guidance object (by class name), or None."""
    name = type(method).__name__
    return next((entry for entry in METHODS if entry.name == name), None)


def options() -> list[Option]:
    """Every registered option, in registry order."""
    return [option for entry in METHODS for option in entry.options]


def controls() -> list[Control]:
    """Every registered demo control, in registry order."""
    return [control for entry in METHODS for control in entry.controls]


def methods_from_options(values: Mapping[str, Any]) -> list:
    """The guidance objects that CLI option values (dest -> value) ask for, in registry order."""
    built = (entry.from_options(values) for entry in METHODS)
    return [method for method in built if method is not None]


def methods_from_controls(values: Mapping[str, Any]) -> list:
    """The guidance objects that the demo's (checked) control values ask for, in registry order."""
    built = (entry.from_controls(values) for entry in METHODS)
    return [method for method in built if method is not None]


def options_of(methods: Iterable[Any]) -> dict[str, Any]:
    """The generate options that give these guidance objects; OptionError for a method without options."""
    values: dict[str, Any] = {}
    for method in methods:
        entry = entry_for(method)
        if entry is None:
            raise OptionError(f"{type(method).__name__} guidance has no key in the parameters text")
        values.update(entry.options_of(method))
    return values
