"""tinyalign: multi-modal preference alignment (SFT, rejection sampling, DPO, SteerLM) for LLaVA-1.5,
written out by hand. Li, Lin & Pei, ACL 2024 (arXiv 2402.10884).

The package's face: the public API, re-exported from the core (this folder's modules) and, for
loading and saving checkpoints, from infra/. Nothing inside the package imports this file.
"""

from . import images
from .config import LlavaConfig, TextConfig, VisionConfig, preset
from .generate import generate
from .infra.weights import load_model, save_model
from .model import Llava, random_model
from .processor import IGNORE_INDEX, Encoded, Processor, SequenceTooLong

__all__ = ["images", "LlavaConfig", "TextConfig", "VisionConfig", "preset", "Llava", "load_model", "save_model",
           "random_model", "Processor", "Encoded", "SequenceTooLong", "IGNORE_INDEX", "generate"]
