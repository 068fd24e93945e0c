"""Data layer: tokenizers, the built-in corpus, preprocessing to megatron indexed datasets, and
GPT train/valid/test datasets with deterministic, resumable batches.

Import from the submodules (this package imports nothing heavy by itself)::

    from nemo_dmc.data.corpus import build_python_docs_corpus
    from nemo_dmc.data.tokenizer import load_tokenizer, train_bpe_tokenizer
    from nemo_dmc.data.preprocess import preprocess
    from nemo_dmc.data.datasets import build_gpt_datasets, get_batch, iter_batches
"""
