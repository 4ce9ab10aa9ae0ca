"""The OpenAPI description (`GET /openapi.json`) against the running server.

schemathesis generates requests from the description, valid and invalid ones, sends them to
the real binary on the tiny model and checks every answer: no 5xx, a documented status code
and content type, documented headers present, and a body that matches the schema the route
states. A fixed seed keeps CI repeatable; set PHI_SERVE_FUZZ_SEED (or PHI_SERVE_FUZZ_EXAMPLES
for a longer run) to explore further.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx2 as httpx
import pytest
import schemathesis

from conftest import API_KEY

ROUTES = {
    "/chat/completions": "post",
    "/v1/chat/completions": "post",
    "/v1/completions": "post",
    "/info": "get",
    "/v1/info": "get",
    "/models": "get",
    "/v1/models": "get",
    "/health": "get",
    "/ready": "get",
    "/metrics": "get",
    "/openapi.json": "get",
}

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


def test_description_lists_every_route_without_a_key(server):
    r = httpx.get(f"{server.url}/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    assert {p: next(iter(ops)) for p, ops in doc["paths"].items()} == ROUTES
    schemes = doc["components"]["securitySchemes"]
    assert schemes["api_key"] == {"type": "apiKey", "in": "header", "name": "api-key"}
    assert schemes["bearer"]["scheme"].lower() == "bearer"


# Answers of every shape the routes have: JSON and streamed, several choices, logprobs, the
# include_usage chunk. Random bodies rarely pass validation, so these are sent on purpose.
SHAPES = [
    {"max_tokens": 6},
    {"max_tokens": 6, "stream": True},
    {"max_tokens": 6, "n": 2, "logprobs": True, "top_logprobs": 2, "seed": 1, "temperature": 0.8},
    {"max_tokens": 6, "stream": True, "n": 2, "logprobs": True, "top_logprobs": 1,
     "stream_options": {"include_usage": True}},
]


def _check_shapes(url: str, headers: dict) -> None:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    bodies = [
        (path, {"messages": [{"role": "user", "content": "hi"}], **shape})
        for path in ["/chat/completions", "/v1/chat/completions"]
        for shape in SHAPES
    ]
    # The text completions: `logprobs` is the legacy count, and `echo` and several prompts are
    # answer shapes of their own.
    for shape in SHAPES:
        shape = {k: v for k, v in shape.items() if k != "top_logprobs"}
        if shape.get("logprobs"):
            shape["logprobs"] = 2
        bodies.append(("/v1/completions", {"prompt": "hi", **shape}))
    # (schemathesis keeps the first 4096 bytes of a body: this stream stays below that.)
    bodies.append(("/v1/completions", {"prompt": ["hi", [450, 301]], "echo": True, "n": 2,
                                       "max_tokens": 2, "stream": True}))
    # A scored prompt (echo with logprobs): lists that start with null, JSON and streamed.
    for shape in [{"max_tokens": 0}, {"max_tokens": 2, "stream": True}]:
        bodies.append(("/v1/completions", {"prompt": [450, 301], "echo": True,
                                           "logprobs": 1, **shape}))
    for path, body in bodies:
        operation = schema[path]["POST"]
        case = operation.Case(body=body, headers=headers, media_type="application/json")
        response = case.call_and_validate(base_url=url)
        assert response.status_code == 200, (path, body, response.text)
        if body.get("stream"):
            events = [e for e in response.text.split("\n\n") if e]
            # A chat stream opens every choice with a role chunk; a text completion's may be
            # one event (a sampled stop token at once) before [DONE].
            least = 2 if path == "/v1/completions" else 3
            assert events[-1] == "data: [DONE]" and len(events) >= least, response.text


def test_every_answer_shape_matches_its_schema(server, filtered_server):
    # Validated with schemathesis' own checks, every event of the streams included.
    _check_shapes(server.url, {"Authorization": f"Bearer {API_KEY}"})
    # With a content filter, answers carry the filter annotations.
    _check_shapes(filtered_server.url, {})


def _fuzz(url: str, *extra: str) -> None:
    seed = os.environ.get("PHI_SERVE_FUZZ_SEED", "20261201")
    examples = os.environ.get("PHI_SERVE_FUZZ_EXAMPLES", "25")
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("schemathesis_cli.py")),
        "run",
        f"{url}/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        examples,
        "--seed",
        seed,
        "--workers",
        "2",
        "--request-timeout",
        "60",
        "--no-color",
        *extra,
    ]
    # schemathesis keeps a cache in its working folder: not in the repository.
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)}\n{output[-12000:]}"
    # Every operation was tested, all of its schema readable (schemathesis leaves out the
    # description's own route).
    assert "Unresolvable references" not in output, output[-6000:]
    assert f"Tested: {len(ROUTES) - 1}\n" in output, output[-4000:]


def test_fuzzing_the_described_api_finds_no_mismatch(server):
    _fuzz(server.url, "--header", f"Authorization: Bearer {API_KEY}")
    assert server.process.poll() is None, "the server exited under fuzzing"


def test_fuzzing_without_a_key_gets_documented_401s(server):
    _fuzz(server.url)
    assert server.process.poll() is None


def test_fuzzing_with_a_content_filter_matches_its_annotations(filtered_server):
    _fuzz(filtered_server.url)
    assert filtered_server.process.poll() is None
