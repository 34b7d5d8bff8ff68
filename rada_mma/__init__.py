"""rada_mma: RAda and MMA adapters for frozen CLIP models, exact to the authors' code.

>>> from rada_mma import wrap
>>> model = wrap(clip_model, method="rada")
"""

from .config import METHODS, AdapterConfig
from .modules import MMARationalMask, MultiModalAdapter, RationalMask, ResidualAdapter, build_adapter
from .official import from_official, to_official
from .serialization import load_adapter, read_adapter_config, save_adapter
from .wrapper import AdaptedCLIP, wrap

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AdaptedCLIP",
    "AdapterConfig",
    "MMARationalMask",
    "MultiModalAdapter",
    "RationalMask",
    "ResidualAdapter",
    "__version__",
    "build_adapter",
    "from_official",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
    "to_official",
    "wrap",
]
