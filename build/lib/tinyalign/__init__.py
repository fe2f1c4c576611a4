"""tinyalign: multi-modal preference alignment (SFT, rejection sampling, DPO, SteerLM) for LLaVA-1.5,
written out by hand. Li, Lin & Pei, ACL 2024 (arXiv 2402.10884)."""

from .config import LlavaConfig, TextConfig, VisionConfig, preset
from .generate import generate
from .model import Llava
from . import images
from .processor import IGNORE_INDEX, Encoded, Processor, SequenceTooLong
from .weights import load_model, random_model, save_model

__all__ = ["images", "LlavaConfig", "TextConfig", "VisionConfig", "preset", "Llava", "load_model", "save_model",
           "random_model", "Processor", "Encoded", "SequenceTooLong", "IGNORE_INDEX", "generate"]
