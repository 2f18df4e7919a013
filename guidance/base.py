"""The guidance step contract shared by every method.

A denoising step has four phases; each method touches only the ones it needs:

1. **branches**: which predictions the step needs: conditional, unconditional/negative, perturbed (PAG);
2. **one batched UNet call** over all branches, with attention processors that know which batch
   rows belong to which branch (PAG's identity attention, NASA's negative-away subtraction);
3. **combine**: CFG / CFG++ / FDG produce the guided prediction from cond and uncond, PAG adds its
   term, negative steering decides what the uncond branch holds and from which step;
4. **scheduler step**: the stock ``scheduler.step``, except CFG++, which denoises with the guided
   prediction and renoises with the unconditional one.

Methods are small config objects (dataclasses) with the paper's defaults. ``validate_combination``
checks a list of them before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class GuidanceError(ValueError):
    """An invalid guidance method or combination; raised before any denoising work."""


@dataclass
class Guidance:
    """Base class of the guidance methods.

    ``kind`` says which part of the step the method owns:
    - "combine": how cond and uncond predictions become one (CFG, CFG++, FDG): at most one per call;
    - "extra": an added term from an extra branch (PAG);
    - "negative": what the unconditional branch holds, and when (negative-prompt steering);
    - "attention": a change inside the attention layers, no extra branch (NASA).
    """

    kind = "extra"

    def validate(self) -> None:
        """Raise GuidanceError if a field is out of range."""


def validate_combination(methods: Sequence[Guidance], has_negative_prompt: bool) -> None:
    """Check that ``methods`` can run together in one call; raise GuidanceError naming the fix otherwise."""
    for method in methods:
        if not isinstance(method, Guidance):
            raise GuidanceError(
                f"guidance entries must be unsee.guidance objects such as CFGpp(0.6) or PAG(3.0), got {method!r}"
            )
        method.validate()
    seen: dict[type, Guidance] = {}
    for method in methods:
        if type(method) in seen:
            raise GuidanceError(f"{type(method).__name__} is given twice; pass each guidance method once")
        seen[type(method)] = method
    combine = [m for m in methods if m.kind == "combine"]
    if len(combine) > 1:
        names = " and ".join(type(m).__name__ for m in combine)
        raise GuidanceError(f"{names} each decide how the conditional and unconditional predictions combine; use one of them")
    needs_negative = [type(m).__name__ for m in methods if m.kind in ("negative", "attention")]
    if needs_negative and not has_negative_prompt:
        raise GuidanceError(f"{', '.join(needs_negative)} need a negative prompt: pass negative_prompt=...")


def check_range(owner: str, name: str, value: float, low: float, high: float = float("inf")) -> None:
    if not (low <= value <= high):
        bound = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
        raise GuidanceError(f"{owner}.{name} must be {bound}, got {value}")


VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what ``vp_denoised`` can turn into an x0 estimate


def vp_denoised(prediction_type: str, output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
    """x0 estimate from a model output at a variance-preserving sample ``x = alpha * x0 + sigma * eps``."""
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * output
    if prediction_type == "sample":
        return output
    raise GuidanceError(f"unsupported prediction_type {prediction_type!r}: expected one of {VP_PREDICTION_TYPES}")
