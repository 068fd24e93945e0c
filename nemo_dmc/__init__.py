"""nemo-dmc: Dynamic Memory Compression for NeMo / megatron-core decoder LLMs."""

__version__ = "0.1.0"
