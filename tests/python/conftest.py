"""Fixtures that run the real phi-serve binary on the bundled tiny model.

The binary comes from $PHI_SERVE_BIN (default: target/debug/phi-serve). Each server listens on
--port 0; the fixture reads the bound address from the line the binary prints on stdout and
kills the process when the tests that use it are done.
"""

import os
import queue
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny" / "phi3-mini-4k"
API_KEY = "test-key-1"
SECOND_KEY = "test-key-2"
MODEL_NAME = "phi3-mini-4k"


@dataclass
class Server:
    """A running phi-serve: its base URL (no trailing slash) and process."""

    url: str
    process: subprocess.Popen


def _binary() -> str:
    path = Path(os.environ.get("PHI_SERVE_BIN", ROOT / "target" / "debug" / "phi-serve"))
    if not path.is_absolute():
        path = ROOT / path
    if not path.exists():
        pytest.fail(f"phi-serve binary not found at {path}: build it or set PHI_SERVE_BIN")
    return str(path)


def start_server(*args: str, env: dict | None = None, loaded: bool = True, model: Path = MODEL) -> Server:
    """Starts `phi-serve serve` on `model` and waits for its address: the line it prints once
    the model is loaded, or with `loaded=False` the one it prints as soon as it listens
    (answering 503)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_SERVE_")}
    full_env["RUST_LOG"] = "warn"  # the per-request log lines would drown pytest's output
    full_env.update(env or {})
    process = subprocess.Popen(
        [_binary(), "serve", "--model", str(model), "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    prefix = "phi-serve listening on " if loaded else "phi-serve loading the model, answering 503 on "
    while True:
        try:
            line = lines.get(timeout=120)
        except queue.Empty:
            process.kill()
            pytest.fail("phi-serve did not print its address within 120 s")
        if line is None:
            pytest.fail(f"phi-serve exited with {process.wait()} before listening")
        if line.startswith(prefix):
            return Server(url=line[len(prefix):].strip(), process=process)


def stop_server(server: Server) -> None:
    server.process.kill()
    server.process.wait(timeout=30)


@pytest.fixture(scope="session")
def server():
    """A server with two valid keys: one from --api-key, one from PHI_SERVE_API_KEYS."""
    s = start_server("--api-key", API_KEY, env={"PHI_SERVE_API_KEYS": SECOND_KEY})
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def busy_server():
    """A server that runs one request at a time, queues one, and generates slowly."""
    s = start_server("--max-batch-size", "1", "--max-queue", "1", "--step-delay-ms", "100")
    yield s
    stop_server(s)


# A blocklist under which "kill" (violence, high) blocks a prompt, and any word of four or more
# letters (self_harm, medium) blocks an answer; "hi" passes as a prompt.
BLOCKLIST = """{"threshold": "medium", "categories": {
    "violence": {"terms": ["kill"]},
    "self_harm": {"patterns": [{"regex": "[A-Za-z]{4,}", "severity": "medium"}]}}}"""


@pytest.fixture(scope="module")
def filtered_server(tmp_path_factory):
    """A server with the blocklist content filter of BLOCKLIST."""
    path = tmp_path_factory.mktemp("filter") / "blocklist.json"
    path.write_text(BLOCKLIST)
    s = start_server("--content-filter", "blocklist", "--content-filter-file", str(path))
    yield s
    stop_server(s)
