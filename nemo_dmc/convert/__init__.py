"""Checkpoint conversion: Hugging Face / GGUF import, NeMo 2 and Hugging Face export
(``python -m nemo_dmc.convert``), and the GQA up-training baseline's KV-head pooling
(``python -m nemo_dmc.convert.gqa``)."""
