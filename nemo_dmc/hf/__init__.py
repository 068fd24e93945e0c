"""transformers-side DMC Llama (``model_type: dmc_llama``), registered with the Auto classes
on import: ``import nemo_dmc.hf`` then ``AutoModelForCausalLM.from_pretrained(dir)``."""

from transformers import AutoConfig, AutoModelForCausalLM

from nemo_dmc.hf.modeling_dmc_llama import DMCLlamaForCausalLM, DMCLlamaHFConfig

AutoConfig.register(DMCLlamaHFConfig.model_type, DMCLlamaHFConfig, exist_ok=True)
AutoModelForCausalLM.register(DMCLlamaHFConfig, DMCLlamaForCausalLM, exist_ok=True)

__all__ = ["DMCLlamaForCausalLM", "DMCLlamaHFConfig"]
