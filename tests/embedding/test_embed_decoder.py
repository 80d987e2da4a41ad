"""A decoder embeds (last / mean pooling over its output-normed hidden states, as llama.cpp's
--embedding) and reranks Qwen3-Reranker style (p("yes") of the answer after the rerank
prompt): SmolLM2-135M checked against transformers' own forward of the same (dequantized)
weights. llamapy runs its float32 reference kernels here, so only rounding may differ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from embed_corpus import passages

from llamapy.embedding.engine import DEFAULT_RERANK_TEMPLATE
from llamapy.sampling.params import SamplingParams

pytestmark = [pytest.mark.models, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_path: Path):
    """(model, tokenizer) of transformers, dequantized from the SmolLM2 GGUF."""
    tf = pytest.importorskip("transformers", reason="transformers (dev extra) is the oracle")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    where = dict(pretrained_model_name_or_path=smollm2_path.parent, gguf_file=smollm2_path.name)
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(**where))
    tensors = load_gguf_checkpoint(str(smollm2_path), return_tensors=True, model_to_load=model)
    model.load_state_dict(tensors["tensors"], strict=False)
    model.tie_weights()
    return model.eval(), tf.AutoTokenizer.from_pretrained(**where)


@pytest.fixture(scope="module")
def smollm2_embedder(smollm2_path: Path):
    from llamapy.api import LLM

    return LLM(smollm2_path, embedding=True, cpu_kernels="reference")


def _texts(rng, n: int) -> list[str]:
    pool = passages()
    return [" ".join(pool[i].split()[:20]) for i in rng.choice(len(pool), n, replace=False)]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_embeddings_equal_transformers_hidden_states(
    smollm2_embedder, smollm2_transformers, rng, pooling
):
    model, _ = smollm2_transformers
    texts = _texts(rng, 3)
    got = smollm2_embedder.embed(texts, pooling=pooling, normalize=False)
    for text, vec in zip(texts, got, strict=True):
        ids = smollm2_embedder.embedder.text_input(text).token_ids
        with torch.no_grad():
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0]  # after the norm
        want = hidden[-1] if pooling == "last" else hidden.mean(0)
        assert (vec - want).abs().max() < 1e-4 * max(1.0, want.abs().max().item())


def test_decoder_rerank_scores_equal_p_yes_of_transformers(
    smollm2_embedder, smollm2_transformers, rng
):
    model, tok = smollm2_transformers
    docs = _texts(rng, 2)
    query = "What does " + " ".join(docs[0].split()[:5]) + " mean?"
    results = smollm2_embedder.rerank(query, docs)
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    for r in results:
        prompt = DEFAULT_RERANK_TEMPLATE.format(query=query, document=docs[r.index])
        ids = tok(prompt, add_special_tokens=False).input_ids
        assert smollm2_embedder.embedder.pair_input(query, docs[r.index]).token_ids == ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        p_yes = torch.softmax(logits[[yes, no]].double(), 0)[0].item()
        assert abs(r.score - p_yes) < 1e-4
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)


def test_a_generating_model_embeds_with_its_own_weights(smollm2_path, smollm2_embedder, rng):
    """LLM.embed on a model loaded for generation shares the engine's model (no reload)."""
    from llamapy.api import LLM
    from llamapy.errors import UnsupportedError

    llm = LLM(smollm2_path, cpu_kernels="reference", n_ctx=128)
    texts = _texts(rng, 2)
    got = llm.embed(texts)
    assert llm.embedder.model is llm.engine.runner.model
    torch.testing.assert_close(got, smollm2_embedder.embed(texts), rtol=1e-5, atol=1e-5)
    assert llm.generate("Hi", SamplingParams(max_tokens=2))[0].token_ids  # it still generates
    with pytest.raises(UnsupportedError, match="embeddings only"):
        smollm2_embedder.generate("Hi")
