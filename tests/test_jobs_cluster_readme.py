"""The README's cluster walk-through, run verbatim as a new user would on a fresh machine.

The block under `<!-- cluster-walkthrough` in README.md is read from the README (so the two
cannot drift) and run by bash, line for line, in a copy of this checkout, inside fresh Linux
namespaces: its own network (only loopback, so Ray's default ports are free and nothing reaches
another developer's cluster), its own process table (so the README's `ray stop` stops only this
cluster) and an empty `/tmp/ray` (Ray's default temp dir; the rest of /tmp stays visible,
because the checkout's venv, and so `ray` itself, may live there), with an empty home directory (no Ray token
of an earlier run) and an environment holding only PATH, HOME and LANG: nothing the README does
not tell the user to set. When the namespace's first process ends, the kernel ends every process
in it, so nothing outlives the test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from jobs.output import Output

from conftest import REPO, kill_session

MARKER = "<!-- cluster-walkthrough"


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    assert MARKER in text, "README.md lost its cluster walk-through marker"
    after = text[text.index(MARKER) :]
    match = re.search(r"```bash\n(.*?)```", after, re.S)
    assert match, "no ```bash block after the cluster walk-through marker"
    return match.group(1)


def namespaces_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--net", "--pid", "--mount", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


def checkout_copy(dest: Path) -> None:
    """The files of this checkout git would keep (tracked, or new and not ignored), and the venv."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(REPO / ".venv")  # `make venv` already ran in this checkout


def test_the_readme_cluster_commands_run_verbatim_on_a_fresh_machine():
    if not namespaces_available():
        pytest.fail("this test needs `unshare` (root or user namespaces) and `ip`: a fresh net/pid/mount namespace")
    block = readme_block()
    for command in ("ray start --head", "ray job submit", "ray stop", "RAY_AUTH_MODE=token"):
        assert command in block
    # The copy lives outside /tmp/ray, which the namespace replaces with an empty one.
    root = Path("/var/tmp") / f"sdgen-readme-{uuid.uuid4().hex[:8]}"
    checkout, home = root / "sdgen", root / "home"
    try:
        checkout.mkdir(parents=True)
        home.mkdir()
        checkout_copy(checkout)
        script = root / "walkthrough.sh"
        script.write_text(
            "set -euo pipefail\n"
            "ip link set lo up\n"  # the fresh network namespace: loopback only
            "mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray\n"  # and Ray's temp dir, empty
            f"cd {checkout}\n"
            "set -x\n" + block  # from here on: the README, line for line
        )
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            ["unshare", "--net", "--pid", "--mount", "--fork", "--mount-proc", "bash", str(script)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            out, _ = proc.communicate()
            raise AssertionError(f"the README's cluster commands timed out:\n{out}") from None
        finally:
            kill_session(proc.pid)
        assert proc.returncode == 0, f"the README's cluster commands failed (exit {proc.returncode}):\n{out}"
        assert "succeeded" in out and "complete: 12 ok, 0 error, 0 missing of 12 rows" in out, out
        assert "running on the Ray cluster at" in out, out  # the submitted job joined the cluster
        assert "Stopped all" in out, out  # the README's `ray stop`

        # The output is in the user's checkout, whole; Ray's temporary copy held none of it.
        output = Output(str(checkout / "outputs" / "example"))
        assert output.committed_shards() == {"shard-00000", "shard-00001", "shard-00002"}
        records = [r for t in output.read_all_records(output.committed_shards()).values() for r in t.to_pylist()]
        assert sorted(r["row"] for r in records) == list(range(12))
        folder = checkout / "outputs" / "example"
        assert all(r["status"] == "ok" and (folder / r["image_path"]).is_file() for r in records)
        assert (home / ".ray" / "auth_token").is_file()  # the README made the token the cluster ran with
    finally:
        shutil.rmtree(root, ignore_errors=True)
