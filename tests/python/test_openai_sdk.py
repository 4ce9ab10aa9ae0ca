"""The `openai` 3.57.0 SDK, in strict response-validation mode, against the real phi-serve:
every call shape of shared/api/CONTRACT.md section (b) works, and errors raise the SDK's
exception types."""

import json
import threading
import time

import httpx2
import openai
import pytest
from openai import OpenAI

from conftest import API_KEY, MODEL, MODEL_NAME, SECOND_KEY


def make_client(base_url: str, key: str = API_KEY) -> OpenAI:
    return OpenAI(
        base_url=base_url, api_key=key, max_retries=0, _strict_response_validation=True
    )


@pytest.fixture()
def client(server):
    c = make_client(server.url + "/v1")
    yield c
    c.close()


MESSAGES = [{"role": "user", "content": "hi"}]


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].object == "model"


def test_create(client):
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_create_with_openai_parameters(server):
    c = make_client(server.url + "/v1", key=SECOND_KEY)
    resp = c.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        max_completion_tokens=4,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        stop="\n\n",
        seed=42,
        temperature=0.7,
        top_p=0.9,
        n=2,
        user="someone",
        response_format={"type": "text"},
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens <= 8
    again = c.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        max_completion_tokens=4,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        stop="\n\n",
        seed=42,
        temperature=0.7,
        top_p=0.9,
        n=2,
    )
    assert [x.message.content for x in again.choices] == [x.message.content for x in resp.choices]
    c.close()


def test_stream_with_include_usage(client):
    expected = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage.total_tokens == expected.usage.total_tokens
    assert all(c.usage is None for c in content_chunks)
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == expected.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == expected.choices[0].finish_reason


def test_logprobs(client):
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=3,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token


def _token_id(piece: str) -> int:
    """The tiny model's id of a SentencePiece piece ("▁" is the space)."""
    tokenizer = json.loads((MODEL / "tokenizer.json").read_text(encoding="utf-8"))
    return tokenizer["model"]["vocab"][piece]


def test_logit_bias_forces_and_bans_tokens(client):
    # +100 makes one token the only choice, greedy and sampled alike (OpenAI's semantics).
    hello = _token_id("▁hello")
    for temperature in (0, 1.0):
        resp = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=temperature,
            logit_bias={str(hello): 100}, logprobs=True, seed=3,
        )
        tokens = [entry.token for entry in resp.choices[0].logprobs.content]
        assert tokens == [" hello"] * 5, tokens
        # The reported log-probabilities are the model's own, before the bias.
        assert all(entry.logprob < -1 for entry in resp.choices[0].logprobs.content)
    # -100 bans what greedy decoding picks first; nothing else about the request changes.
    plain = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=1, temperature=0, logprobs=True,
        top_logprobs=2,
    )
    first = plain.choices[0].logprobs.content[0]
    banned = _token_id(first.token.replace(" ", "▁"))
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=1, temperature=0, logprobs=True,
        logit_bias={str(banned): -100},
    )
    assert resp.choices[0].logprobs.content[0].token == first.top_logprobs[1].token
    # An id outside the model's vocabulary is the request's fault, named as such.
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, logit_bias={"32064": 5}
        )
    assert err.value.param == "logit_bias"
    assert "32064" in err.value.message


def test_text_completions(client):
    """The legacy `client.completions` API (benchmark and evaluation tools use it): the prompt
    is continued as it is, as JSON and streamed, with the legacy logprobs lists."""
    resp = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2
    )
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens == len(choice.logprobs.tokens) <= 6
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    lp = choice.logprobs
    assert "".join(lp.tokens).strip() == choice.text.strip()
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # Greedy: the sampled token is the likeliest of its (at most 2 + itself) alternatives.
        assert top[token] == logprob == max(top.values())
        assert len(top) <= 3

    # The SDK types a streamed choice's `finish_reason` as never null, which OpenAI's own
    # streams (and every server's) contradict until a choice's last event: strict validation of
    # these events would fail against OpenAI too, so the stream is read without it.
    lenient = OpenAI(base_url=str(client.base_url), api_key=API_KEY, max_retries=0)
    stream = lenient.completions.create(
        model=MODEL_NAME,
        prompt="Once upon a time",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    *events, usage_event = list(stream)
    assert usage_event.choices == []
    assert usage_event.usage.prompt_tokens == resp.usage.prompt_tokens
    assert usage_event.usage.completion_tokens == resp.usage.completion_tokens
    assert "".join(e.choices[0].text for e in events) == choice.text
    assert events[-1].choices[0].finish_reason == choice.finish_reason
    assert all(e.id == events[0].id and e.object == "text_completion" for e in events)
    assert all(e.choices[0].finish_reason is None for e in events[:-1])
    lenient.close()

    # Several prompts, token ids, echo; choices come prompt by prompt.
    ids = client.completions.create(
        model=MODEL_NAME, prompt=[[450, 301, 18919], "hi"], n=2, max_tokens=3, temperature=0,
        echo=True,
    )
    assert [c.index for c in ids.choices] == [0, 1, 2, 3]
    assert ids.choices[0].text == ids.choices[1].text
    assert ids.choices[2].text.startswith("hi")


def test_text_completions_score_an_echoed_prompt(client):
    """What lm-evaluation-harness's loglikelihood tasks send through the openai SDK: token ids,
    `echo`, `logprobs=1`, `max_tokens=1`; it sums `token_logprobs[ctxlen:-1]` and checks each
    against `max(top_logprobs[i].values())`.

    Read without strict validation: the SDK types `token_logprobs` as a list of floats, while
    OpenAI's own echoed prompts start it (and `top_logprobs`) with `null`, as this one does."""
    context, continuation = [450, 301, 18919], [1709, 1589]
    client = OpenAI(base_url=str(client.base_url), api_key=API_KEY, max_retries=0)
    resp = client.completions.create(
        model=MODEL_NAME, prompt=[context + continuation], echo=True, logprobs=1, max_tokens=1,
        temperature=0, seed=1234,
    )
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert resp.usage.prompt_tokens == 5 and resp.usage.completion_tokens == 1
    scored = lp.token_logprobs[len(context):-1]
    assert len(scored) == len(continuation) and all(x < 0 for x in scored)
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == logprob and 1 <= len(top) <= 2
    assert lp.text_offset == sorted(lp.text_offset)

    # The prompt alone: the same scores, nothing generated.
    alone = client.completions.create(
        model=MODEL_NAME, prompt=[context + continuation], echo=True, logprobs=1, max_tokens=0
    )
    assert alone.usage.completion_tokens == 0 and alone.choices[0].finish_reason == "length"
    assert alone.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]
    client.close()


def test_text_completions_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt=[32064], max_tokens=2)
    assert err.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt="hi", logprobs=21)
    assert err.value.param == "logprobs"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.completions.create(model=MODEL_NAME, prompt="hi", suffix="bye")
    assert err.value.param == "suffix"


def test_server_root_base_url_reaches_the_azure_route(server):
    c = make_client(server.url)
    resp = c.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
    assert resp.choices[0].message.content is not None
    c.close()


def test_bad_request(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=5)
    assert err.value.status_code == 400
    assert err.value.param == "temperature"
    assert err.value.code == "invalid_value"
    assert err.value.type == "invalid_request_error"
    assert err.value.request_id


def test_unknown_parameter(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, extra_body={"not_a_param": 1}
        )
    assert err.value.code == "extra_parameters_not_allowed"
    assert err.value.param == "not_a_param"


def test_unsupported_is_422(client):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert err.value.param == "tools"


def test_authentication_error(server):
    c = make_client(server.url + "/v1", key="wrong")
    with pytest.raises(openai.AuthenticationError) as err:
        c.chat.completions.create(model=MODEL_NAME, messages=MESSAGES)
    assert err.value.code == "invalid_api_key"
    c.close()


def test_not_found(server):
    c = make_client(server.url + "/nope/v1")
    with pytest.raises(openai.NotFoundError):
        c.models.list()
    c.close()


def test_rate_limit_error(busy_server):
    c = make_client(busy_server.url + "/v1")
    # The first request fills the batch of one, the second the queue of one.
    first = c.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=40, stream=True
    )
    next(iter(first))
    result = {}

    def second():
        result["resp"] = c.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=2
        )

    t = threading.Thread(target=second)
    t.start()
    deadline = time.time() + 30
    while httpx2.get(busy_server.url + "/health").json()["queued"] != 1:
        assert time.time() < deadline
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
    assert err.value.response.headers["retry-after"] == "1"
    assert err.value.code == "too_many_requests"
    first.close()
    t.join(timeout=60)
    assert result["resp"].choices[0].finish_reason in ("stop", "length")
    c.close()


def test_content_filter(filtered_server):
    c = make_client(filtered_server.url + "/v1")
    # A blocked prompt is a BadRequestError with code content_filter and param prompt.
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "kill it"}]
        )
    assert err.value.code == "content_filter"
    assert err.value.param == "prompt"
    inner = err.value.body["innererror"]["content_filter_result"]
    assert inner["violence"] == {"filtered": True, "severity": "high"}

    # A blocked (greedy) answer ends with finish_reason content_filter; the annotations pass strict
    # validation as extra fields.
    resp = c.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "content_filter"
    assert choice.model_extra["content_filter_results"]["self_harm"]["filtered"] is True
    assert resp.model_extra["prompt_filter_results"][0]["prompt_index"] == 0

    stream = c.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == (choice.message.content or "")
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    c.close()


def test_repeated_conversation_reports_cached_prompt_tokens(client):
    """The second turn of a conversation reuses the first's keys and values (prefix cache),
    and the SDK reads that as usage.prompt_tokens_details.cached_tokens, with the same answer
    to the same question."""
    system = {
        "role": "system",
        "content": "You answer questions about trains in one short sentence, politely.",
    }
    question = {"role": "user", "content": "When does the last train to Lyon leave?"}
    first = client.chat.completions.create(
        model=MODEL_NAME, messages=[system, question], max_tokens=6, temperature=0
    )
    details = first.usage.prompt_tokens_details
    assert details is None or not details.cached_tokens
    again = client.chat.completions.create(
        model=MODEL_NAME, messages=[system, question], max_tokens=6, temperature=0
    )
    assert again.choices[0].message.content == first.choices[0].message.content
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == again.usage.prompt_tokens - 1
