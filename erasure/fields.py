"""Trainer settings that check themselves: each config field is declared with the kind of value it holds.

Like peft's ``LoraConfig``, whose fields carry their own documentation, a trainer config declares each field
with :func:`setting`, which attaches a :class:`Kind` to the dataclass field (its ``metadata``)::

    @dataclass
    class ESDConfig(TrainerConfig):
        eta: float = setting(1.0, NUMBER, label="negative guidance")
        ddim_steps: int = setting(50, DDIM_STEPS)

:meth:`~unsee.erasure.TrainerConfig.validate` checks every field with its kind, in declaration order (a subclass
that only changes a default, ``steps: int = 500``, keeps the kind its base class declared), then the checks a
config makes across its fields. A bad value's message is always ``"<field> must be <the kind's requirement>, got
<value>"``: ``"rank must be a positive integer, got 0"``. Kinds for the settings that cost time or memory carry
limits (``steps`` 1..100000, ``rank`` 1..1024, ...: ``"steps must be from 1 to 100000, got 1000000000000"``);
every other number must be at most :data:`MAX_NUMBER` in size. One kind per sort of value, shared by every method:
a method adds a field in one line, and its checks come with it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import ConfigError

__all__ = ["Kind", "setting", "check_settings", "declared_kind", "setting_limits", "canonical_dtype", "MAX_NUMBER",
           "integer", "number", "per_concept", "choice", "prompt_list", "TEXT", "NUMBER", "FLAG", "FRACTION", "ERASE_FROM", "DEVICE",
           "DTYPE", "SEEDS", "RANK", "LORA_ALPHA", "OUTPUT_KIND", "LOSS_SPACE", "RESOLUTION", "DDIM_STEPS",
           "BATCH_SIZE", "GUIDANCE"]

#: the size bound of a number setting without limits of its own
MAX_NUMBER = 1e6


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_prompt_list(value: Any, allow_empty: bool = False, allow_blank: bool = False) -> bool:
    """A list or tuple (not a text) of prompts: non-empty unless ``allow_empty``, each a non-blank text unless
    ``allow_blank``."""
    return (isinstance(value, (list, tuple)) and (allow_empty or len(value) > 0)
            and all(isinstance(p, str) and (allow_blank or p.strip()) for p in value))


def shown(value: Any, short: bool = False) -> str:
    """A value as an error message shows it (``short``: at most 60 characters)."""
    if is_int(value) and abs(value) >= 10**30:
        return "a number of more than 30 digits"
    text = repr(value)
    return text[:57] + "..." if short and len(text) > 60 else text


@dataclass(frozen=True)
class Kind:
    """What a setting may hold.

    ``accepts`` says whether a value fits and ``requirement`` says the same in words (``"a positive integer"``);
    ``normalise`` gives the value the config keeps (a tuple for a list, ``"bfloat16"`` for ``"bf16"``); ``limits``
    bounds (inclusive) every number in the value.
    """

    requirement: str
    accepts: Callable[[Any], bool]
    normalise: Optional[Callable[[Any], Any]] = None
    limits: Optional[tuple[int, int]] = None
    message: str = "{name} must be {requirement}, got {value}"
    #: a list holds one value per erased concept (:func:`per_concept`)
    per_concept: bool = False

    def check(self, name: str, value: Any, label: str = "", says: str = "") -> Any:
        """The value to keep, or :class:`ConfigError` naming the setting (``label``: its meaning in words)."""
        if not self.accepts(value):
            subject = f"{name} ({label})" if label else name
            raise ConfigError(self.message.format(name=subject, requirement=says or self.requirement,
                                                  value=shown(value)))
        if self.normalise is not None:
            value = self.normalise(value)
        check_size(name, value, self.limits)
        return value

    def with_limits(self, low: int, high: int) -> "Kind":
        return dataclasses.replace(self, limits=(low, high))


def check_size(name: str, value: Any, limits: Optional[tuple[int, int]] = None) -> None:
    """Refuse non-finite numbers, numbers outside ``limits``, and without limits numbers above :data:`MAX_NUMBER`
    in size; in a list, each of its numbers."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{name} must be a finite number, got {item!r}")
        if limits is not None:
            low, high = limits
            if not low <= item <= high:
                raise ConfigError(f"{name} must be from {low} to {high}, got {shown(item, short=True)}")
        elif abs(item) > MAX_NUMBER:
            raise ConfigError(f"{name} must be at most {MAX_NUMBER:g} in size, got {shown(item, short=True)}")


# ----------------------------------------------------------------------------------------------
# Declaring and checking
# ----------------------------------------------------------------------------------------------


def setting(default: Any, kind: Kind, *, label: str = "", says: str = "") -> Any:
    """A config field holding ``kind``, ``default`` unless given (a list default is copied for each config).

    ``label`` is the setting's meaning, shown after its name in messages (``"lr (learning rate) must be..."``);
    ``says`` replaces the kind's requirement in messages where the setting needs more words.
    """
    metadata = {"kind": kind, "label": label, "says": says}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _declaration(cls: type, name: str) -> dataclasses.Field:
    """The field ``name`` as declared with :func:`setting`: in ``cls``, or in the base class that declared it."""
    for klass in cls.__mro__:
        declared = vars(klass).get("__dataclass_fields__", {}).get(name)
        if declared is not None and "kind" in declared.metadata:
            return declared
    raise TypeError(f"{cls.__name__}.{name} is declared without a kind; declare it with "
                    f"unsee.erasure.fields.setting(default, kind)")


def declared_kind(cls: type, name: str) -> Kind:
    """The :class:`Kind` of the setting ``name`` of the config class ``cls``."""
    return _declaration(cls, name).metadata["kind"]


def check_settings(config: Any) -> None:
    """Check every field of a config dataclass with its kind, in declaration order; normalised values are kept."""
    for f in dataclasses.fields(config):
        declared = _declaration(type(config), f.name)
        value = declared.metadata["kind"].check(f.name, getattr(config, f.name), declared.metadata["label"],
                                                declared.metadata["says"])
        setattr(config, f.name, value)


def setting_limits(cls: type) -> dict[str, tuple[int, int]]:
    """The bounded settings of the config class ``cls``: name -> (lowest, highest), inclusive."""
    return {f.name: kind.limits for f in dataclasses.fields(cls) if (kind := declared_kind(cls, f.name)).limits}


# ----------------------------------------------------------------------------------------------
# Kinds
# ----------------------------------------------------------------------------------------------


def integer(low: int, *, none: bool = False, limits: Optional[tuple[int, int]] = None) -> Kind:
    """A whole number >= ``low`` (``none``: or None)."""
    words = {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer >= {low}")
    return Kind(words + (" or None" if none else ""),
                lambda v: (none and v is None) or (is_int(v) and v >= low), limits=limits)


def number(*, low: Optional[float] = None, positive: bool = False, nonzero: bool = False, none: bool = False) -> Kind:
    """A finite number: any, ``>= low``, ``positive`` or ``nonzero`` (``none``: or None)."""
    if positive:
        words = "a positive number"
    elif low is not None:
        words = f"a number >= {low:g}"
    else:
        words = "a non-zero number" if nonzero else "a finite number"

    def accepts(v: Any) -> bool:
        if none and v is None:
            return True
        return (is_number(v) and (low is None or v >= low) and (not positive or v > 0)
                and (not nonzero or v != 0))

    return Kind(words + (" or None" if none else ""), accepts)


def per_concept(kind: Kind) -> Kind:
    """``kind``, or a non-empty list of such values, one per erased concept (kept as a tuple; the config checks
    that the list is as long as its concepts: :func:`unsee.erasure.config.check_per_concept`)."""

    def accepts(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return len(v) > 0 and all(not isinstance(x, (list, tuple)) and kind.accepts(x) for x in v)
        return kind.accepts(v)

    return Kind(f"{kind.requirement}, or a list of them with one per erased concept", accepts,
                normalise=lambda v: tuple(v) if isinstance(v, list) else v, limits=kind.limits, per_concept=True)


def choice(options: Sequence[str], message: Optional[str] = None) -> Kind:
    """One of ``options`` (``message``: a template with ``{value}`` instead of the usual one)."""
    options = tuple(options)
    return Kind(f"one of {', '.join(options)}", lambda v: isinstance(v, str) and v in options,
                message=message or Kind.message)


def prompt_list(*, allow_empty: bool = False, allow_blank: bool = False, none: bool = False,
                as_tuple: bool = False) -> Kind:
    """A list of prompts: non-empty unless ``allow_empty``, each a non-blank text unless ``allow_blank``; ``none``:
    or None; ``as_tuple``: kept as a tuple."""
    words = "a list" if allow_empty else "a non-empty list"
    words += " of prompts" if allow_blank else " of non-empty prompts"
    return Kind(words + (" or None" if none else ""),
                lambda v: (none and v is None) or is_prompt_list(v, allow_empty, allow_blank),
                normalise=(lambda v: v if v is None else tuple(v)) if as_tuple else None)


def canonical_dtype(value: Any) -> Optional[str]:
    """A dtype setting as ``"float32"``, ``"float16"`` or ``"bfloat16"`` (None stays None).

    Accepts what the CLI's ``--dtype`` accepts (``fp32``, ``fp16``, ``bf16``, ``float16``...), torch's names as
    text (``"torch.bfloat16"``, ``"half"``) and ``torch.dtype`` objects; anything else raises :class:`ConfigError`.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        for name, dtype in DTYPES.items():
            if value == dtype:
                return name
    elif isinstance(value, str):
        key = value.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key in DTYPE_ALIASES:
            return DTYPE_ALIASES[key]
    raise ConfigError(f"dtype must be float32, float16 or bfloat16 (also fp32, fp16, bf16, torch.bfloat16...) or "
                      f"None, got {value!r}")


def _is_device(value: Any) -> bool:
    if value is None:
        return True
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        return False
    return True


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# every spelling a trainer config accepts for ``dtype`` (the CLI's --dtype choices and torch's names), lower case
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float": "float32",
                 "float16": "float16", "fp16": "float16", "half": "float16",
                 "bfloat16": "bfloat16", "bf16": "bfloat16"}

TEXT = Kind("a non-empty text", lambda v: isinstance(v, str) and bool(v.strip()))
NUMBER = number()
FLAG = Kind("true or false", lambda v: isinstance(v, bool))
FRACTION = Kind("in (0, 1]", lambda v: is_number(v) and 0 < v <= 1)
DEVICE = Kind("'cpu', 'cuda', 'cuda:1', ... or None", _is_device)
DTYPE = Kind("float32, float16 or bfloat16", lambda v: True, normalise=canonical_dtype)
#: erase the concept in context: one prompt that names it, a list of them (one drawn per step), or None
ERASE_FROM = Kind("a non-empty text, a non-empty list of them, or None",
                  lambda v: v is None or (isinstance(v, str) and bool(v.strip())) or is_prompt_list(v),
                  normalise=lambda v: tuple(v) if isinstance(v, list) else v)
SEEDS = Kind("a non-empty list of non-negative integers",
             lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(is_int(s) and s >= 0 for s in v),
             limits=(0, 2**32 - 1))
GUIDANCE = number(low=0)  # a classifier-free guidance scale
RANK = integer(1, limits=(1, 1024))
LORA_ALPHA = number(nonzero=True, none=True)
OUTPUT_KIND = choice(("delta", "lora"))
LOSS_SPACE = choice(("output", "epsilon"))
RESOLUTION = integer(8, none=True, limits=(8, 4096))
DDIM_STEPS = integer(1, limits=(1, 1000))
BATCH_SIZE = integer(1, limits=(1, 256))
