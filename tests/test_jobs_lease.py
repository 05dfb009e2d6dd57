"""One writer per output: the lease on local folders and on S3 (moto's server), and two real
`run.py` on one output; a run taken over mid-job stops."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jobs.lease import LEASE_FILE, LeaseHeld, LeaseLost, OutputLease, held_output, live_lease, read_lease
from jobs.storage import open_storage


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_run_is_refused_naming_the_holder(tmp_path):
    first = OutputLease.acquire(str(tmp_path), log=lambda s: None)
    with pytest.raises(LeaseHeld) as err:
        OutputLease.acquire(str(tmp_path), log=lambda s: None)
    assert f"pid {os.getpid()}" in str(err.value) and socket.gethostname() in str(err.value)
    assert first.info.started_at in str(err.value)
    first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    OutputLease.acquire(str(tmp_path), log=lambda s: None).release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    lease = OutputLease.acquire(str(tmp_path), log=lambda s: None)
    data = json.loads((tmp_path / LEASE_FILE).read_text())
    (tmp_path / LEASE_FILE).write_text(json.dumps({**data, "pid": _dead_pid()}))
    lines = []
    taken = OutputLease.acquire(str(tmp_path), log=lines.append)
    assert taken.info.token != lease.info.token and "is gone" in lines[0]
    taken.release()


def test_an_expired_lease_is_taken_over_and_break_lease_takes_a_live_one(tmp_path):
    storage = open_storage(str(tmp_path))
    other = {"token": "x", "host": "elsewhere", "pid": 1, "started_at": "t", "renewed_at": time.time(), "ttl": 60}
    storage.write(LEASE_FILE, json.dumps(other).encode())
    with pytest.raises(LeaseHeld, match="host elsewhere"):
        OutputLease.acquire(str(tmp_path), log=lambda s: None)
    assert live_lease(storage) is not None
    storage.write(LEASE_FILE, json.dumps({**other, "renewed_at": time.time() - 61}).encode())
    assert live_lease(storage) is None
    OutputLease.acquire(str(tmp_path), log=lambda s: None).release()
    storage.write(LEASE_FILE, json.dumps(other).encode())
    broken = OutputLease.acquire(str(tmp_path), break_lease=True, log=lambda s: None)
    assert read_lease(storage).token == broken.info.token
    broken.release()


def test_a_lease_taken_over_is_lost_at_the_next_renewal(tmp_path):
    lease = OutputLease.acquire(str(tmp_path), log=lambda s: None, ttl=60)
    lease.renew()
    OutputLease.acquire(str(tmp_path), break_lease=True, log=lambda s: None)
    with pytest.raises(LeaseLost):
        lease.renew()


def test_the_heartbeat_renews_and_a_takeover_fails_the_runs_next_check(tmp_path, monkeypatch):
    monkeypatch.setenv("SDGEN_LEASE_TTL", "2")  # renewed every 0.5 s
    lines = []
    with pytest.raises(LeaseLost, match="taken over"):
        with held_output(str(tmp_path), log=lines.append) as lease:
            before = lease.info.renewed_at
            time.sleep(1.2)
            assert read_lease(open_storage(str(tmp_path))).renewed_at > before
            lease.check()  # still ours: passes
            # Another run takes it over as a run does (a conditional write: an unconditional one
            # could land between a renewal's check and its write, which no run ever does).
            other = OutputLease.acquire(str(tmp_path), break_lease=True, log=lambda s: None)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the heartbeat notices within one beat
                lease.check()
                time.sleep(0.02)
    assert any("taken over" in line for line in lines)  # said, not only raised
    assert read_lease(open_storage(str(tmp_path))).token == other.info.token  # not ours: left alone


def test_a_job_whose_lease_is_taken_over_stops_without_finishing(tmp_path, monkeypatch, ray_local):
    """A real run on local Ray: another run takes its output over after the first shard; the
    run stops with LeaseLost at its shard loop's next turn, leaves the rest of the shards and
    the summary to the new holder, and does not touch the new holder's lease."""
    from jobs.output import Output
    from jobs.runner import SUMMARY_FILE, run_job

    from conftest import small_rows, spec_dict, write_manifest, write_spec

    monkeypatch.setenv("SDGEN_LEASE_TTL", "4")  # renewed every second
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(8))
    spec = write_spec(tmp_path / "spec.yaml", spec_dict(str(manifest), str(out), execution={"shard_size": 1}))
    lines, taken = [], []

    def log(line: str) -> None:
        lines.append(line)
        if " done: " in line and not taken:  # the first shard is committed: take the output over
            taken.append(OutputLease.acquire(str(out), break_lease=True, log=lambda s: None))
            deadline = time.monotonic() + 10
            while not any("taken over" in seen for seen in lines) and time.monotonic() < deadline:
                time.sleep(0.02)  # until the heartbeat has seen it (it logs on its own thread)

    with pytest.raises(LeaseLost, match="taken over"):
        run_job(str(spec), log=log, progress_every=1.0)
    done = Output(str(out)).committed_shards()
    assert 1 <= len(done) < 8  # stopped: at most the shard in flight was committed after the first
    assert not (out / SUMMARY_FILE).exists()
    assert read_lease(open_storage(str(out))).token == taken[0].info.token
    taken[0].release()


def test_a_holder_that_cannot_renew_stops_before_its_lease_may_be_taken_over(tmp_path):
    """Renewals failing (the store answers 503) or the process stopped (SIGSTOP) for most of the
    ttl: another run may take the lease over at the ttl, so the holder stops first."""
    from jobs.storage import TransientStorageError

    lease = OutputLease.acquire(str(tmp_path), log=lambda s: None, ttl=2)
    lease.check()  # just written

    def unavailable(*args, **kwargs):
        raise TransientStorageError("503 Service Unavailable")

    lease.storage.write_tagged = unavailable  # every renewal from now on fails
    lease.start_heartbeat(every=0.1)
    time.sleep(1.0)
    lease.check()  # half the ttl without a renewal: still safe
    time.sleep(0.7)
    with pytest.raises(LeaseLost, match="not renewed for [\\d.]+s \\(ttl 2s\\): stopping before another run may take"):
        lease.check()
    del lease.storage.write_tagged
    lease.release()  # still ours (nobody took it): deleted
    assert read_lease(open_storage(str(tmp_path))) is None


def test_the_stop_counts_from_when_the_renewal_was_stamped_not_written(tmp_path):
    """Others count the ttl from `renewed_at`, stamped before a write that may take long (storage
    retries): counted from the write's end, a slow renewal left a window where two runs wrote."""
    lease = OutputLease.acquire(str(tmp_path), log=lambda s: None, ttl=1)
    write = lease.storage.write_tagged

    def slow(*args, **kwargs):
        time.sleep(0.4)
        return write(*args, **kwargs)

    lease.storage.write_tagged = slow
    lease.renew()  # stamped, then 0.4 s writing
    time.sleep(0.45)  # 0.85 s after the stamp: past 3/4 of the ttl, though 0.45 s after the write
    with pytest.raises(LeaseLost, match="not renewed"):
        lease.check()
    del lease.storage.write_tagged
    lease.release()


def test_a_bad_lease_ttl_is_refused_naming_it(monkeypatch):
    from jobs.faults import SettingError
    from jobs.lease import lease_ttl

    for bad in ("abc", "0", "-5", "nan", "inf"):
        monkeypatch.setenv("SDGEN_LEASE_TTL", bad)
        with pytest.raises(SettingError, match="SDGEN_LEASE_TTL"):
            lease_ttl()
    monkeypatch.setenv("SDGEN_LEASE_TTL", "30")
    assert lease_ttl() == 30.0


def test_s3_lease_is_conditional(s3):
    bucket, _, _ = s3
    uri = f"s3://{bucket}/out"
    first = OutputLease.acquire(uri, log=lambda s: None)
    with pytest.raises(LeaseHeld, match="in use by another run"):
        OutputLease.acquire(uri, log=lambda s: None)
    first.renew()
    first.release()
    assert read_lease(open_storage(uri)) is None


def test_renewal_is_conditional_so_a_lost_holder_never_overwrites_the_new_one(output_uri):
    storage = open_storage(output_uri)
    a = OutputLease.acquire(output_uri, log=lambda s: None, ttl=60)
    a.renew()
    b = OutputLease.acquire(output_uri, break_lease=True, log=lambda s: None)
    taken = storage.read(LEASE_FILE)
    with pytest.raises(LeaseLost, match="taken over"):
        a.renew()
    a.lost = "taken over"
    a.release()
    assert storage.read(LEASE_FILE) == taken  # b's lease: neither overwritten nor deleted by a
    # The condition is the object's tag, not the token inside it: any write since b's last one
    # (here one that even keeps b's token, which a read-check-write renewal would not notice)
    # makes b's renewal fail instead of overwriting it.
    forged = json.dumps({**json.loads(taken), "renewed_at": 1.0}).encode()
    storage.write(LEASE_FILE, forged)
    with pytest.raises(LeaseLost):
        b.renew()
    assert storage.read(LEASE_FILE) == forged
    b.release()  # not b's object any more: left alone
    assert storage.read(LEASE_FILE) == forged


def test_simultaneous_takeovers_of_a_stale_lease_leave_exactly_one_holder(output_uri):
    """Eight runs take over the same stale lease at the same instant, three times: each time
    exactly one holds it and the others are refused, naming a holder."""
    import threading

    storage = open_storage(output_uri)
    storage.write("x", b"")  # the output exists (local: its folder)
    for _ in range(3):
        stale = {"token": "old", "host": "elsewhere", "pid": 1, "started_at": "t", "renewed_at": 1.0, "ttl": 60}
        storage.write(LEASE_FILE, json.dumps(stale).encode())
        barrier = threading.Barrier(8)
        won, refused = [], []

        def take(barrier=barrier, won=won, refused=refused):
            barrier.wait()
            try:
                won.append(OutputLease.acquire(output_uri, log=lambda s: None, ttl=60))
            except LeaseHeld as exc:
                refused.append(str(exc))

        threads = [threading.Thread(target=take) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 7, (won, refused)
        assert read_lease(storage).token == won[0].info.token
        won[0].renew()  # the winner's lease is intact
        assert all("in use by another run" in r or "at the same time" in r for r in refused)
        won[0].release()
        assert read_lease(storage) is None
