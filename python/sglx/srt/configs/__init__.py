"""Model configuration."""

from sglx.srt.configs.model_config import ModelConfig

__all__ = ["ModelConfig"]
