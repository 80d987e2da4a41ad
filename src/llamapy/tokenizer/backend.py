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

import logging

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

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
    t2i = vocab.token_to_id
    scores = vocab.scores
    ranked: list[tuple[float, int, int, str, str]] = []
    for token_id, text in enumerate(vocab.tokens):
        score = float(scores[token_id]) if scores is not None else 0.0
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in t2i and right in t2i:
                ranked.append((-score, token_id, cut, left, right))
    ranked.sort()
    model = models.BPE(
        vocab=t2i,
        merges=[(left, right) for _, _, _, left, right in ranked],
        byte_fallback=any(a & _BYTE for a in vocab.attrs),
    )
    return Tokenizer(model)


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
