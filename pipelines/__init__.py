"""unsee's diffusers pipeline subclasses (SD 1.x/2.x and SDXL: text-to-image, img2img, inpainting, ControlNet).

``unsee.guided(pipe)`` (``unsee.pipelines.variants.guided``; not re-exported here, where ``guided`` names the
executor's module) gives a diffusers pipeline its unsee counterpart."""

from .stable_diffusion import UnseeStableDiffusionPipeline
from .stable_diffusion_xl import UnseeStableDiffusionXLPipeline
from .variants import (GUIDED_CLASSES, UnseeStableDiffusionControlNetImg2ImgPipeline,
                       UnseeStableDiffusionControlNetInpaintPipeline, UnseeStableDiffusionControlNetPipeline,
                       UnseeStableDiffusionImg2ImgPipeline, UnseeStableDiffusionInpaintPipeline,
                       UnseeStableDiffusionXLControlNetImg2ImgPipeline, UnseeStableDiffusionXLControlNetInpaintPipeline,
                       UnseeStableDiffusionXLControlNetPipeline, UnseeStableDiffusionXLImg2ImgPipeline,
                       UnseeStableDiffusionXLInpaintPipeline, UnsupportedPipelineError)

__all__ = ["GUIDED_CLASSES", "UnsupportedPipelineError", *(cls.__name__ for cls in GUIDED_CLASSES.values())]
