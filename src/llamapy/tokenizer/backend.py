"""Build `tokenizers` (Rust) models that run llama.cpp's algorithms on raw fragments.

Special-token splitting, BOS/EOS and the SPM space prefix happen in Python
(`tokenizer.py`); what reaches these models is one raw fragment at a time.

- BPE (`llm_tokenizer_bpe_session`): the pre-tokenizer regexes as a sequence of isolated
  splits, GPT-2 byte-to-unicode mapping, rank-ordered merges (first occurrence wins, as
  `bpe_ranks.emplace`), `ignore_merges` for llama3-style vocabs.
- SPM (`llm_tokenizer_spm_session`): llama.cpp merges the adjacent pair whose merged text is
  the highest-scoring token. That is BPE whose merge list is every split of every token into
  two tokens, ranked by the merged token's score; unknown characters fall back to
  `<0xXX>` byte tokens.
- WPM (`llm_tokenizer_wpm_session`): BERT normalization and punctuation splitting, then
  greedy longest-match WordPiece; GGUF stores word starts as `▁word` and continuations bare.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from llamapy.switches import switched_off
from llamapy.tokenizer.vocab import TokenAttr, Vocab

_BYTE = int(TokenAttr.BYTE)  # a plain int: int & IntFlag is a Python call per token

log = logging.getLogger(__name__)


def build_backend(vocab: Vocab) -> Tokenizer:
    if vocab.kind == "bpe":
        return _build_bpe(vocab)
    if vocab.kind == "spm":
        return _build_spm(vocab)
    return _build_wpm(vocab)


def _merge_pairs(vocab: Vocab) -> list[tuple[str, str]]:
    """`tokenizer.ggml.merges` as pairs, split at the first space after position 0."""
    t2i = vocab.token_to_id
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    dropped = 0
    for merge in vocab.merges:
        pos = merge.find(" ", 1)
        if pos < 0:
            dropped += 1
            continue
        pair = (merge[:pos], merge[pos + 1 :])
        if pair in seen:
            continue  # llama.cpp: bpe_ranks.emplace keeps the first rank
        seen.add(pair)
        if pair[0] in t2i and pair[1] in t2i and pair[0] + pair[1] in t2i:
            pairs.append(pair)
        else:
            dropped += 1
    if dropped:
        log.debug("%d merges dropped (malformed or producing no token)", dropped)
    return pairs


def _build_bpe(vocab: Vocab) -> Tokenizer:
    assert vocab.pre is not None
    byte_level = vocab.pre.byte_encode
    model = models.BPE(
        vocab=vocab.token_to_id,
        merges=_merge_pairs(vocab),
        ignore_merges=vocab.ignore_merges,
        byte_fallback=not byte_level,
    )
    tok = Tokenizer(model)
    if byte_level:
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in vocab.pre.regexes]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    # else (gemma4): newline runs are split off in Python, where llama.cpp's special case for
    # them lives too.
    return tok


def _build_spm(vocab: Vocab) -> Tokenizer:
    model = models.BPE(
        vocab=vocab.token_to_id,
        merges=_spm_merges(vocab),
        byte_fallback=any(a & _BYTE for a in vocab.attrs),
    )
    return Tokenizer(model)


def _pair_spm_merges(vocab: Vocab) -> list[tuple[str, str]]:
    """llama.cpp's SPM merges as BPE merges: every split of a token into two tokens, ranked
    by the merged token's score (higher first), then its id, then the cut."""
    t2i = vocab.token_to_id
    scores = vocab.scores.tolist() if vocab.scores is not None else None
    ranked: list[tuple[float, int, int, str, str]] = []
    for token_id, text in enumerate(vocab.tokens):
        score = scores[token_id] if scores is not None else 0.0
        for cut in range(1, len(text)):
            left = text[:cut]
            if left in t2i:
                right = text[cut:]
                if right in t2i:
                    ranked.append((-score, token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


# SPM vocabularies of this many tokens and more keep their merges on disk (cache_dir() /
# tokenizers), keyed by a digest of the tokens and scores they derive from: Gemma 3's 262k
# tokens take ~0.8 s of Python to pair and ~0.15 s to read back. LLAMAPY_TOKENIZER_CACHE=0
# (or false / no / off, `switches.switched_off`) turns it off.
SPM_CACHE_MIN_TOKENS = 65536
_SPM_CACHE_VERSION = b"spm-merges-1"


def _spm_merges(vocab: Vocab) -> list[tuple[str, str]]:
    if len(vocab.tokens) < SPM_CACHE_MIN_TOKENS or switched_off("LLAMAPY_TOKENIZER_CACHE"):
        return _pair_spm_merges(vocab)
    path = _spm_cache_path(vocab)
    merges = _read_merges(path)
    if merges is None:
        merges = _pair_spm_merges(vocab)
        _write_merges(path, merges)
    return merges


def _spm_cache_path(vocab: Vocab) -> Path:
    from llamapy.hub import cache_dir

    digest = hashlib.blake2b(_SPM_CACHE_VERSION, digest_size=16)
    digest.update("\x00".join(vocab.tokens).encode("utf-8", "surrogatepass"))
    if vocab.scores is not None:
        digest.update(np.ascontiguousarray(vocab.scores, dtype=np.float32).tobytes())
    return cache_dir() / "tokenizers" / f"spm-merges-{digest.hexdigest()}.pickle"


class _PlainUnpickler(pickle.Unpickler):
    """Lists, tuples and strings only: a pickle naming any class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a merges cache")


def _read_merges(path: Path) -> list[tuple[str, str]] | None:
    """The cached merges, or None (missing, unreadable, malformed: rebuilt)."""
    try:
        with open(path, "rb") as f:
            merges = _PlainUnpickler(f).load()
    except FileNotFoundError:
        return None
    except Exception as exc:  # a truncated or foreign file: any unpickling error
        log.debug("ignoring the merges cache %s: %s", path, exc)
        return None
    if not isinstance(merges, list) or not all(
        type(m) is tuple and len(m) == 2 and type(m[0]) is str and type(m[1]) is str for m in merges
    ):
        log.debug("ignoring the merges cache %s: not a list of string pairs", path)
        return None
    return merges


def _write_merges(path: Path, merges: list[tuple[str, str]]) -> None:
    """Written to a temporary file and renamed into place; a cache that cannot be written
    (read-only home, full disk) is skipped."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
            tmp = f.name
            pickle.dump(merges, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("cannot write the merges cache %s: %s", path, exc)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _build_wpm(vocab: Vocab) -> Tokenizer:
    wp_vocab: dict[str, int] = {}
    normal = int(TokenAttr.NORMAL)
    for token_id, text in enumerate(vocab.tokens):
        if vocab.attrs[token_id] & normal:
            key = text[1:] if text.startswith("▁") else "##" + text
        else:
            key = text
        wp_vocab.setdefault(key, token_id)
    unk_id = vocab.ids.get("unk")
    unk = vocab.tokens[unk_id] if unk_id is not None else "[UNK]"
    wp_vocab.setdefault(unk, unk_id if unk_id is not None else 0)
    model = models.WordPiece(vocab=wp_vocab, unk_token=unk, max_input_chars_per_word=1 << 30)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=True,
        strip_accents=vocab.strip_accents,
        lowercase=vocab.lowercase,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok
