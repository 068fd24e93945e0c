"""NeMo 2 glue (optional extra ``nemo``): DMC Llama config and model, NeMo checkpoints,
and a NeMo-Run recipe. Importing this package imports NeMo."""

from nemo_dmc.nemo.config import DMCLlamaConfig
from nemo_dmc.nemo.model import DMCGPTModel

__all__ = ["DMCGPTModel", "DMCLlamaConfig"]
