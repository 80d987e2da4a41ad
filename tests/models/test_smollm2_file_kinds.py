"""SmolLM2 from a GGUF and from the HF folder made of it give the same logits.

transformers dequantizes the Q4_1 GGUF to float and undoes llama.cpp's Q/K row permutation;
saved as safetensors, that folder holds the same weights in HF's layout, so llamapy's two
loading paths (interleaved rope over permuted rows vs rotate-half over rows as stored) must
agree to float rounding, and both must agree with transformers' own forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import PagedRunner, assert_logits_close

from llamapy.formats import open_model_file
from llamapy.models import build_causal_lm
from llamapy.tokenizer.tokenizer import Tokenizer

pytestmark = [pytest.mark.models, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """(transformers model, HF folder) dequantized from the SmolLM2 GGUF."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # from_pretrained(gguf_file=...) insists on `accelerate`; it calls this same loader.
    where = dict(pretrained_model_name_or_path=smollm2_path.parent, gguf_file=smollm2_path.name)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(**where))
    tensors = load_gguf_checkpoint(str(smollm2_path), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(tensors["tensors"], strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
    model.tie_weights()
    folder = tmp_path_factory.mktemp("smollm2_hf")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(**where).save_pretrained(folder)
    return model.eval(), folder


def test_gguf_and_hf_folder_agree(smollm2_path: Path, smollm2_hf) -> None:
    hf_model, folder = smollm2_hf
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ids = Tokenizer.from_path(smollm2_path).encode(text)[:64]
    assert Tokenizer.from_path(folder).encode(text)[:64] == ids
    assert len(ids) == 64
    logits = {}
    for kind, path in (("gguf", smollm2_path), ("hf", folder)):
        model = build_causal_lm(open_model_file(path))
        logits[kind] = PagedRunner(model, 1, len(ids), block_size=16).step({0: ids})[0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert_logits_close(logits["hf"], logits["gguf"])
    assert torch.equal(logits["hf"].argmax(-1), logits["gguf"].argmax(-1))
    assert_logits_close(logits["gguf"], ref)
    assert_logits_close(logits["hf"], ref)
