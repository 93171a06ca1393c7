"""grass-ft: GRASS layer-wise importance sampling for memory-efficient full-parameter fine-tuning."""

__version__ = "0.1.0"

__all__ = ["LayerwiseOffloadAdamW", "GrassCallback", "GrassTrainer", "GrassTrainerMixin", "grass_trainer",
           "TrainConfig", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import grass_ft` stays light and low modules never import high ones at import time.
    if name == "LayerwiseOffloadAdamW":
        from .offload import LayerwiseOffloadAdamW

        return LayerwiseOffloadAdamW
    if name == "GrassCallback":
        from .hf import GrassCallback

        return GrassCallback
    if name in ("GrassTrainer", "GrassTrainerMixin", "grass_trainer"):
        from . import hf

        return getattr(hf, name)
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'grass_ft' has no attribute {name!r}")
