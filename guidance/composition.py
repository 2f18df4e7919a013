"""Composition rules: which guidance methods can run together, read from each method's :class:`Contract`.

The rules (the README's composition table is :func:`composition_table`, and a test keeps the two equal):

1. every entry is an unsee guidance object whose fields are valid (a diffusers guider is wrapped in
   ``unsee.guidance.diffusers_guiders.DiffusersGuider``), and no method is given twice;
2. at most one method replaces CFG's combination of the conditional and unconditional predictions
   (without one, ``CFG(guidance_scale)`` combines);
3. at most one method replaces the scheduler step;
4. at most one method uses the negative prompt inside attention;
5. a method that needs a negative prompt gets one;
6. a method that needs the unconditional branch gets a combination whose scale is not 1.

:func:`plan` checks them and adds the default combination; the pipelines call it before any work.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .base import Contract, Guidance, GuidanceError
from .cfg import CFG


def _names(methods: Sequence[Guidance]) -> str:
    return " and ".join(type(m).__name__ for m in methods)


def _is_diffusers_guider(value: object) -> bool:
    # by class name, so that this module does not import diffusers' guiders
    return any(c.__name__ == "BaseGuidance" and c.__module__.startswith("diffusers.") for c in type(value).__mro__)


def as_guidance(method: object) -> object:
    """An entry of ``guidance=[...]`` as an unsee method: a diffusers guider is wrapped; anything else is left."""
    if not isinstance(method, Guidance) and _is_diffusers_guider(method):
        from .diffusers_guiders import DiffusersGuider

        return DiffusersGuider(method)
    return method


def validate_combination(methods: Sequence[Guidance], has_negative_prompt: bool,
                         guidance_scale: Optional[float] = None) -> None:
    """Check that ``methods`` can run together in one call; raise GuidanceError naming the fix otherwise.

    ``guidance_scale``: the call's CFG scale, used when no method replaces the combination (None: not checked).
    """
    methods = [as_guidance(m) for m in methods]
    for method in methods:
        if not isinstance(method, Guidance):
            raise GuidanceError(
                f"guidance entries must be unsee.guidance objects such as CFGpp(0.6) or PAG(3.0), or diffusers "
                f"guiders such as AdaptiveProjectedGuidance(...), got {method!r}"
            )
        method.validate()
    seen: set[type] = set()
    for method in methods:
        if type(method) in seen:
            raise GuidanceError(f"{type(method).__name__} is given twice; pass each guidance method once")
        seen.add(type(method))
    combine = [m for m in methods if m.contract.combines]
    if len(combine) > 1:
        raise GuidanceError(f"{_names(combine)} each decide how the conditional and unconditional predictions combine; "
                            f"use one of them")
    steps = [m for m in methods if m.contract.replaces_step]
    if len(steps) > 1:
        raise GuidanceError(f"{_names(steps)} each replace the scheduler step; use one of them")
    attention = [m for m in methods if m.contract.attention_negative]
    if len(attention) > 1:
        raise GuidanceError(f"{_names(attention)} each use the negative prompt inside cross-attention; use one of them")
    needs_negative = [type(m).__name__ for m in methods if m.contract.needs_negative]
    if needs_negative and not has_negative_prompt:
        raise GuidanceError(f"{', '.join(needs_negative)} need a negative prompt: pass negative_prompt=...")
    needs_cfg = [m for m in methods if m.contract.needs_cfg]
    if needs_cfg:
        combination = combine[0] if combine else (CFG(guidance_scale) if guidance_scale is not None else None)
        if combination is not None and not getattr(combination, "needs_uncond", True):
            raise GuidanceError(f"{_names(needs_cfg)} needs classifier-free guidance: use guidance_scale > 1, CFG, "
                                f"CFGpp or FDG")


def plan(methods: Sequence[Guidance], has_negative_prompt: bool, guidance_scale: float) -> list[Guidance]:
    """The methods of one call, checked, with ``CFG(guidance_scale)`` first when none replaces the combination."""
    methods = [as_guidance(m) for m in methods]
    validate_combination(methods, has_negative_prompt, guidance_scale)
    if not any(m.contract.combines for m in methods):
        default = CFG(guidance_scale)
        default.validate()
        methods.insert(0, default)
    return methods


# ---------------------------------------------------------------------------------------------- the README table
COLUMNS = (
    ("combines", "replaces CFG's combination"),
    ("adds_term", "adds a term"),
    ("edits_attention", "changes attention"),
    ("attention_negative", "negative prompt in attention"),
    ("sets_unconditional", "sets the unconditional branch"),
    ("needs_negative", "needs a negative prompt"),
    ("needs_cfg", "needs CFG (scale ≠ 1)"),
    ("replaces_step", "replaces the scheduler step"),
    ("branches", "denoiser branches besides cond"),
)


def _cell(contract: Contract, field: str) -> str:
    value = getattr(contract, field)
    condition = contract.conditions.get(field)
    if field == "branches":
        text = ", ".join(value) if value else "—"
        return f"{text} ({condition})" if condition else text
    if not value:
        return "—"
    return condition or "yes"


def composition_table(methods: Sequence[type]) -> str:
    """A Markdown table of the methods' contracts, one row per method class."""
    lines = ["| method | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for cls in methods:
        lines.append(f"| `{cls.__name__}` | " + " | ".join(_cell(cls.contract, f) for f, _ in COLUMNS) + " |")
    return "\n".join(lines)
