"""The README's Python example, run as it is written against the real server (only its URL
and key are replaced), so that the first code a newcomer copies keeps working."""

import re
import subprocess
import sys

from conftest import API_KEY, ROOT


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_example_runs_against_the_server(server):
    blocks = _python_blocks()
    assert blocks, "README.md has no Python example"
    for code in blocks:
        code = code.replace("http://127.0.0.1:8080", server.url).replace('"KEY"', f'"{API_KEY}"')
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{code}\n{result.stdout}\n{result.stderr}"
        # Both SDKs printed something: model info, the answers and the streamed usage.
        assert "total_tokens" in result.stdout or "CompletionsUsage" in result.stdout, result.stdout
