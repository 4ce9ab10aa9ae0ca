"""The `azure-ai-inference` 1.0.0b9 SDK against the real phi-serve: every call shape that
shared/api/CONTRACT.md lists (section (a)) works, and errors raise the SDK's exception types."""

import datetime

import pytest
from azure.ai.inference import ChatCompletionsClient, load_client
from azure.ai.inference.models import (
    AssistantMessage,
    DeveloperMessage,
    SystemMessage,
    TextContentItem,
    UserMessage,
)
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)

from conftest import API_KEY, MODEL_NAME, SECOND_KEY


@pytest.fixture()
def client(server):
    c = ChatCompletionsClient(endpoint=server.url, credential=AzureKeyCredential(API_KEY))
    yield c
    c.close()


def test_get_model_info(client):
    info = client.get_model_info()
    assert info.model_name == MODEL_NAME
    assert info.model_type == "chat_completion"
    assert info.model_provider_name == "Microsoft"


def test_load_client(server):
    c = load_client(endpoint=server.url, credential=AzureKeyCredential(SECOND_KEY))
    assert isinstance(c, ChatCompletionsClient)
    c.close()


def test_complete_with_every_named_parameter(client):
    resp = client.complete(
        messages=[SystemMessage("sys"), UserMessage("hi")],
        frequency_penalty=0.1,
        max_tokens=5,
        presence_penalty=0.1,
        response_format="text",
        seed=1,
        stop=["\n\n"],
        temperature=0,
        top_p=1,
    )
    assert resp.id.startswith("chatcmpl-")
    assert resp["object"] == "chat.completion"
    assert isinstance(resp.created, datetime.datetime)
    assert resp.model == MODEL_NAME
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_complete_with_every_message_kind(client):
    resp = client.complete(
        messages=[
            DeveloperMessage("be brief"),
            UserMessage([TextContentItem(text="hello"), TextContentItem(text="there")]),
            AssistantMessage("hi"),
            UserMessage("again"),
        ],
        max_tokens=3,
    )
    assert resp.usage.completion_tokens <= 3


def test_streaming_matches_non_streaming(client):
    messages = [UserMessage("hi")]
    expected = client.complete(messages=messages, max_tokens=8, temperature=0)
    stream = client.complete(messages=messages, max_tokens=8, temperature=0, stream=True)
    text = ""
    updates = []
    # The sample loop of the SDK's own docs: it must never hit an empty `choices`.
    for update in stream:
        updates.append(update)
        text += update.choices[0].delta.content or ""
    stream.close()
    assert text == expected.choices[0].message.content
    assert len({u.id for u in updates}) == 1
    assert updates[0].choices[0].delta.role == "assistant"
    last = updates[-1]
    assert last.choices[0].finish_reason == expected.choices[0].finish_reason
    assert last.usage.total_tokens == expected.usage.total_tokens
    assert [u.choices[0].finish_reason for u in updates].count(None) == len(updates) - 1


def test_raw_body_streaming(client):
    stream = client.complete(
        body={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
    )
    text = "".join(u.choices[0].delta.content or "" for u in stream)
    assert text


def test_logprobs_via_model_extras(client):
    resp = client.complete(
        messages=[UserMessage("hi")],
        max_tokens=3,
        temperature=0,
        model_extras={"logprobs": True, "top_logprobs": 2},
    )
    content = resp.choices[0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert isinstance(entry["token"], str)
        assert entry["logprob"] <= 0
        assert isinstance(entry["bytes"], list)
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]


def test_unknown_body_keys_need_the_header(client):
    with pytest.raises(HttpResponseError) as err:
        client.complete(body={"messages": [{"role": "user", "content": "hi"}], "foo": 1})
    assert err.value.status_code == 400
    assert err.value.error.code == "extra_parameters_not_allowed"
    assert "foo" in str(err.value)
    # model_extras sends extra-parameters: pass-through.
    resp = client.complete(messages=[UserMessage("hi")], max_tokens=2, model_extras={"foo": 1})
    assert resp.usage.completion_tokens <= 2
    resp = client.complete(
        body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "foo": 1},
        headers={"extra-parameters": "drop"},
    )
    assert resp.usage.completion_tokens <= 2


def test_bad_parameter_is_400_naming_it(client):
    with pytest.raises(HttpResponseError) as err:
        client.complete(messages=[UserMessage("hi")], temperature=5)
    assert err.value.status_code == 400
    assert err.value.error.code == "invalid_value"
    assert "temperature" in err.value.error.message


def test_prompt_too_long_is_400(client):
    with pytest.raises(HttpResponseError) as err:
        client.complete(messages=[UserMessage("hello " * 100)])
    assert err.value.status_code == 400
    assert err.value.error.code == "context_length_exceeded"
    assert "64" in err.value.error.message


def test_unsupported_response_format_is_422(client):
    with pytest.raises(HttpResponseError) as err:
        client.complete(messages=[UserMessage("hi")], response_format="json_object")
    assert err.value.status_code == 422
    assert err.value.error.code == "parameter_not_supported"


def test_wrong_key_raises_client_authentication_error(server):
    c = ChatCompletionsClient(endpoint=server.url, credential=AzureKeyCredential("wrong"))
    with pytest.raises(ClientAuthenticationError) as err:
        c.complete(messages=[UserMessage("hi")])
    assert err.value.status_code == 401
    assert err.value.error.code == "invalid_api_key"
    with pytest.raises(ClientAuthenticationError):
        c.get_model_info()
    c.close()


def test_unknown_route_raises_resource_not_found(server):
    c = ChatCompletionsClient(
        endpoint=server.url + "/nope", credential=AzureKeyCredential(API_KEY)
    )
    with pytest.raises(ResourceNotFoundError):
        c.get_model_info()
    with pytest.raises(ResourceNotFoundError):
        c.complete(messages=[UserMessage("hi")])
    c.close()


def test_content_filter(filtered_server):
    c = ChatCompletionsClient(endpoint=filtered_server.url, credential=AzureKeyCredential("x"))
    with pytest.raises(HttpResponseError) as err:
        c.complete(messages=[SystemMessage("never kill"), UserMessage("hi")])
    assert err.value.status_code == 400
    assert err.value.error.code == "content_filter"

    resp = c.complete(messages=[UserMessage("hi")], max_tokens=20, temperature=0)
    assert resp.choices[0].finish_reason == "content_filter"
    body = resp.as_dict()
    assert body["choices"][0]["content_filter_results"]["self_harm"]["filtered"] is True
    assert body["prompt_filter_results"][0]["content_filter_results"]["violence"] == {
        "filtered": False,
        "severity": "safe",
    }

    updates = list(
        c.complete(messages=[UserMessage("hi")], max_tokens=20, temperature=0, stream=True)
    )
    text = "".join(u.choices[0].delta.content or "" for u in updates if u.choices)
    assert text == (resp.choices[0].message.content or "")
    assert updates[-1].choices[0].finish_reason == "content_filter"
    c.close()
