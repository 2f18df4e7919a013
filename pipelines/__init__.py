"""unsee's diffusers pipeline subclasses (SD 1.x/2.x and SDXL)."""

from .stable_diffusion import UnseeStableDiffusionPipeline
from .stable_diffusion_xl import UnseeStableDiffusionXLPipeline

__all__ = ["UnseeStableDiffusionPipeline", "UnseeStableDiffusionXLPipeline"]
