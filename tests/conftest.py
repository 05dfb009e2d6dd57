"""Shared fixtures: an S3 server on loopback (moto), a local Ray, manifests, specs, commands.

Everything here is lazy: importing this file imports neither Ray, boto3 nor torch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


# ---------------------------------------------------------------------------------------------
# S3: moto's server on 127.0.0.1, reached over real HTTP by boto3


@pytest.fixture(scope="session")
def moto_endpoint():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request in test logs
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """A fresh bucket on the loopback S3 server; AWS_* set for this process (and children).

    Yields (bucket, boto3 client, env dict for subprocesses)."""
    import boto3

    from jobs import storage

    env = {**S3_ENV, "AWS_ENDPOINT_URL": moto_endpoint}
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    storage.reset_clients()
    bucket = f"sdgen-test-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    yield bucket, client, env
    storage.reset_clients()


# ---------------------------------------------------------------------------------------------
# Ray: one small local cluster for the in-process tests


@pytest.fixture(scope="session")
def ray_local():
    import ray

    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=True, object_store_memory=100 * 1024 * 1024
    )
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The tiny model, loaded once per session for in-process worker tests


@pytest.fixture(scope="session")
def tiny_pipe():
    import sdcore

    return sdcore.load_pipeline("builtin:tiny")


# ---------------------------------------------------------------------------------------------
# Manifests and specs


def write_manifest(path: Path, rows: list[dict], schema=None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema) if schema is not None else pa.Table.from_pylist(rows)
    pq.write_table(table, path)
    return path


def init_image(path: Path, color=(200, 30, 30), size=32) -> Path:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=color)
    image.save(path)
    return path


def small_rows(n: int, img2img_every: int = 0, init: str = "init/a.png") -> list[dict]:
    """n rows of distinct prompts/seeds; every `img2img_every`-th row is img2img from `init`."""
    rows = []
    for i in range(n):
        img2img = img2img_every and i % img2img_every == img2img_every - 1
        rows.append(
            {
                "id": f"r{i:03d}",
                "prompt": f"a shape number {i}",
                "negative": "blurry" if i % 2 else "",
                "seed": 1000 + i,
                "strength": 0.75 if img2img else None,
                "init_image": init if img2img else None,
            }
        )
    return rows


MANIFEST_SCHEMA_FIELDS = [
    ("id", "string"),
    ("prompt", "string"),
    ("negative", "string"),
    ("seed", "int64"),
    ("strength", "float64"),
    ("init_image", "string"),
]


def manifest_schema():
    import pyarrow as pa

    return pa.schema([(name, pa.type_for_alias(kind)) for name, kind in MANIFEST_SCHEMA_FIELDS])


def spec_dict(manifest: str, output: str, **sections) -> dict:
    """A small, fast spec: tiny model, 32x32, 3 DDIM steps, one torch thread per worker."""
    spec = {
        "name": "test",
        "manifest": manifest,
        "output": output,
        "model": {"weights": "builtin:tiny", "dtype": "float32"},
        "sampler": {"name": "ddim", "steps": 3, "guidance_scale": 7.5, "width": 32, "height": 32},
        # One torch thread: on a shared, loaded machine more threads stall at every OpenMP barrier.
        "execution": {"workers": 1, "batch_size": 2, "shard_size": 3, "cpu_threads": 1},
        "image": {"format": "png"},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            spec[key] = {**spec.get(key, {}), **value}
        else:
            spec[key] = value
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Running the real commands


def command_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("SDGEN_CACHE_DIR", str(REPO / ".pytest_cache" / "sdgen-cache"))
    env.update(extra or {})
    return env


def run_command(
    args: list[str], *, env: dict | None = None, timeout: float = 300, check: bool = True, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run a command in its own session; on timeout every process of that session is killed."""
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=command_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(args)} timed out after {timeout}s:\n{out}") from None
    finally:
        kill_session(proc.pid)
    result = subprocess.CompletedProcess(args, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{out}")
    return result


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (a command we started with start_new_session=True)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(entry.name))
    return pids


def kill_session(sid: int, timeout: float = 10.0) -> None:
    """SIGKILL every process left in the session we started (the driver's embedded Ray)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Ray nodes of our own (`ray start`), for the multi-node and GPU-placement tests

RAY = str(Path(PYTHON).parent / "ray")


def ray_node_env(token: str, extra: dict | None = None) -> dict:
    """The environment a test's own Ray nodes and their clients share: token auth on (as on a
    real cluster), `python` in the job entrypoint meaning this venv's."""
    return {
        "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        **(extra or {}),
    }


class RayNode:
    """One `ray start` node with its own ports and temp dir. `stop()` kills the processes of the
    session it was started in (never `ray stop`, which would stop every Ray on the machine)."""

    def __init__(self, env: dict, *, head_address: str | None = None, ip: str = "127.0.0.1", args=()):
        self.temp = Path(f"/tmp/sdgen-ray-{uuid.uuid4().hex[:8]}")  # short: socket paths have a length limit
        self.ip = ip
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        command = [
            RAY,
            "start",
            f"--node-ip-address={ip}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.temp}",
            "--disable-usage-stats",
            *args,
        ]
        if head_address is None:
            command += [
                "--head",
                f"--port={self.gcs_port}",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
            ]
        else:
            command += [f"--address={head_address}"]
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=command_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = self.proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError("`ray start` did not finish in 180 s") from None
        if self.proc.returncode != 0:
            self.stop()
            raise AssertionError(f"`ray start` failed:\n{out}")

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def log_tail(self, chars: int = 3000) -> str:
        """The end of this node's Ray logs that tell why a worker did not start (for failures)."""
        logs = self.temp / "session_latest" / "logs"
        parts = []
        for path in (
            sorted(logs.glob("*.err"))
            + sorted(logs.glob("worker-*.out"))
            + sorted(logs.glob("python-core-worker-*.log"))
            + [logs / "raylet.out"]
        ):
            if path.is_file() and path.stat().st_size:
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        import shutil

        kill_session(self.proc.pid)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(params=["local", "s3"])
def output_uri(request, tmp_path):
    """An output location, once on local disk and once on the S3 server (for tests that must
    hold on both)."""
    if request.param == "local":
        return str(tmp_path / "out")
    bucket, _, _ = request.getfixturevalue("s3")
    return f"s3://{bucket}/out"
