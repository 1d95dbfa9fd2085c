"""Training methods behind one interface (see base.py): which parameters train, how they are saved,
how they are loaded into a pipeline."""

from research.methods.base import Components, Method, config_metadata
from research.methods.dreambooth import DreamBooth
from research.methods.lora import LoRA
from research.methods.textual_inversion import TextualInversion

METHODS = {"lora": LoRA, "textual_inversion": TextualInversion, "dreambooth": DreamBooth}


def get_method(cfg) -> Method:
    try:
        return METHODS[cfg.method](cfg)
    except KeyError:
        raise ValueError(f"Unknown --method {cfg.method!r}; choose one of {sorted(METHODS)}.") from None


__all__ = ["Components", "Method", "METHODS", "config_metadata", "get_method"]
