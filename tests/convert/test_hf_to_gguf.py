"""`llamapy convert` against llama.cpp's own converter and against transformers.

Each run draws tiny random-weight transformers models (tests/models/tiny_models.py), converts
each folder with llamapy and with llama.cpp's convert_hf_to_gguf machinery, and checks that
the tensors are the same bytes, the hyperparameter keys the same values, and that llama.cpp
(llama-cpp-python) running llamapy's file gives transformers' logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from llama_cpp_tools import llama_cpp, needs_llama_cpp

sys.path.insert(0, str(Path(__file__).parent.parent / "models"))
from tiny_models import (  # noqa: E402
    VOCAB,
    PagedRunner,
    assert_logits_close,
    convert_to_gguf,
    hf_logits,
    save_folder,
    tiny_config,
    tiny_model,
)

from llamapy.convert.hf_to_gguf import hf_source  # noqa: E402
from llamapy.convert.quantize_model import quantize_model  # noqa: E402
from llamapy.formats.gguf_file import GGUFFile  # noqa: E402
from llamapy.quant.presets import QuantOptions, parse_preset  # noqa: E402
from llamapy.tokenizer import Tokenizer  # noqa: E402

ARCHS = [
    "llama",
    "llama-gqa",
    "llama-rope-llama3",
    "llama-rope-linear",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma3",
]
# Keys the two converters write differently by design (names, provenance, file type).
_IGNORED = ("general.", "tokenizer.")


def convert(folder: Path, out: Path, outtype: str = "F32", *, with_vocab: bool = False) -> Path:
    source = hf_source(folder, with_vocab=with_vocab)
    try:
        quantize_model(source, out, QuantOptions(parse_preset(outtype)))
    finally:
        source.close()
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """arch -> (transformers model, folder, llamapy's GGUF)."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"tiny model seed: {seed}")
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for i, arch in enumerate(ARCHS):
        model = tiny_model(tiny_config(arch), seed + i)
        folder = save_folder(model, root / arch)
        out[arch] = (model, folder, convert(folder, root / f"{arch}.gguf"))
    return out


@pytest.fixture(scope="module")
def reference_files(zoo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> the GGUF llama.cpp's own converter writes from the same folder."""
    from testdata import llama_cpp_sdist

    try:
        vendor = llama_cpp_sdist()
    except RuntimeError as e:
        pytest.skip(f"llama.cpp's converter is not available: {e}")
    root = tmp_path_factory.mktemp("convert_ref")
    files = {arch: root / f"{arch}.gguf" for arch in ARCHS}
    convert_to_gguf(vendor, [(zoo[arch][1], files[arch]) for arch in ARCHS])
    return files


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else value


@pytest.mark.parametrize("arch", ARCHS)
def test_same_tensors_and_keys_as_llama_cpp(arch: str, zoo, reference_files) -> None:
    ours, ref = zoo[arch][2], reference_files[arch]
    with GGUFFile(ours) as a, GGUFFile(ref) as b:
        assert sorted(a.tensor_infos) == sorted(b.tensor_infos)
        for name, info in b.tensor_infos.items():
            mine = a.tensor_infos[name]
            assert (mine.qtype, mine.shape) == (info.qtype, info.shape), name
            assert torch.equal(a.raw(name), b.raw(name)), f"{name} differs"
        for key, value in b.metadata.items():
            if key.startswith(_IGNORED):
                continue
            assert key in a.metadata, f"llamapy lacks {key}"
            assert _plain(a.metadata[key]) == pytest.approx(_plain(value)), key


@pytest.mark.parametrize("arch", ARCHS)
def test_llamapy_runs_it_as_transformers(arch: str, zoo) -> None:
    """llamapy reading the GGUF (NORM rope for llama, stored 1 + w norms) = transformers."""
    from llamapy.formats import open_model_file
    from llamapy.models import build_causal_lm

    model, _, ours = zoo[arch]
    ids = torch.randint(0, VOCAB, (11,)).tolist()
    lm = build_causal_lm(open_model_file(ours))
    got = PagedRunner(lm, num_seqs=1, max_len=len(ids)).step({0: ids})[0]
    assert_logits_close(got, hf_logits(model, ids))


@needs_llama_cpp
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_runs_it_as_transformers(arch: str, zoo) -> None:
    model, _, ours = zoo[arch]
    lm = llama_cpp.Llama(
        str(ours), logits_all=True, n_ctx=32, n_threads=2, verbose=False, type_k=0, type_v=0
    )  # F32 KV cache
    ids = torch.randint(0, VOCAB, (13,)).tolist()
    lm.eval(ids)
    got = torch.tensor(np.array(lm.scores[: len(ids)]))
    ref = hf_logits(model, ids)
    # float32 throughout: rounding only (~1e-5 of the scale); a wrong permutation, norm
    # offset or rope gives differences of the order of the logits themselves
    tol = 1e-3 * max(1.0, ref.abs().max().item())
    assert (got - ref).abs().max().item() < tol


def test_f16_and_q8_0_outtypes(zoo, tmp_path: Path) -> None:
    """As convert_hf_to_gguf's --outtype: matrices in the type, 1-D tensors float32."""
    folder = zoo["qwen2"][1]
    for outtype, qtype in (("F16", "F16"), ("Q8_0", "Q8_0"), ("BF16", "BF16")):
        with GGUFFile(convert(folder, tmp_path / f"{outtype}.gguf", outtype)) as f:
            for name, info in f.tensor_infos.items():
                want = "F32" if len(info.shape) == 1 else qtype
                assert info.qtype.name == want, (outtype, name)


# -- tokenizers -------------------------------------------------------------------------------

_TEXTS = [
    "Hello world! The quick brown fox, 123456 jumps.",
    "  leading spaces\tand\ttabs\nnew lines\n\n",
    "Ünïcödé: café, naïve, 東京, 🦙 llama",
    "def f(x):\n    return x ** 2  # square",
]


def _train_bpe(path: Path) -> Path:
    """A byte-level BPE (GPT-2's pre-tokenizer) trained here on some Python sources."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [Path(json.__file__).read_text(), *_TEXTS]
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path))
    return path


def test_gpt2_bpe_tokenizer(tmp_path: Path) -> None:
    import tokenizers

    folder = tmp_path / "bpe"
    model = tiny_model(tiny_config("llama", vocab_size=400), 7)
    save_folder(model, folder)
    _train_bpe(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "add_bos_token": False,
                "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            }
        )
    )
    out = convert(folder, tmp_path / "bpe.gguf", with_vocab=True)
    with GGUFFile(out) as f:
        md = f.metadata
        assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-2"
        assert md["tokenizer.ggml.bos_token_id"] == 1 and md["tokenizer.ggml.eos_token_id"] == 2
        assert md["tokenizer.chat_template"].startswith("{% for m in messages %}")
        assert list(md["tokenizer.ggml.token_type"][:3]) == [3, 3, 3]  # control
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    ours = Tokenizer.from_gguf(out)  # llama.cpp's tokenizer semantics in llamapy
    for text in _TEXTS:
        want = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special=False) == want, text
        assert ours.decode(want) == text
    if llama_cpp is not None:
        lm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
        for text in _TEXTS:
            want = hf.encode(text, add_special_tokens=False).ids
            assert lm.tokenize(text.encode(), add_bos=False, special=False) == want, text
            assert lm.detokenize(want).decode() == text


@needs_llama_cpp
def test_minilm_bert_as_llama_cpp_and_transformers(minilm_path: Path, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 folder: llama.cpp embeds with llamapy's file as
    transformers + mean pooling (the sentence-transformers recipe) does."""
    pytest.importorskip("transformers")
    from transformers import AutoModel, AutoTokenizer

    out = convert(minilm_path, tmp_path / "minilm.gguf", with_vocab=True)
    lm = llama_cpp.Llama(
        str(out), embedding=True, n_ctx=128, n_threads=2, verbose=False, type_k=0, type_v=0
    )
    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    for text in _TEXTS[:3]:
        assert lm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"]
        got = torch.tensor(lm.embed(text, normalize=False))
        with torch.no_grad():
            ref = model(**tok(text, return_tensors="pt")).last_hidden_state[0].mean(0)
        # ggml's GELU reads an fp16 table: ~1e-3 of the scale; a wrong tensor gives ~1
        assert (got - ref).abs().max().item() < 3e-3 * max(1.0, ref.abs().max().item())
        assert torch.nn.functional.cosine_similarity(got, ref, dim=0).item() > 0.99999


def test_sentencepiece_bpe_tokenizer(tmp_path: Path) -> None:
    """A SentencePiece-style BPE (byte fallback, '▁' for spaces, as Llama 2 / Gemma fast
    tokenizers) trained here: llama.cpp's score-ordered SPM merging gives its tokens."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens]
    )
    tok.train_from_iterator([Path(json.__file__).read_text(), *_TEXTS], trainer)
    folder = save_folder(tiny_model(tiny_config("llama", vocab_size=600), 5), tmp_path / "spm")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    out = convert(folder, tmp_path / "spm.gguf", with_vocab=True)
    with GGUFFile(out) as f:
        md = f.metadata
        assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.add_space_prefix"]
        assert md["tokenizer.ggml.token_type"][3 + 0x41] == 6  # <0x41>: a byte token
        assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.unknown_token_id"]) == (1, 0)
    ours = Tokenizer.from_gguf(out)
    for text in _TEXTS:
        assert ours.encode(text, add_special=False) == tok.encode(text).ids, text
    if llama_cpp is not None:
        lm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
        for text in _TEXTS:
            want = tok.encode(text).ids
            assert lm.tokenize(text.encode(), add_bos=False, special=False) == want, text
            assert lm.detokenize(want).decode() == " " + text  # the dummy prefix stays
