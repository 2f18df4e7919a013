"""Concept-erasure trainers: ``trainer.train(pipe) -> Adapter``, one file per method.

    from unsee.erasure import ESDConfig, ESDTrainer
    adapter = ESDTrainer(ESDConfig(concept="circle", variant="esd-u", steps=200)).train(pipe)
    adapter.save("esd-u-circle.safetensors")
    pipe.load_erasure("esd-u-circle.safetensors")

    from unsee.erasure import make_trainer
    trainer = make_trainer("esd-u", concept="circle", steps=200)  # by registered name, with checked settings

``base`` states the contract every trainer follows; ``esd``, ``salun``, ``spm``, ``advunlearn`` and ``ant`` are the
trained methods, ``uce`` and ``rece`` the closed-form ones, each registering itself (``registry``: :data:`METHODS`, :func:`make_trainer`); the parts they share are
written once: ``fields`` (settings that check themselves), ``config``, ``conditioning``, ``sampling``,
``selectors``, ``saliency``, and for the loop ``trainer``, ``checkpoints``, ``processes``, ``snapshot``,
``precision``, ``adapter_builders``. Scripted training of several concepts x methods (``run_jobs``,
``unsee erase --config``) is ``unsee.jobs``; the trainers know no prompt world of their own.
"""

from .errors import ConfigError, TrainingError
from .config import TrainerConfig
from .conditioning import Conditioning
from .checkpoints import load_checkpoint
from .fields import canonical_dtype
from .sampling import epsilon_from_output
from .trainer import Progress, ProgressCallback, Trainer
from .registry import METHODS, Method, make_trainer, register_method
from .esd import ESD_VARIANTS, ESDConfig, ESDTrainer, esd_modules, esd_parameters
from .saliency import load_mask, pack_mask, save_mask, unpack_mask
from .salun import SalUnConfig, SalUnTrainer
from .spm import SPMConfig, SPMTrainer, spm_modules, transport_strength
from .advunlearn import AdvUnlearnConfig, AdvUnlearnTrainer, encoder_layer_parameters, prefix_embedding
from .ant import ANTConfig, ANTTrainer, ant_lora_modules
from .uce import UCEConfig, UCETrainer, cross_attention_kv
from .rece import RECEConfig, RECETrainer

__all__ = [
    "AdvUnlearnConfig",
    "AdvUnlearnTrainer",
    "ANTConfig",
    "ANTTrainer",
    "ConfigError",
    "RECEConfig",
    "RECETrainer",
    "Conditioning",
    "ESDConfig",
    "ESDTrainer",
    "ESD_VARIANTS",
    "METHODS",
    "Method",
    "Progress",
    "ProgressCallback",
    "SalUnConfig",
    "SalUnTrainer",
    "SPMConfig",
    "SPMTrainer",
    "Trainer",
    "TrainerConfig",
    "TrainingError",
    "UCEConfig",
    "UCETrainer",
    "ant_lora_modules",
    "canonical_dtype",
    "cross_attention_kv",
    "epsilon_from_output",
    "esd_modules",
    "encoder_layer_parameters",
    "esd_parameters",
    "load_checkpoint",
    "load_mask",
    "make_trainer",
    "pack_mask",
    "prefix_embedding",
    "register_method",
    "save_mask",
    "spm_modules",
    "transport_strength",
    "unpack_mask",
]
