"""Tiny random-weight transformers models, llama.cpp's converter, and a llamapy forward
over the paged KV cache: the pieces the architecture tests compare."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from llamapy.engine.kv_cache import allocate_kv_cache
from llamapy.layers.attention import AttentionMetadata
from llamapy.models.llama import LlamaForCausalLM

VOCAB = 128
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(arch: str, **overrides):
    """A transformers config for `arch` (one of ARCHS), small enough for a CPU test."""
    import transformers as tf

    kw = dict(_COMMON)
    if arch == "llama":
        cls = tf.LlamaConfig
    elif arch == "llama-gqa":
        cls, kw["num_key_value_heads"] = tf.LlamaConfig, 2
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 50_000.0}
    elif arch == "llama-rope-linear":
        cls = tf.LlamaConfig
        kw["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0}
    elif arch == "llama-rope-llama3":  # Llama 3.1: the factors depend on wavelength bands
        cls = tf.LlamaConfig
        kw["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": 500_000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    elif arch == "mistral":
        cls, kw["num_key_value_heads"] = tf.MistralConfig, 2
        kw["sliding_window"] = None  # llama.cpp runs Mistral without SWA
    elif arch == "mistral-swa":  # every layer windowed (transformers honours it)
        cls, kw["num_key_value_heads"] = tf.MistralConfig, 2
        kw["sliding_window"] = 4
    elif arch == "qwen2":
        cls, kw["num_key_value_heads"] = tf.Qwen2Config, 2
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0}
    elif arch == "qwen3":
        cls = tf.Qwen3Config
        kw.update(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)
    elif arch == "phi3":
        cls = tf.Phi3Config
        kw.update(num_key_value_heads=2, partial_rotary_factor=0.5)
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10_000.0}
    elif arch in ("gemma3", "gemma3-qscale"):
        # 6 layers: llama.cpp's swa pattern (5 sliding, 1 global); window 4 so it matters.
        cls = tf.Gemma3TextConfig
        kw.update(
            num_hidden_layers=6,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            # llama.cpp assumes head_dim (GGUF has no key for it); HF reads it
            query_pre_attn_scalar=16 if arch == "gemma3" else 40,
            tie_word_embeddings=True,
        )
        kw["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        }
    elif arch == "gemma3-mm":  # Gemma3ForConditionalGeneration: text under language_model
        vision = tf.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        text = tiny_config("gemma3", **overrides).to_dict()
        return tf.Gemma3Config(text_config=text, vision_config=vision.to_dict())
    else:
        raise ValueError(arch)
    kw.update(overrides)
    return cls(**kw)


def tiny_model(config, seed: int) -> torch.nn.Module:
    """An eager float32 model with weights drawn at logit-relevant scale (HF's init gives
    std 0.02, so logits would be ~0 and any comparison would pass)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:  # projections and embeddings
                std = 1.0 if "embed" in name else 1.0 / math.sqrt(p.shape[1])
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "norm" in name:  # gemma stores w for (1 + w): both forms stay positive
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:  # biases
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def save_folder(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    # llama.cpp's Gemma 3 converter trims token_embd to the tokenizer's size.
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = {"model": {"type": "WordLevel", "vocab": vocab}, "added_tokens": []}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    return folder


@torch.no_grad()
def hf_logits(model: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """(len(ids), vocab) logits of one sequence from the transformers eager forward."""
    return model(torch.tensor([list(ids)])).logits[0].float()


def assert_logits_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 end to end: differences are rounding, ~1e-6 of the logit scale; a wrong rope,
    norm or mask moves logits by ~1e-1 of it."""
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    diff = (got - ref).abs().max().item()
    assert diff < tol, f"max |diff| {diff:.3g} over tolerance {tol:.3g}"
    # top-1 must agree wherever the oracle's top-2 margin is not itself within rounding
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


# -- llama.cpp's converter --------------------------------------------------------------------

_CONVERT = r"""
import sys
from pathlib import Path
vendor = Path(sys.argv[1])
sys.path[:0] = [str(vendor / "gguf-py"), str(vendor)]
import gguf, torch
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
from conversion.base import TextModel
# Our tiny models have no real tokenizer: write the token count only (llama.cpp's vocab
# type "none"), which is all a forward pass needs.
def no_vocab(self):
    self.gguf_writer.add_tokenizer_model("none")
    self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])
TextModel.set_vocab = no_vocab
for src, dst in zip(sys.argv[2::2], sys.argv[3::2]):
    hparams = ModelBase.load_hparams(Path(src), False)
    cls = get_model_class(get_model_architecture(hparams, ModelType.TEXT))
    cls.set_vocab = no_vocab
    with torch.inference_mode():
        cls(Path(src), gguf.LlamaFileType.ALL_F32, Path(dst), eager=True).write()
"""


def convert_to_gguf(vendor: Path, pairs: Sequence[tuple[Path, Path]]) -> None:
    """Run llama.cpp's convert_hf_to_gguf machinery (with its own gguf-py) on each
    (HF folder, GGUF path) pair, in one subprocess."""
    args = [str(a) for pair in pairs for a in pair]
    result = subprocess.run(
        [sys.executable, "-c", _CONVERT, str(vendor), *args], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{result.stderr[-4000:]}")


# -- llamapy over the paged KV cache ----------------------------------------------------------


class PagedRunner:
    """Runs several sequences through a llamapy model in flattened steps, each sequence
    holding blocks scattered through a shared cache (as the block manager would)."""

    def __init__(self, model: LlamaForCausalLM, num_seqs: int, max_len: int, block_size: int = 4):
        self.model = model
        self.block_size = block_size
        blocks_per_seq = -(-max_len // block_size)
        num_blocks = num_seqs * blocks_per_seq + 1
        self.kv_caches = allocate_kv_cache(model.config, num_blocks, block_size)
        perm = torch.randperm(num_blocks - 1) + 1  # block 0 stays unused padding
        self.tables = perm.view(num_seqs, blocks_per_seq).to(torch.int32)
        self.lens = [0] * num_seqs

    @torch.no_grad()
    def step(self, chunks: dict[int, Sequence[int]]) -> dict[int, torch.Tensor]:
        """Append `chunks[seq]` to each listed sequence in one call; returns each chunk's
        (len, vocab) logits."""
        ids, positions, slots, seq_lens, starts = [], [], [], [], [0]
        for s, toks in chunks.items():
            start = self.lens[s]
            for p in range(start, start + len(toks)):
                block = int(self.tables[s, p // self.block_size])
                slots.append(block * self.block_size + p % self.block_size)
            ids += list(toks)
            positions += range(start, start + len(toks))
            self.lens[s] += len(toks)
            seq_lens.append(self.lens[s])
            starts.append(starts[-1] + len(toks))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=self.tables[list(chunks)],
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            max_query_len=max(len(t) for t in chunks.values()),
            max_seq_len=max(seq_lens),
            seq_lens_host=tuple(seq_lens),
            query_start_loc_host=tuple(starts),
        )
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), meta, self.kv_caches)
        logits = self.model.compute_logits(hidden)
        return {s: logits[starts[i] : starts[i + 1]] for i, s in enumerate(chunks)}
