"""The Python client's README examples run as they are, against the gateway on
the repository's routes.yaml, and the package and the examples pass mypy --strict."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway import config
from gateway.app import Gateway

from ..conftest import proxy_config

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
EXAMPLES = re.findall(r"```python\n(.*?)```", (CLIENT / "README.md").read_text(), re.S)


def test_the_readme_has_the_examples():
    assert len(EXAMPLES) == 5 and all("asyncio.run(main())" in e for e in EXAMPLES)


def mypy(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", os.devnull,
                           *map(str, paths)], capture_output=True, text=True, cwd=CLIENT, timeout=300)


def test_the_package_and_the_examples_pass_mypy_strict(tmp_path):
    files = []
    for i, code in enumerate(EXAMPLES):
        files.append(tmp_path / f"example_{i}.py")
        files[-1].write_text(code)
    done = mypy(CLIENT / "gateway_client", *files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout


def test_mypy_catches_a_wrong_use_of_the_client(tmp_path):
    """The types say something: a handler of the wrong shape and a non-message send are errors."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from gateway_client import GatewayClient\n\n\n"
        "async def main(client: GatewayClient) -> None:\n"
        "    await client.send(123)\n"
        "    client.on(\"open\", lambda old, new: None)\n")
    done = mypy(bad)
    assert done.returncode == 1, done.stdout
    assert 'bad.py:5: error: Argument 1 to "send" of "GatewayClient" has incompatible type "int"' in done.stdout
    assert "bad.py:6: error:" in done.stdout


@pytest.fixture
async def default_gateway():
    """The gateway on the repository's routes.yaml, on free ports."""
    cfg = yaml.safe_load((ROOT / "routes.yaml").read_text())
    cfg["listen"] = {"host": "127.0.0.1", "port": 0}
    cfg["admin"] = {"host": "127.0.0.1", "port": 0}
    gw = Gateway(config.parse(yaml.safe_dump(cfg), source="routes.yaml"))
    await gw.start()
    yield f"ws://127.0.0.1:{gw.ports[0]}"
    await gw.stop()


@pytest.mark.parametrize("i, expected", [
    (0, ["got 'hello'", "got b'\\x00\\x01'"]),
    (1, ["reply {'action': 'ping', 'id': '", "no reply in time"]),
    (2, ["state closed -> connecting", "open, resumed: False", "'event': 'joined'", "'text': 'hi'",
         "state open -> closed"]),
    (3, ['"event":"presence"']),
    (4, ["reliable: False", "got ['n0', 'n1', 'n2'] unacked 0"]),   # /echo has no reliable: "prefer" goes plain
])
async def test_readme_example_runs(default_gateway, tmp_path, i, expected):
    await run_example(default_gateway, tmp_path, i, expected)


async def test_the_reliable_example_is_reliable_on_a_route_with_reliable(gateway, backend, tmp_path):
    b = await backend()
    gw = await gateway(proxy_config(b.url, route={"match": {"path": "/echo"}, "reliable": None}))
    await run_example(gw.url, tmp_path, 4, ["reliable: True", "got ['n0', 'n1', 'n2'] unacked"])
    assert [d for _, d in b.received] == ["n0", "n1", "n2"]      # the backend saw plain messages


async def run_example(url: str, tmp_path: Path, i: int, expected: list[str]) -> None:
    path = tmp_path / f"example_{i}.py"
    path.write_text(EXAMPLES[i])
    env = dict(os.environ, GATEWAY_URL=url, GATEWAY_JWT="")
    proc = await asyncio.create_subprocess_exec(sys.executable, str(path), env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    for line in expected:
        assert line in out.decode(), out.decode()
