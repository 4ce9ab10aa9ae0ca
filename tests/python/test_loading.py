"""A client that arrives while the model is still loading: the server answers 503 with
Retry-After, and both SDKs' own retry policies ride it out, so the call simply succeeds."""

import time

from azure.ai.inference import ChatCompletionsClient
from azure.ai.inference.models import UserMessage
from azure.core.credentials import AzureKeyCredential
from openai import OpenAI

from conftest import API_KEY, start_server, stop_server

LOAD_DELAY_MS = "3000"


def _loading_server():
    return start_server("--api-key", API_KEY, "--load-delay-ms", LOAD_DELAY_MS, loaded=False)


def test_azure_sdk_retries_until_loaded():
    server = _loading_server()
    try:
        client = ChatCompletionsClient(endpoint=server.url, credential=AzureKeyCredential(API_KEY))
        started = time.monotonic()
        response = client.complete(messages=[UserMessage("Hi")], max_tokens=4, temperature=0)
        assert response.choices[0].finish_reason is not None
        assert response.usage.completion_tokens >= 1
        # It had to wait for the load, so at least one 503 was retried.
        assert time.monotonic() - started >= 2.5
    finally:
        stop_server(server)


def test_openai_sdk_retries_until_loaded():
    server = _loading_server()
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=3)
        raw = client.chat.completions.with_raw_response.create(
            model="phi", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert raw.retries_taken >= 1
        completion = raw.parse()
        assert completion.usage.completion_tokens >= 1
    finally:
        stop_server(server)
