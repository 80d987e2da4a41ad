"""Tiny random-weight encoders of the nomic-bert and jina-bert-v2 architectures, as GGUF files
(tensor names and metadata as llama.cpp's convert_hf_to_gguf.py writes them) and as
transformers `NomicBertModel` folders, over a small WordPiece vocabulary.

Weights are integers / 128 drawn from a numpy Generator: exact in float32 on every machine,
so a seed and a spec give the same model everywhere (scripts/make_encoder_refs.py stores
llama.cpp's outputs for such models; `weights_digest` says whether CI rebuilt the same one).
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamapy.formats.gguf_writer import write_gguf

_TOKEN_TYPE_NORMAL, _TOKEN_TYPE_CONTROL = 1, 3
_POOLING_IDS = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORDS = (  # split when the vocabulary is built
    "the of and to in is it that for with as on be by this an are or from not at which "
    "if can you all have was will one but has may when there return value function object "
    "module file name type list string data method class use used new set default error "
    "python code call text line time number first each other any only such called given "
    "also must then more than into def none true false self path key dict int str float "
    "argument arguments attribute statement expression variable exception import help"
)
_PIECES = ("##s", "##ed", "##ing", "##er", "##es", "##ly", "##tion", "##al", "##ment", "##ity")


def wordpiece_vocab() -> list[str]:
    """A small uncased BERT vocabulary (HF form, "##" continuations): specials, single
    characters, their continuations, common suffixes and words."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = [*SPECIALS, *chars, *(f"##{c}" for c in string.ascii_lowercase + string.digits)]
    vocab += [*_PIECES, *_WORDS.split(), "é", "##é", "東", "京"]
    return list(dict.fromkeys(vocab))


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder's shape and the architecture's variant."""

    arch: str  # "nomic-bert" or "jina-bert-v2"
    hidden: int = 32
    heads: int = 4
    layers: int = 2
    ffn: int = 48
    context: int = 512
    rope_theta: float = 1000.0  # nomic-bert
    fused_qkv: bool = True  # nomic-bert: attn_qkv; jina-bert-v2 always has attn_q/k/v
    geglu_fused: bool = True  # jina-bert-v2: ffn_up holds [gate; up], else ffn_gate
    qk_norm: bool = False  # jina-bert-v2: attn_q_norm / attn_k_norm
    norm_2: bool = False  # jina-bert-v2 (code): attn_norm_2
    rank_head: bool = False  # jina-reranker-v1: `cls` (1, hidden) + tanh, rank pooling
    pooling: str = "mean"


# The variants every test runs (live against llama.cpp with fresh seeds; in CI against the
# committed llama.cpp outputs of tests/embedding/data/encoders, made with REF_SEEDS).
SPECS = {
    "nomic-bert": EncoderSpec("nomic-bert"),
    "nomic-bert-split-qkv": EncoderSpec("nomic-bert", heads=2, fused_qkv=False, rope_theta=1e4),
    "jina-bert-v2": EncoderSpec("jina-bert-v2"),
    "jina-bert-v2-code": EncoderSpec(
        "jina-bert-v2", hidden=48, heads=6, geglu_fused=False, qk_norm=True, norm_2=True
    ),
}
SPECS["jina-reranker"] = EncoderSpec("jina-bert-v2", rank_head=True, pooling="rank")
REF_SEEDS = {"nomic-bert": 101, "nomic-bert-split-qkv": 102, "jina-bert-v2": 103}
REF_SEEDS |= {"jina-bert-v2-code": 104, "jina-reranker": 105}
POOLING_CASES = (("mean", False), ("mean", True), ("cls", False), ("cls", True))


def llama_cpp_embed(
    path: Path, texts: list[str], pooling: str, normalize: bool
) -> tuple[torch.Tensor, list[list[int]]]:
    """llama.cpp's pooled embeddings of `texts` (one batch) and its token ids."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        embedding=True,
        n_ctx=2048,
        n_batch=2048,
        n_ubatch=2048,
        pooling_type=_POOLING_IDS[pooling],
        verbose=False,
    )
    ids = [llm.tokenize(t.encode("utf-8")) for t in texts]
    out = torch.tensor(llm.embed(texts, normalize=normalize), dtype=torch.float32)
    llm.close()
    return out, ids


def llama_cpp_rank(path: Path, token_ids: list[list[int]]) -> torch.Tensor:
    """llama.cpp's rank-pooling scores (B,) of token sequences decoded in one batch (through
    the low-level API: llama-cpp-python's embed() reads n_embd values per sequence)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        embedding=True,
        n_ctx=2048,
        n_batch=2048,
        n_ubatch=2048,
        pooling_type=_POOLING_IDS["rank"],
        verbose=False,
    )
    llm._batch.reset()
    for seq, ids in enumerate(token_ids):
        llm._batch.add_sequence(ids, seq, True)
    llm._ctx.decode(llm._batch)
    ctx = llm._ctx.ctx
    scores = [llama_cpp.llama_get_embeddings_seq(ctx, seq)[0] for seq in range(len(token_ids))]
    llm.close()
    return torch.tensor(scores, dtype=torch.float32)


def _draw(rng: np.random.Generator, shape: tuple[int, ...], scale: float, offset=0.0):
    """Uniform on [offset - scale, offset + scale] in steps of 1 / 128 (exact in float32)."""
    steps = max(1, round(scale * 64))
    values = rng.integers(-2 * steps, 2 * steps + 1, size=shape) / 128.0 + offset
    return torch.from_numpy(values.astype(np.float32))


def encoder_tensors(spec: EncoderSpec, seed: int) -> list[tuple[str, torch.Tensor]]:
    """The GGUF tensors of a random encoder, in llama.cpp's names and file order."""
    rng = np.random.default_rng(seed)
    d, f, n_vocab = spec.hidden, spec.ffn, len(wordpiece_vocab())
    lin = 1.0 / d**0.5
    out: list[tuple[str, torch.Tensor]] = [
        ("token_embd.weight", _draw(rng, (n_vocab, d), 1.0)),
        ("token_types.weight", _draw(rng, (2, d), 0.5)),
        ("token_embd_norm.weight", _draw(rng, (d,), 0.2, 1.0)),
        ("token_embd_norm.bias", _draw(rng, (d,), 0.2)),
    ]
    jina = spec.arch == "jina-bert-v2"
    for il in range(spec.layers):
        p = f"blk.{il}."
        t: list[tuple[str, torch.Tensor]] = []
        if spec.arch == "nomic-bert" and spec.fused_qkv:
            t.append((p + "attn_qkv.weight", _draw(rng, (3 * d, d), lin)))
        else:
            for x in "qkv":
                t.append((p + f"attn_{x}.weight", _draw(rng, (d, d), lin)))
                if jina:
                    t.append((p + f"attn_{x}.bias", _draw(rng, (d,), 0.2)))
        if jina and spec.qk_norm:
            for x in "qk":
                t.append((p + f"attn_{x}_norm.weight", _draw(rng, (d,), 0.2, 1.0)))
                t.append((p + f"attn_{x}_norm.bias", _draw(rng, (d,), 0.2)))
        t.append((p + "attn_output.weight", _draw(rng, (d, d), lin)))
        if jina:
            t.append((p + "attn_output.bias", _draw(rng, (d,), 0.2)))
        t.append((p + "attn_output_norm.weight", _draw(rng, (d,), 0.2, 1.0)))
        t.append((p + "attn_output_norm.bias", _draw(rng, (d,), 0.2)))
        if jina and spec.norm_2:
            t.append((p + "attn_norm_2.weight", _draw(rng, (d,), 0.2, 1.0)))
            t.append((p + "attn_norm_2.bias", _draw(rng, (d,), 0.2)))
        if jina and spec.geglu_fused:
            t.append((p + "ffn_up.weight", _draw(rng, (2 * f, d), lin)))
        else:
            t.append((p + "ffn_up.weight", _draw(rng, (f, d), lin)))
            t.append((p + "ffn_gate.weight", _draw(rng, (f, d), lin)))
        t.append((p + "ffn_down.weight", _draw(rng, (d, f), 1.0 / f**0.5)))
        if jina:
            t.append((p + "ffn_down.bias", _draw(rng, (d,), 0.2)))
        t.append((p + "layer_output_norm.weight", _draw(rng, (d,), 0.2, 1.0)))
        t.append((p + "layer_output_norm.bias", _draw(rng, (d,), 0.2)))
        out += t
    if spec.rank_head:
        out += [("cls.weight", _draw(rng, (1, d), lin)), ("cls.bias", _draw(rng, (1,), 0.2))]
    return out


def encoder_metadata(spec: EncoderSpec) -> dict[str, Any]:
    """llama.cpp's `{arch}.*` keys and a WordPiece vocabulary as BertModel.set_vocab writes it
    (phantom-space tokens)."""
    a = spec.arch
    vocab = wordpiece_vocab()
    types = [_TOKEN_TYPE_CONTROL if t in SPECIALS else _TOKEN_TYPE_NORMAL for t in vocab]

    def phantom(tok: str, kind: int) -> str:
        if kind == _TOKEN_TYPE_CONTROL:
            return tok
        return tok[2:] if tok.startswith("##") else "\u2581" + tok

    md: dict[str, Any] = {
        "general.name": f"tiny {a}",
        f"{a}.context_length": spec.context,
        f"{a}.embedding_length": spec.hidden,
        f"{a}.feed_forward_length": spec.ffn,
        f"{a}.block_count": spec.layers,
        f"{a}.attention.head_count": spec.heads,
        f"{a}.attention.layer_norm_epsilon": 1e-12,
        f"{a}.attention.causal": False,
        f"{a}.pooling_type": _POOLING_IDS[spec.pooling],
    }
    if a == "nomic-bert":
        md[f"{a}.rope.freq_base"] = spec.rope_theta
    ids = {t: i for i, t in enumerate(vocab)}
    md.update(
        {
            "tokenizer.ggml.token_type_count": 2,
            "tokenizer.ggml.model": "bert",
            "tokenizer.ggml.pre": "jina-v2-en" if a == "jina-bert-v2" else "default",
            "tokenizer.ggml.tokens": [phantom(t, k) for t, k in zip(vocab, types, strict=True)],
            "tokenizer.ggml.token_type": types,
            # as gguf.SpecialVocab writes them (llama.cpp reads BOS, not cls_token_id)
            "tokenizer.ggml.bos_token_id": ids["[CLS]"],
            "tokenizer.ggml.eos_token_id": ids["[SEP]"],
            "tokenizer.ggml.unknown_token_id": ids["[UNK]"],
            "tokenizer.ggml.seperator_token_id": ids["[SEP]"],
            "tokenizer.ggml.padding_token_id": ids["[PAD]"],
            "tokenizer.ggml.cls_token_id": ids["[CLS]"],
            "tokenizer.ggml.mask_token_id": ids["[MASK]"],
        }
    )
    return md


def write_encoder_gguf(
    path: Path,
    spec: EncoderSpec,
    seed: int,
    *,
    drop: tuple[str, ...] = (),
    replace: dict[str, torch.Tensor] | None = None,
    metadata_drop: tuple[str, ...] = (),
) -> Path:
    """A random encoder as an F32 GGUF; `drop` / `replace` / `metadata_drop` break it on
    purpose (error tests)."""
    tensors = [
        (n, (replace or {}).get(n, t), None)
        for n, t in encoder_tensors(spec, seed)
        if n not in drop
    ]
    md = {k: v for k, v in encoder_metadata(spec).items() if k not in metadata_drop}
    return write_gguf(path, spec.arch, md, tensors)


def weights_digest(spec: EncoderSpec, seed: int) -> str:
    """sha256 of a model's tensors and metadata (what the GGUF holds, whatever the writer)."""
    h = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update(json.dumps(encoder_metadata(spec), sort_keys=True, ensure_ascii=True).encode())
    for name, t in encoder_tensors(spec, seed):
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# -- Hugging Face folders ---------------------------------------------------------------------


def save_wordpiece_tokenizer(folder: Path) -> None:
    """tokenizer.json of `wordpiece_vocab()` as BERT's uncased tokenizer (the `tokenizers`
    library's WordPiece with BertNormalizer, [CLS] ... [SEP]), plus vocab.txt and the config."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(wordpiece_vocab())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": 512,
        **{f"{k}_token": f"[{k.upper()}]" for k in ("unk", "sep", "pad", "cls", "mask")},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter of `model` redrawn: matrices about 1 / sqrt(fan_in), norm weights
    about 1, biases about 0.2 (transformers' init leaves norms at 1 and biases at 0)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                scale = 1.0 if "embeddings" in name else 1.0 / p.shape[1] ** 0.5
                p.copy_(_draw(rng, tuple(p.shape), scale))
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(_draw(rng, tuple(p.shape), 0.2, 1.0))
            else:
                p.copy_(_draw(rng, tuple(p.shape), 0.2))


def make_nomic_folder(folder: Path, seed: int, *, hidden: int = 32, heads: int = 4):
    """A transformers NomicBertModel with random weights, saved with its tokenizer; returns
    the model (eval mode, float32)."""
    from transformers import NomicBertConfig, NomicBertModel

    theta = float(np.random.default_rng(seed).choice([100.0, 1000.0, 10000.0]))
    cfg = NomicBertConfig(
        vocab_size=len(wordpiece_vocab()),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=48,
        max_position_embeddings=2048,  # as nomic-embed-text (llama.cpp's converter checks)
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    model = NomicBertModel(cfg).eval()
    randomize_(model, seed)
    model.save_pretrained(folder)
    save_wordpiece_tokenizer(folder)
    return model


def nomic_with_native_names(model: torch.nn.Module, folder: Path, out: Path) -> Path:
    """The folder with transformers' in-memory names (`layers.N.self_attn.q_proj`, ...)
    instead of the custom-code layout that save_pretrained writes back (fused `Wqkv`,
    `mlp.fc11` / `fc12` / `fc2`, `emb_ln`, `norm1` / `norm2`)."""
    from safetensors.torch import save_file

    _copy_folder(folder, out, skip=("model.safetensors",))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    return out


def nomic_with_original_config(folder: Path, out: Path) -> Path:
    """The folder with nomic-ai's custom-code config.json (GPT-2 style keys), as the
    nomic-embed-text checkpoints have it."""
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    _copy_folder(folder, out, skip=("config.json",))
    original = {
        "architectures": ["NomicBertModel"],
        "model_type": "nomic_bert",
        "activation_function": "swiglu",
        "causal": False,
        "n_embd": cfg["hidden_size"],
        "n_head": cfg["num_attention_heads"],
        "n_layer": cfg["num_hidden_layers"],
        "n_inner": cfg["intermediate_size"],
        "n_positions": 8192,
        "max_trained_positions": cfg["max_position_embeddings"],
        "layer_norm_epsilon": cfg["layer_norm_eps"],
        "rotary_emb_base": cfg["rope_parameters"]["rope_theta"],
        "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False,
        "rotary_emb_scale_base": None,
        "prenorm": False,
        "qkv_proj_bias": False,
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
        "type_vocab_size": cfg["type_vocab_size"],
        "vocab_size": cfg["vocab_size"],
    }
    (out / "config.json").write_text(json.dumps(original, indent=2), encoding="utf-8")
    return out


def _copy_folder(folder: Path, out: Path, skip: tuple[str, ...]) -> None:
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name not in skip:
            shutil.copy(f, out / f.name)


def _jina_hf_name(name: str, code: bool) -> str:
    """A GGUF name of a jina-bert-v2 model as JinaBert checkpoints name it (jina-v2-en, or
    jina-v2-code's `up_gated_layer` / `down_layer` / `layer_norm_1` / `layer_norm_2`)."""
    fixed = {
        "token_embd.weight": "embeddings.word_embeddings.weight",
        "token_types.weight": "embeddings.token_type_embeddings.weight",
        "token_embd_norm.weight": "embeddings.LayerNorm.weight",
        "token_embd_norm.bias": "embeddings.LayerNorm.bias",
    }
    if name in fixed:
        return fixed[name]
    _, il, stem, suffix = name.split(".")
    parts = {
        "attn_q": "attention.self.query",
        "attn_k": "attention.self.key",
        "attn_v": "attention.self.value",
        "attn_q_norm": "attention.self.layer_norm_q",
        "attn_k_norm": "attention.self.layer_norm_k",
        "attn_output": "attention.output.dense",
        "attn_output_norm": "attention.output.LayerNorm",
        "attn_norm_2": "layer_norm_1",
        "ffn_gate": "mlp.gated_layers_w",
        "ffn_up": "mlp.up_gated_layer" if code else "mlp.gated_layers",
        "ffn_down": "mlp.down_layer" if code else "mlp.wo",
        "layer_output_norm": "layer_norm_2" if code else "mlp.layernorm",
    }
    return f"encoder.layer.{il}.{parts[stem]}.{suffix}"


def save_jina_folder(folder: Path, spec: EncoderSpec, seed: int) -> Path:
    """The random jina-bert-v2 model of (spec, seed) as a JinaBertModel folder (custom-code
    names and config; GELU as ggml computes it: `gelu_new`), with its tokenizer."""
    from safetensors.torch import save_file

    code = spec.norm_2  # jina-v2-code's names come with its second attention norm
    tensors = {}
    for name, t in encoder_tensors(spec, seed):
        if name.endswith("ffn_up.weight") and not spec.geglu_fused:  # split gate / up
            hf = f"encoder.layer.{name.split('.')[1]}.mlp.gated_layers_v.weight"
        else:
            hf = _jina_hf_name(name, code)
        tensors[hf] = t.contiguous()
    save_wordpiece_tokenizer(folder)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "architectures": ["JinaBertModel"],
        "model_type": "bert",
        "auto_map": {"AutoModel": "jinaai/jina-bert-implementation--modeling_bert.JinaBertModel"},
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "intermediate_size": spec.ffn,
        "max_position_embeddings": spec.context,
        "vocab_size": len(wordpiece_vocab()),
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu_new",
        "position_embedding_type": "alibi",
        "feed_forward_type": "geglu",
        "pad_token_id": 0,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
