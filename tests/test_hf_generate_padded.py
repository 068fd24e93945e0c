"""``DMCLlamaForCausalLM.generate`` on left-padded batches of prompts of mixed lengths."""

import pytest
import torch

from megatron_utils import TINY_GQA
from nemo_dmc.hf.cache import DMCCache
from test_convert_hf_export import _dmc_export

PAD = 0


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[b, longest]`` with pad tokens before each prompt."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    return ids, mask


def _prompts(*lengths: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    return [torch.randint(1, TINY_GQA.vocab_size, (n,), generator=gen) for n in lengths]


def _dms_export(tmp_path):
    """A tiny DMS model (window 3, offset 0: about half evicted) exported to transformers."""
    from transformers import AutoModelForCausalLM

    from nemo_dmc.checkpoints.sharding import gather_full_state
    from nemo_dmc.convert.hf_export import save_hf_checkpoint
    from nemo_dmc.megatron.model import build_model
    from nemo_dmc.megatron.parallel import seed_all
    from nemo_dmc.methods import DMSConfig

    seed_all(8)
    settings = DMSConfig(window=3, init_offset=0.0)
    save_hf_checkpoint(gather_full_state(build_model(TINY_GQA, settings)), TINY_GQA,
                       tmp_path / "hf", method=settings)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()


@pytest.mark.parametrize("method", ["dmc", "dms"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(megatron_tp1, tmp_path,
                                                                      method):
    hf = _dmc_export(tmp_path, seed=8)[1] if method == "dmc" else _dms_export(tmp_path)
    prompts = _prompts(11, 6)
    ids, mask = _left_padded(prompts)
    cache = DMCCache(hf.config, batch_size=2, max_length=11 + 12)
    with torch.no_grad():
        batched = hf.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=12,
                              do_sample=False, pad_token_id=PAD)
        for row, prompt in enumerate(prompts):
            alone = hf.generate(prompt.unsqueeze(0), max_new_tokens=12, do_sample=False)
            assert batched[row, 11:].tolist() == alone[0, len(prompt):].tolist(), row
    report = cache.memory()
    assert report.tokens == (11 + 11) + (6 + 11)  # pad tokens are not cached
    assert report.compression_ratio > 1


def test_right_padded_batch_is_rejected(megatron_tp1, tmp_path):
    _, hf = _dmc_export(tmp_path, seed=8)
    ids, mask = _left_padded(_prompts(5, 3))
    with pytest.raises(ValueError, match="left-padded"):
        hf.generate(ids, attention_mask=mask.flip(1), max_new_tokens=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="DMC cache"):
        hf.generate(ids, attention_mask=mask, use_cache=False, max_new_tokens=2, pad_token_id=PAD)


def test_padding_is_inferred_from_the_pad_id_when_no_mask_is_given(megatron_tp1, tmp_path):
    """transformers infers the mask from ``pad_token_id``; the DMC cache must follow it."""
    _, hf = _dmc_export(tmp_path, seed=8)
    ids, mask = _left_padded(_prompts(9, 4))
    with torch.no_grad():
        given = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                            pad_token_id=PAD)
        inferred = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert inferred.tolist() == given.tolist()


def test_a_chunk_of_only_padding_is_rejected(megatron_tp1, tmp_path):
    _, hf = _dmc_export(tmp_path, seed=8)
    ids, mask = _left_padded(_prompts(9, 4))
    cache = DMCCache(hf.config, batch_size=2, max_length=16)
    cache.set_left_padding(mask)
    with torch.no_grad(), pytest.raises(ValueError, match="only padding"):
        hf(ids[:, :3], past_key_values=cache, use_cache=True)

