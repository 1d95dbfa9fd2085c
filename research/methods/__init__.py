"""The method registry: LoRA, Textual Inversion and DreamBooth behind one interface (see base.py).

The methods floor sits above the blocks (data, models, sampling) and below the training loop, which
asks the registry for the method a config names and never which one it got.
"""

from research.config import unknown_method_message
from research.errors import ConfigError
from research.methods.base import Components, ExtraBatches, Method, config_metadata, encode_images
from research.methods.dreambooth import DreamBooth
from research.methods.lora import LoRA
from research.methods.textual_inversion import TextualInversion

METHODS = {"lora": LoRA, "textual_inversion": TextualInversion, "dreambooth": DreamBooth}


def get_method(cfg) -> Method:
    """The method a config names; the registry refuses a name it does not hold."""
    if cfg.method not in METHODS:
        raise ConfigError(unknown_method_message(cfg.method))
    return METHODS[cfg.method](cfg)


__all__ = ["Components", "ExtraBatches", "Method", "METHODS", "config_metadata", "encode_images", "get_method"]
