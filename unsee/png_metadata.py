"""Generation settings in PNG files, in AUTOMATIC1111's ``parameters`` text chunk ("infotext").

The text is the one A1111, Forge, ComfyUI readers and image sites show::

    a red circle on a gray background
    Negative prompt: blurry
    Steps: 25, Sampler: DDIM, CFG scale: 5.0, Seed: 7, Size: 32x32, Model: toy, PAG scale: 3.0, Version: unsee 0.1.0

Lines before the last are the prompt (several lines for a multi-line prompt), then, from the line that starts with
``Negative prompt:``, the negative prompt. The last line is ``Key: value`` pairs separated by commas; a value that
holds a comma, a colon, a quote, a line break, or spaces at its ends is written as a JSON string (as A1111 quotes
values), so it reads back exactly. A prompt that would not read back exactly from the lines (one with a line that
starts with ``Negative prompt:``, say) is repeated in a ``Prompt``/``Negative prompt`` key, which A1111 also reads.

unsee writes these keys (``unsee generate --from-png FILE`` reads them back, see :func:`generation_options`):

=============================  ===================================================================
``Steps``, ``CFG scale``,      as in A1111: ``--steps``, ``--guidance-scale``, ``--seed`` (the
``Seed``, ``Size``             image's own seed), ``--width`` x ``--height``
``Sampler``                    the scheduler (A1111's name where there is one, else diffusers' class)
``Model``, ``Model config``    ``--model`` and ``--config``; ``Dtype``: ``--dtype`` when given
``Batch size``, ``Batch pos``  the image was number ``pos`` of a batch of ``size`` images of one prompt
                               (seeds ``Seed - pos`` onwards); omitted for a batch of one
``CFGpp lambda``, ``PAG        the guidance flags ``--cfgpp``, ``--pag``, ``--pag-layers``, ``--fdg``,
scale``, ``PAG layers``,       ``--negative-mode``, ``--negative-start-fraction``,
``FDG scales``, ``Negative     ``--negative-start-step``, ``--nasa``, ``--nag`` (each method's keys
mode``, ``Negative start       are declared once, in ``unsee.guidance.registry``)
fraction``, ``Negative start
step``, ``NASA alpha``, ``NAG
scale``
``Adapter N``, ``Adapter N     the N-th ``--adapter FILE:SCALE``, and the first 12 hex digits of the
hash``                         file's SHA-256 (files up to 1 GiB)
``Version``                    ``unsee X.Y.Z``
=============================  ===================================================================

This module is pure (text in, text out) apart from :func:`read_parameters` and :func:`file_hash`, which read files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from unsee.guidance import registry

__all__ = ["PARAMETERS_KEY", "MetadataError", "Infotext", "quote", "format_parameters", "parse_parameters",
           "generation_parameters", "generation_options", "guidance_options", "sampler_name", "file_hash",
           "png_info", "read_parameters"]

PARAMETERS_KEY = "parameters"  # the PNG text chunk A1111 writes and reads
NEGATIVE_PREFIX = "Negative prompt:"
HASH_LIMIT = 2**30  # adapters larger than this are not hashed (reading them would cost seconds)
MAX_TEXT = 1_000_000  # characters of a parameters text that are read at all

# diffusers scheduler class -> A1111's sampler name (the ones with an unambiguous match)
_SAMPLERS = {
    "DDIMScheduler": "DDIM", "PNDMScheduler": "PLMS", "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a", "LMSDiscreteScheduler": "LMS", "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2", "KDPM2AncestralDiscreteScheduler": "DPM2 a", "UniPCMultistepScheduler": "UniPC",
    "DDPMScheduler": "DDPM", "LCMScheduler": "LCM",
}

# key -> (generate option, kind), from the guidance methods' registry; the order is the order they are written in
_KINDS = {"float": float, "int": int, "str": str, "choice": str, "layers": str, "floats": "floats"}
_OPTION_KEYS = {option.key: (option.dest, _KINDS[option.kind]) for option in registry.options()}
_KEY = re.compile(r"\s*(\w[\w \-/]*?)\s*:\s*")
_ADAPTER_KEY = re.compile(r"Adapter (\d{1,3})")


class MetadataError(ValueError):
    """A parameters text that cannot be read, or a setting in it that is not valid."""


@dataclass
class Infotext:
    """A parsed ``parameters`` text: the prompt, the negative prompt (None when there is no ``Negative prompt:``
    line), and the ``Key: value`` settings of the last line, unquoted, in their order."""

    prompt: str
    negative_prompt: Optional[str] = None
    settings: dict[str, str] = field(default_factory=dict)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same float
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return str(value)


def quote(value: Any) -> str:
    """``value`` as written after ``Key: ``: as it is, or as a JSON string when it would not read back otherwise."""
    text = _text(value)
    if text == "" or text != text.strip() or any(c in text for c in ',:"\n\r'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _settings_line(settings: Mapping[str, Any]) -> str:
    parts = []
    for key, value in settings.items():
        if value is None:
            continue
        if not re.fullmatch(r"\w[\w \-/]*", key) or key != key.strip():
            raise MetadataError(f"{key!r} cannot be a key of the parameters text (letters, digits, spaces, - and /)")
        parts.append(f"{key}: {quote(value)}")
    return ", ".join(parts)


def format_parameters(prompt: str, negative_prompt: Optional[str], settings: Mapping[str, Any]) -> str:
    """The ``parameters`` text of an image: the prompt, the negative prompt (a ``Negative prompt:`` line when it is
    not None) and one line of ``Key: value`` settings (None values are left out). Reads back exactly with
    :func:`parse_parameters`."""
    settings = {k: v for k, v in settings.items() if k not in ("Prompt", "Negative prompt")}
    if not any(v is not None for v in settings.values()):
        raise MetadataError("the parameters text needs at least one setting (Steps, Seed, ...)")
    body = prompt if negative_prompt is None else f"{prompt}\n{NEGATIVE_PREFIX} {negative_prompt}"
    text = f"{body}\n{_settings_line(settings)}"
    parsed = parse_parameters(text)
    exact: dict[str, Any] = {}
    if parsed.prompt != prompt:  # e.g. a prompt line that starts with "Negative prompt:"
        exact["Prompt"] = prompt
    if parsed.negative_prompt != negative_prompt:
        exact.update({"Negative prompt": negative_prompt} if negative_prompt is not None
                     else {"No negative prompt": True})
    if exact:
        text = f"{body}\n{_settings_line({**settings, **exact})}"
    return text


def _parse_settings(line: str) -> Optional[dict[str, str]]:
    """The ``Key: value, ...`` pairs of ``line``, or None when it is not such a line."""
    settings: dict[str, str] = {}
    position, decoder = 0, json.JSONDecoder()
    while position < len(line):
        match = _KEY.match(line, position)
        if match is None:  # A1111 writes a setting whose value is its key as the bare key ("Hires upscale")
            bare = re.compile(r"\s*(\w[\w \-/]*?)\s*(?:,|$)").match(line, position)
            if bare is None:
                return None
            settings[bare.group(1)] = bare.group(1)
            position = bare.end()
            continue
        key, position = match.group(1), match.end()
        if line.startswith('"', position):
            try:
                value, position = decoder.raw_decode(line, position)
            except ValueError:
                return None
            if not isinstance(value, str):
                return None
        else:
            end = line.find(",", position)
            end = len(line) if end < 0 else end
            value, position = line[position:end].strip(), end
        rest = line[position:].lstrip(" ")
        if rest and not rest.startswith(","):
            return None
        position = len(line) - len(rest) + (1 if rest else 0)
        settings[key] = value
    return settings or None


def parse_parameters(text: str) -> Infotext:
    """Read a ``parameters`` text (unsee's or A1111's). A text whose last line is not ``Key: value`` pairs is all
    prompt (``settings`` empty)."""
    if not isinstance(text, str):
        raise MetadataError(f"the parameters text must be text, got {type(text).__name__}")
    text = text[:MAX_TEXT].rstrip("\n")
    *lines, last = text.split("\n")
    settings = _parse_settings(last)
    if settings is None or len(settings) < 3:  # as A1111 decides: fewer than three pairs is a line of the prompt
        lines, settings = [*lines, last], {}
    prompt_lines: list[str] = []
    negative_lines: Optional[list[str]] = None
    for line in lines:
        if negative_lines is None and line.startswith(NEGATIVE_PREFIX):
            rest = line[len(NEGATIVE_PREFIX):]
            negative_lines = [rest[1:] if rest.startswith(" ") else rest]
        elif negative_lines is not None:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    prompt = "\n".join(prompt_lines)
    negative = None if negative_lines is None else "\n".join(negative_lines)
    if "Prompt" in settings:
        prompt = settings.pop("Prompt")
    if "Negative prompt" in settings:
        negative = settings.pop("Negative prompt")
    if settings.pop("No negative prompt", None) == "true":
        negative = None
    return Infotext(prompt, negative, settings)


# ----------------------------------------------------------------------------------------------
# Generation settings <-> keys
# ----------------------------------------------------------------------------------------------


def sampler_name(scheduler: Any) -> str:
    """A scheduler's name in the text: A1111's sampler name where one matches, else diffusers' class name."""
    name = scheduler if isinstance(scheduler, str) else type(scheduler).__name__
    return _SAMPLERS.get(name, name)


def guidance_options(methods: Iterable[Any]) -> dict[str, Any]:
    """The ``unsee generate`` options (``cfgpp``, ``pag``, ``pag_layers``, ``fdg``, ``negative_mode``,
    ``negative_start_fraction``, ``negative_start_step``, ``nasa``, ``nag``: the options of
    ``unsee.guidance.registry``) that give these guidance objects."""
    try:
        return registry.options_of(methods)
    except registry.OptionError as error:
        raise MetadataError(str(error)) from None


def generation_parameters(
    *, prompt: str, negative_prompt: Optional[str], steps: int, guidance_scale: float, seed: int, width: int,
    height: int, model: Optional[str] = None, sampler: Optional[str] = None, guidance: Mapping[str, Any] = {},
    adapters: Sequence[tuple[str, float, Optional[str]]] = (), batch_size: int = 1, batch_pos: int = 0,
    model_config: Optional[str] = None, dtype: Optional[str] = None, version: Optional[str] = None,
) -> str:
    """The ``parameters`` text of one generated image. ``guidance``: generate options as :func:`guidance_options`
    gives them; ``adapters``: (file, scale, hash or None) each."""
    settings: dict[str, Any] = {
        "Steps": int(steps), "Sampler": sampler, "CFG scale": float(guidance_scale), "Seed": int(seed),
        "Size": f"{int(width)}x{int(height)}", "Model": model, "Model config": model_config, "Dtype": dtype,
    }
    if batch_size > 1:
        settings.update({"Batch size": int(batch_size), "Batch pos": int(batch_pos)})
    options = {option: key for key, (option, _) in _OPTION_KEYS.items()}
    unknown = sorted(set(guidance) - set(options))
    if unknown:
        raise MetadataError(f"no key for the guidance option(s) {', '.join(unknown)}")
    for key, (option, _) in _OPTION_KEYS.items():
        settings[key] = guidance.get(option)
    for number, (path, scale, digest) in enumerate(adapters, start=1):
        settings[f"Adapter {number}"] = f"{path}:{_text(float(scale))}"
        settings[f"Adapter {number} hash"] = digest
    settings["Version"] = f"unsee {version}" if version else None
    return format_parameters(prompt, negative_prompt, settings)


def _number(key: str, text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except (TypeError, ValueError, OverflowError):
        value = None
    if value is None or (kind is float and value != value) or (kind is int and str(value) != text.strip()):
        what = "a whole number" if kind is int else "a number"
        raise MetadataError(f"{key} must be {what}, got {text[:40]!r}")
    return value


def generation_options(info: Infotext) -> dict[str, Any]:
    """The ``unsee generate`` options an image's text gives, typed but not range-checked: ``prompt``,
    ``negative``, ``steps``, ``guidance_scale``, ``seed``, ``width``, ``height``, ``model``, ``config``, ``dtype``,
    ``sampler``, ``batch_size``, ``batch_pos``, the guidance options and ``adapters`` ([(file, scale, hash or None)]).
    Options the text does not hold are absent. Raises :class:`MetadataError` for a text without settings, one
    without Steps and Seed, or a value that is not what its key needs."""
    settings = info.settings
    if not settings:
        raise MetadataError("it has no settings line (Steps: ..., Seed: ..., Size: ...)")
    missing = [key for key in ("Steps", "Seed") if key not in settings]
    if missing:
        raise MetadataError(f"its settings line has no {' and no '.join(missing)}")
    if not info.prompt.strip():
        raise MetadataError("its prompt is empty")
    options: dict[str, Any] = {"prompt": info.prompt, "negative": info.negative_prompt}
    options["steps"] = _number("Steps", settings["Steps"], int)
    options["seed"] = _number("Seed", settings["Seed"], int)
    if "CFG scale" in settings:
        options["guidance_scale"] = _number("CFG scale", settings["CFG scale"], float)
    if "Size" in settings:
        match = re.fullmatch(r"\s*(\d{1,6})\s*x\s*(\d{1,6})\s*", settings["Size"])
        if match is None:
            raise MetadataError(f"Size must be WIDTHxHEIGHT, such as 512x512, got {settings['Size'][:40]!r}")
        options["width"], options["height"] = int(match[1]), int(match[2])
    for key, option in (("Model", "model"), ("Model config", "config"), ("Dtype", "dtype"), ("Sampler", "sampler")):
        if key in settings:
            options[option] = settings[key]
    if "Batch size" in settings:
        options["batch_size"] = _number("Batch size", settings["Batch size"], int)
        options["batch_pos"] = _number("Batch pos", settings.get("Batch pos", "0"), int)
        if not 0 <= options["batch_pos"] < options["batch_size"]:
            raise MetadataError(f"Batch pos {options['batch_pos']} is not inside a batch of {options['batch_size']}")
    for key, (option, kind) in _OPTION_KEYS.items():
        if key not in settings:
            continue
        if kind == "floats":
            options[option] = tuple(_number(key, part, float) for part in settings[key].split(","))
        elif kind is str:
            options[option] = settings[key]
        else:
            options[option] = _number(key, settings[key], kind)
    adapters = []
    numbers = sorted(int(m[1]) for m in map(_ADAPTER_KEY.fullmatch, settings) if m is not None)
    for number in numbers:
        spec = settings[f"Adapter {number}"]
        path, _, scale = spec.rpartition(":")
        if not path:
            raise MetadataError(f"Adapter {number} must be FILE:SCALE, got {spec[:60]!r}")
        adapters.append((path, _number(f"Adapter {number}'s scale", scale, float),
                         settings.get(f"Adapter {number} hash")))
    if adapters:
        options["adapters"] = adapters
    return options


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def file_hash(path: Union[str, os.PathLike], limit: int = HASH_LIMIT) -> Optional[str]:
    """The first 12 hex digits of a file's SHA-256, or None for a file larger than ``limit`` bytes."""
    path = Path(path)
    if path.stat().st_size > limit:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def png_info(text: str) -> Any:
    """A ``PIL.PngImagePlugin.PngInfo`` holding ``text`` as the ``parameters`` chunk (pass it as ``pnginfo=``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, text)  # tEXt for Latin-1 text, iTXt (UTF-8) otherwise
    return info


def read_parameters(path: Union[str, os.PathLike]) -> str:
    """The ``parameters`` text of a PNG file. Raises :class:`MetadataError` (a one-line reason) for a file that is
    missing, not a PNG, or without the chunk."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MetadataError("no such file")
    try:
        with Image.open(path) as image:
            kind = image.format
            image.load()  # text chunks after the image data are read with it
            text = image.info.get(PARAMETERS_KEY)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        reason = str(error).splitlines()[0][:80] if str(error) else type(error).__name__
        raise MetadataError(f"cannot be read as an image ({reason})") from None
    if kind != "PNG":
        raise MetadataError(f"is a {kind or 'non-PNG'} image, not a PNG")
    if text is None:
        raise MetadataError(f"has no '{PARAMETERS_KEY}' text chunk (it was not written by unsee generate or "
                            "AUTOMATIC1111)")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return str(text)
