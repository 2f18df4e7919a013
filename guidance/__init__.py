"""Guidance variants for unsee's pipelines: ``pipe(prompt, guidance=[CFGpp(0.6), PAG(3.0), NASA(0.3)])``."""

from .base import Guidance, GuidanceError, validate_combination
from .cfg import CFG
from .cfgpp import CFGpp, equivalent_cfg_scale
from .fdg import FDG
from .nasa import NASA
from .negative import NegativeSteer
from .pag import PAG

__all__ = ["CFG", "CFGpp", "FDG", "Guidance", "GuidanceError", "NASA", "NegativeSteer", "PAG", "equivalent_cfg_scale",
           "validate_combination"]
