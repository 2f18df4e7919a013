"""unsee's counterparts of diffusers' other SD 1.x/2.x and SDXL pipelines (img2img, inpainting, ControlNet), and
``unsee.guided(pipe)``.

Each class here is generated from one table: ``Unsee<Name>`` is diffusers' ``<Name>`` plus ``guidance=[...]`` and
``load_erasure`` / ``unload_erasure`` (the family's mixin: :class:`~unsee.pipelines.stable_diffusion.StableDiffusionGuided`
or :class:`~unsee.pipelines.stable_diffusion_xl.StableDiffusionXLGuided`), and a ``from_pipe`` that keeps the
source pipeline's dtype. Nothing else changes: without ``guidance=`` a call is diffusers' own, bit for bit.

:data:`GUIDED_CLASSES` maps every supported diffusers class to its unsee class (text-to-image included);
:func:`guided` turns a diffusers pipeline into its counterpart over the same components.
"""

from __future__ import annotations

from typing import Any

from diffusers import (StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline,
                       StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, StableDiffusionXLControlNetImg2ImgPipeline,
                       StableDiffusionXLControlNetInpaintPipeline, StableDiffusionXLControlNetPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)

from .common import keep_dtype_from_pipe
from .guided import GuidanceMixin
from .stable_diffusion import StableDiffusionGuided, UnseeStableDiffusionPipeline
from .stable_diffusion_xl import StableDiffusionXLGuided, UnseeStableDiffusionXLPipeline


def _counterpart(base: type, family: type) -> type:
    """``Unsee<base>``: the family's guidance/erasure mixin over diffusers' ``base``."""
    return type(f"Unsee{base.__name__}", (family, base), {
        "__module__": __name__,
        "__doc__": f"``{base.__name__}`` with ``guidance=[...]`` and ``load_erasure`` / ``unload_erasure``.",
        "from_pipe": keep_dtype_from_pipe(base),
    })


UnseeStableDiffusionImg2ImgPipeline = _counterpart(StableDiffusionImg2ImgPipeline, StableDiffusionGuided)
UnseeStableDiffusionInpaintPipeline = _counterpart(StableDiffusionInpaintPipeline, StableDiffusionGuided)
UnseeStableDiffusionControlNetPipeline = _counterpart(StableDiffusionControlNetPipeline, StableDiffusionGuided)
UnseeStableDiffusionControlNetImg2ImgPipeline = _counterpart(StableDiffusionControlNetImg2ImgPipeline,
                                                             StableDiffusionGuided)
UnseeStableDiffusionControlNetInpaintPipeline = _counterpart(StableDiffusionControlNetInpaintPipeline,
                                                             StableDiffusionGuided)
UnseeStableDiffusionXLImg2ImgPipeline = _counterpart(StableDiffusionXLImg2ImgPipeline, StableDiffusionXLGuided)
UnseeStableDiffusionXLInpaintPipeline = _counterpart(StableDiffusionXLInpaintPipeline, StableDiffusionXLGuided)
UnseeStableDiffusionXLControlNetPipeline = _counterpart(StableDiffusionXLControlNetPipeline, StableDiffusionXLGuided)
UnseeStableDiffusionXLControlNetImg2ImgPipeline = _counterpart(StableDiffusionXLControlNetImg2ImgPipeline,
                                                               StableDiffusionXLGuided)
UnseeStableDiffusionXLControlNetInpaintPipeline = _counterpart(StableDiffusionXLControlNetInpaintPipeline,
                                                               StableDiffusionXLGuided)

# every supported diffusers pipeline class -> its unsee counterpart
GUIDED_CLASSES: dict[type, type] = {
    StableDiffusionPipeline: UnseeStableDiffusionPipeline,
    StableDiffusionImg2ImgPipeline: UnseeStableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline: UnseeStableDiffusionInpaintPipeline,
    StableDiffusionControlNetPipeline: UnseeStableDiffusionControlNetPipeline,
    StableDiffusionControlNetImg2ImgPipeline: UnseeStableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline: UnseeStableDiffusionControlNetInpaintPipeline,
    StableDiffusionXLPipeline: UnseeStableDiffusionXLPipeline,
    StableDiffusionXLImg2ImgPipeline: UnseeStableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline: UnseeStableDiffusionXLInpaintPipeline,
    StableDiffusionXLControlNetPipeline: UnseeStableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline: UnseeStableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline: UnseeStableDiffusionXLControlNetInpaintPipeline,
}


class UnsupportedPipelineError(TypeError):
    """``unsee.guided`` was given a pipeline class it has no guided counterpart for."""


def guided(pipe: Any, **kwargs: Any) -> Any:
    """The guided counterpart of a diffusers SD 1.x/2.x or SDXL pipeline, sharing its components.

    ``pipe`` is one of :data:`GUIDED_CLASSES`' diffusers classes (text-to-image, img2img, inpainting, ControlNet
    and their combinations); the result is its ``Unsee...`` class built with ``from_pipe`` (the same component
    objects, in the source pipeline's dtype unless ``dtype=`` is passed, with its progress bar settings; ``kwargs`` go
    to ``from_pipe``). A unsee
    pipeline comes back unchanged. Any other class is refused with an :class:`UnsupportedPipelineError` naming it:
    only an exact supported class is converted (a subclass may have changed the denoising loop).
    """
    if isinstance(pipe, GuidanceMixin) and not kwargs:
        return pipe
    source = type(pipe)
    target = next((ours for theirs, ours in GUIDED_CLASSES.items() if source in (theirs, ours)), None)
    if target is None:
        names = ", ".join(cls.__name__ for cls in GUIDED_CLASSES)
        raise UnsupportedPipelineError(f"unsee.guided does not support {source.__name__}; it supports {names}")
    result = target.from_pipe(pipe, **kwargs)
    if hasattr(pipe, "_progress_bar_config"):  # from_pipe does not carry set_progress_bar_config over
        result.set_progress_bar_config(**pipe._progress_bar_config)
    return result
