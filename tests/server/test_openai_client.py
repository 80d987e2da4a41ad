"""The official `openai` client against a live server: chat and completions, streamed and not,
n, stop, seeds, max_tokens, logprobs."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.models

CHAT = [{"role": "user", "content": "Name three colors."}]
GREEDY = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120)


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.model_name()


def test_models_lists_the_served_model(client, model):
    assert [m.id for m in client.models.list()] == [model]


def test_chat_streamed_equals_not_streamed(client, model):
    # Both requests below find the whole prompt in the prefix cache: a cold prompt (prefilled
    # in one pass) and a cached one (its last token recomputed over cached K/V) can differ in
    # the last float bits of attention, and with 8-bit matmul inputs (the VNNI CPU kernels,
    # as llama.cpp) that can flip a near-tied greedy token. This test is about streaming.
    client.chat.completions.create(model=model, messages=CHAT, **GREEDY)
    whole = client.chat.completions.create(model=model, messages=CHAT, **GREEDY)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streamed_equals_not_streamed(client, model):
    whole = client.completions.create(model=model, prompt="The capital of France is", **GREEDY)
    assert whole.object == "text_completion" and whole.choices[0].text
    streamed = client.completions.create(
        model=model, prompt="The capital of France is", stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_n_choices(client, model):
    r = client.chat.completions.create(
        model=model, messages=CHAT, n=2, temperature=1.0, max_tokens=4, seed=7
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.message.content is not None for c in r.choices)
    streamed = client.completions.create(
        model=model, prompt="Once upon a time", n=2, max_tokens=4, seed=7, stream=True
    )
    assert {c.choices[0].index for c in streamed} == {0, 1}


def test_stop_string_ends_the_text(client, model):
    kwargs = {"model": model, "prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0}
    text = client.completions.create(**kwargs).choices[0].text
    stop = text.strip()[:2].strip() or text[:1]  # something the greedy text surely contains
    r = client.completions.create(stop=[stop], **kwargs)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


def test_seed_reproduces_a_sampled_reply(client, model):
    kwargs = {"model": model, "messages": CHAT, "temperature": 1.2, "max_tokens": 8}
    a = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    assert a == b


def test_max_tokens_gives_finish_reason_length(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=CHAT,
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(
        model=model, messages=CHAT, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        lps = [t.logprob for t in item.top_logprobs]
        assert lps == sorted(lps, reverse=True)


def test_completion_logprobs(client, model):
    r = client.completions.create(model=model, prompt="Hello", logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(
        len(top) <= 2 and x <= 0 for top, x in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=CHAT, max_tokens=1)
    assert e.value.body["code"] == "model_not_found"


def test_bad_field_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=CHAT, temperature=-1, max_tokens=1)
    assert e.value.body["param"] == "temperature"


def test_best_of_returns_the_most_likely_candidate(client, model):
    kwargs = {
        "model": model,
        "prompt": "My favourite animal is",
        "max_tokens": 4,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
    }
    extra = {"top_k": kwargs.pop("top_k"), "min_p": kwargs.pop("min_p")}
    # The same three candidates (choice i is seeded with seed + i), with their log-probs.
    every = client.completions.create(n=3, seed=11, logprobs=1, extra_body=extra, **kwargs)
    totals = {c.index: sum(c.logprobs.token_logprobs) for c in every.choices}
    best = client.completions.create(n=1, best_of=3, seed=11, extra_body=extra, **kwargs)
    assert len(best.choices) == 1
    winner = max(totals, key=totals.get)
    assert best.choices[0].text == every.choices[winner].text
    assert best.usage.completion_tokens == every.usage.completion_tokens


def test_best_of_smaller_than_n_is_a_400(client, model):
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=model, prompt="hi", n=2, best_of=1, max_tokens=2)
