"""The OpenAI-compatible server: `python -m pyllama_ssm.server --model M.gguf --n_parallel 8`."""

from .app import create_app
from .settings import ConfigFileSettings, ModelSettings, ServerSettings, Settings

__all__ = ["ConfigFileSettings", "ModelSettings", "ServerSettings", "Settings", "create_app"]
