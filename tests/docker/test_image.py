"""Smoke test of the Docker image: build, run, healthy, /generate and /next-token-probs, clean stop.

Runs only where a Docker engine answers and LMSERVE_DOCKER_TESTS=1 (here: `bash ../shared/tools/docker-standin.sh`
first). Build args come from the environment: LMSERVE_DOCKER_BUILD_ARGS, e.g.
"--build-arg TORCH_SPEC=torch==2.13.0 --build-arg PIP_FIND_LINKS=http://127.0.0.1:8765/".
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "lmserve:test"


def docker_available() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(os.environ.get("LMSERVE_DOCKER_TESTS") != "1" or not docker_available(),
                                reason="needs a Docker engine and LMSERVE_DOCKER_TESTS=1")


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_builds_runs_serves_and_stops_cleanly():
    build_args = shlex.split(os.environ.get("LMSERVE_DOCKER_BUILD_ARGS", ""))
    start = time.monotonic()
    subprocess.run(["docker", "build", "--network", "host", *build_args, "-t", IMAGE, str(ROOT)], check=True,
                   timeout=1800)
    build_seconds = time.monotonic() - start
    size = int(docker("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip())
    print(f"image {IMAGE}: {size / 1e6:.0f} MB, built in {build_seconds:.0f} s")

    port = free_port()
    container = docker("run", "-d", "-p", f"127.0.0.1:{port}:8000", "-e", "LMSERVE_SHUTDOWN_GRACE=10",
                       IMAGE).stdout.strip()
    try:
        deadline = time.monotonic() + 180
        status = ""
        while time.monotonic() < deadline:
            status = docker("inspect", container, "--format", "{{.State.Health.Status}}").stdout.strip()
            if status == "healthy":
                break
            time.sleep(2)
        assert status == "healthy", docker("logs", container, check=False).stdout[-3000:]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(60):  # healthy = alive; ready = loaded and warmed up
                if client.get("/ready").status_code == 200:
                    break
                time.sleep(1)
            generated = client.post("/generate", json={"prompt": "def main():", "max_new_tokens": 16,
                                                       "temperature": 0})
            assert generated.status_code == 200, generated.text
            assert generated.json()["outputs"][0]["text"]
            probs = client.post("/next-token-probs", json={"prompt": "import ", "top_k": 5})
            assert probs.status_code == 200 and len(probs.json()["results"][0]["tokens"]) == 5
            info = client.get("/info").json()
            assert info["device"] == "cpu" and info["model"] == "default"
            assert info["cpu_kernels"] is True  # built into the image: no compiler needed at run time

            # docker stop while a request is in flight: SIGTERM lets it finish, then the server exits
            in_flight: dict[str, httpx.Response] = {}
            body = {"prompt": "class Server:", "max_new_tokens": 200, "temperature": 0, "ignore_eos": True}
            worker = threading.Thread(target=lambda: in_flight.update(response=client.post("/generate", json=body)))
            worker.start()
            deadline = time.monotonic() + 30
            while "lmserve_requests_running 1.0" not in client.get("/metrics").text:
                assert time.monotonic() < deadline and worker.is_alive(), "the request never started"
                time.sleep(0.02)
            stop_start = time.monotonic()
            docker("stop", "-t", "20", container, timeout=60)
            assert time.monotonic() - stop_start < 20  # drained and exited within the grace period
            worker.join(timeout=30)
        drained = in_flight["response"]
        assert drained.status_code == 200, drained.text
        assert drained.json()["outputs"][0]["finish_reason"] == "length"
        assert len(drained.json()["outputs"][0]["token_ids"]) == 200
        state = json.loads(docker("inspect", container, "--format", "{{json .State}}").stdout)
        assert state["ExitCode"] == 0, docker("logs", container, check=False).stderr[-3000:]
    finally:
        docker("rm", "-f", container, check=False)
