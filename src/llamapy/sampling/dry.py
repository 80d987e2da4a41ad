"""DRY ("don't repeat yourself"): penalize tokens that would extend a repeat in the history.

As llama.cpp's llama_sampler_dry (ported there from KoboldCpp, PR 982 by pi6am). The history
(prompt + generated, the last dry_penalty_last_n tokens) is scanned on the host per row;
the result is a few (token, penalty) pairs, applied to the batch's logits in one scatter.

Sequence breakers are strings; like llama.cpp's get_overlapping_token_sequences, each is
turned into "head token -> tail token sequences" over the model's token texts: a token whose
text contains the breaker is a breaker by itself (empty tail), and a token whose text ends
with a proper prefix of the breaker is a head, followed by the tokenization of the rest.
`DryVocab` computes the token texts once per model and caches the processed breakers.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch

from llamapy.sampling.params import SamplingParams

# head token -> the tails that complete a breaker after it (() = the head alone)
Breakers = Mapping[int, tuple[tuple[int, ...], ...]]

_MAX_CHAR_LEN = 40  # llama_sampler_init_dry: breakers are cut to 40 bytes ...
_MAX_SEQ_LEN = 20  # ... and their tails to 20 tokens
_FLOAT_MAX_LOG = 88.7228391  # log(FLT_MAX): clamps the exponent of dry_base
_CACHE_SIZE = 16


class DryVocab:
    """A model's token texts and tokenizer, for turning breaker strings into token sequences.

    Args:
        token_text: the bytes one token detokenizes to (llama_vocab::detokenize({id}, true)).
        encode: text -> token ids, without special tokens (tokenize(s, false, false)).
        vocab_size: the number of token ids.
    """

    def __init__(
        self,
        token_text: Callable[[int], bytes],
        encode: Callable[[str], list[int]],
        vocab_size: int,
    ) -> None:
        self._token_text = token_text
        self._encode = encode
        self.vocab_size = vocab_size
        self._texts: list[bytes] | None = None
        self._cache: OrderedDict[tuple[str, ...], Breakers] = OrderedDict()

    @classmethod
    def from_tokenizer(cls, tokenizer) -> DryVocab:  # noqa: ANN001 (llamapy.tokenizer.Tokenizer)
        return cls(
            lambda t: tokenizer.decode_bytes([t]),
            lambda s: tokenizer.encode(s, add_special=False, parse_special=False),
            tokenizer.vocab_size,
        )

    @property
    def texts(self) -> list[bytes]:
        if self._texts is None:  # once per model, on the first DRY request
            self._texts = [self._token_text(t) for t in range(self.vocab_size)]
        return self._texts

    def breakers(self, strings: Sequence[str]) -> Breakers:
        """The processed breakers of `strings`, cached (most requests use the defaults)."""
        key = tuple(strings)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        out: dict[int, list[tuple[int, ...]]] = {}
        for s in key:
            for head, tail in self._overlapping_sequences(s.encode("utf-8")[:_MAX_CHAR_LEN]):
                tails = out.setdefault(head, [])
                if tail not in tails:
                    tails.append(tail)
        result = {head: tuple(tails) for head, tails in out.items()}
        self._cache[key] = result
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def _overlapping_sequences(self, s: bytes) -> list[tuple[int, tuple[int, ...]]]:
        # as get_overlapping_token_sequences: a word that contains s is a breaker alone; a
        # word ending with s[:j] (0 < j < len(s)) is a head whose tail tokenizes s[j:]
        found: list[tuple[int, tuple[int, ...]]] = []
        tails: dict[int, tuple[int, ...]] = {}
        ends = set(s[: len(s) - 1])  # the last byte of a word that may end with a prefix of s
        for token, word in enumerate(self.texts):
            if s in word:
                found.append((token, ()))
                continue
            if not word or word[-1] not in ends:
                continue
            for j in range(min(len(word), len(s) - 1), 0, -1):  # longest overlap first
                if word.endswith(s[:j]):
                    if j not in tails:
                        rest = s[j:].decode("utf-8", errors="replace")
                        tails[j] = tuple(self._encode(rest)[:_MAX_SEQ_LEN])
                    found.append((token, tails[j]))
        return found


def dry_penalties(
    history: Sequence[int], params: SamplingParams, breakers: Breakers
) -> dict[int, float]:
    """Token -> the amount DRY subtracts from its logit, for one row (llama_sampler_dry_apply)."""
    last_n = params.dry_penalty_last_n
    window = list(history) if last_n == -1 else list(history[-last_n:])
    n = len(window)
    allowed = params.dry_allowed_length
    if n <= allowed:
        return {}
    rev = window[::-1]  # rev[i] = llama.cpp's last_tokens.rat(i): i tokens from the end
    rep_limit = _repeat_limit(rev, breakers)
    if rep_limit < allowed:
        return {}
    repeat = _suffix_matches(rev, rep_limit)
    # step 3: the token after each repeat of length >= allowed would extend it
    longest: dict[int, int] = {}
    for i in range(n - 1):
        length = repeat[i]
        if length >= allowed:
            token = rev[n - 2 - i]
            if longest.get(token, -1) < length:
                longest[token] = length
    max_exponent = (
        int(_FLOAT_MAX_LOG / math.log(params.dry_base)) if params.dry_base > 1.000001 else 0
    )
    out = {}
    for token, length in longest.items():
        if () in breakers.get(token, ()):  # a single-token breaker is never penalized
            continue
        exponent = length - allowed
        if max_exponent > 0:
            exponent = min(exponent, max_exponent)
        out[token] = params.dry_multiplier * params.dry_base**exponent
    return out


def _repeat_limit(rev: list[int], breakers: Breakers) -> int:
    """Step 1: repeats may not reach back past the most recent sequence breaker."""
    n = len(rev)
    for i in range(n):
        tails = breakers.get(rev[i])
        if tails is None:
            continue
        longest = -1
        for tail in tails:  # the tail follows the head, i.e. lies closer to the end
            m = len(tail)
            if longest < m <= i and all(tail[k] == rev[i - k - 1] for k in range(m)):
                longest = m
        if longest >= 0:
            return i - longest
    return n


def _suffix_matches(rev: list[int], rep_limit: int) -> list[int]:
    """Step 2 (the Z-algorithm over the reversed window): repeat[last - k] = how many tokens
    ending k tokens before the end equal the tokens ending at the end, capped at rep_limit.
    """
    n = len(rev)
    last = n - 1
    repeat = [0] * n
    lt = rt = 0
    for k in range(1, n):
        if k > rt:
            m = 0
            while m + k < n and rev[m] == rev[m + k]:
                m += 1
            repeat[last - k] = min(m, rep_limit)
            if m > 0:
                lt, rt = k, k + m - 1
        else:
            p = k - lt
            right_len = rt - k + 1
            if repeat[last - p] < right_len:
                repeat[last - k] = min(repeat[last - p], rep_limit)
            else:
                i = rt + 1
                while i < n and rev[i] == rev[i - k]:
                    i += 1
                repeat[last - k] = min(i - k, rep_limit)
                lt, rt = k, i - 1
    return repeat


def apply_dry(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]] | torch.Tensor | None,
    rows: Sequence[int],
    vocab: DryVocab | None,
) -> None:
    """Subtract each listed row's DRY penalties from its logits, in place: (B, V)."""
    index_rows: list[int] = []
    index_ids: list[int] = []
    values: list[float] = []
    if rows and histories is None:
        raise ValueError("histories are required when a row has DRY")
    for r in rows:
        p = params[r]
        breakers = _breakers(p, vocab)
        history = histories[r]
        if isinstance(history, torch.Tensor):
            history = [t for t in history.tolist() if t >= 0]  # padded tensor rows
        for token, amount in dry_penalties(history, p, breakers).items():
            if 0 <= token < logits.shape[-1]:
                index_rows.append(r)
                index_ids.append(token)
                values.append(-amount)
    if not values:
        return
    dev = logits.device
    index = (torch.tensor(index_rows, device=dev), torch.tensor(index_ids, device=dev))
    logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=dev), accumulate=True)


def _breakers(p: SamplingParams, vocab: DryVocab | None) -> Breakers:
    if not p.dry_sequence_breakers:
        return {}
    if vocab is None:
        raise ValueError(
            "DRY sequence breakers need the model's vocabulary: build the Sampler with dry_vocab"
        )
    return vocab.breakers(p.dry_sequence_breakers)
