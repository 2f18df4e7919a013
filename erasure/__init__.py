"""Concept-erasure trainers: ``trainer.train(pipe) -> Adapter``, one file per method.

    from unsee.erasure import ESDConfig, ESDTrainer
    adapter = ESDTrainer(ESDConfig(concept="circle", variant="esd-u", steps=200)).train(pipe)
    adapter.save("esd-u-circle.safetensors")
    pipe.load_erasure("esd-u-circle.safetensors")

``base`` holds the contract every trainer follows; ``esd``, ``salun``, ``spm``, ``advunlearn`` and ``ant`` the methods; ``jobs`` scripted
training of several concepts x methods (``run_jobs``, ``unsee erase --config``).
"""

from .base import (
    ConfigError,
    Conditioning,
    Progress,
    ProgressCallback,
    Trainer,
    TrainerConfig,
    TrainingError,
    canonical_dtype,
    epsilon_from_output,
    load_checkpoint,
)
from .esd import ESD_VARIANTS, ESDConfig, ESDTrainer, esd_modules, esd_parameters
from .presets import PRESETS, TOY_PRESETS, is_toy_model_name, is_toy_pipeline, preset_settings
from .jobs import METHODS, Job, load_job_file, make_trainer, plan_jobs, run_jobs
from .salun import SalUnConfig, SalUnTrainer, load_mask, pack_mask, save_mask, unpack_mask
from .spm import SPMConfig, SPMTrainer, spm_modules, transport_strength
from .advunlearn import AdvUnlearnConfig, AdvUnlearnTrainer, encoder_layer_parameters, prefix_embedding
from .ant import ANTConfig, ANTTrainer, ant_lora_modules

__all__ = [
    "AdvUnlearnConfig",
    "AdvUnlearnTrainer",
    "ANTConfig",
    "ANTTrainer",
    "ConfigError",
    "Conditioning",
    "ESDConfig",
    "ESDTrainer",
    "ESD_VARIANTS",
    "Job",
    "METHODS",
    "PRESETS",
    "Progress",
    "ProgressCallback",
    "SalUnConfig",
    "SalUnTrainer",
    "SPMConfig",
    "SPMTrainer",
    "Trainer",
    "TrainerConfig",
    "TOY_PRESETS",
    "TrainingError",
    "ant_lora_modules",
    "canonical_dtype",
    "epsilon_from_output",
    "esd_modules",
    "encoder_layer_parameters",
    "esd_parameters",
    "is_toy_model_name",
    "is_toy_pipeline",
    "load_checkpoint",
    "load_job_file",
    "load_mask",
    "make_trainer",
    "pack_mask",
    "plan_jobs",
    "prefix_embedding",
    "preset_settings",
    "run_jobs",
    "save_mask",
    "spm_modules",
    "transport_strength",
    "unpack_mask",
]
