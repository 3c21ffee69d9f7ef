"""`metaspec serve` and `metaspec generate --server` as a user runs them, then an abrupt stop of the whole service
(SIGKILL to every process it started): every request the clients saw answered is in the outcome log."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from metaspec.protocol.client import Client, ServiceError
from metaspec.workers.outcome_log import outcome_files, read_outcomes
from ..conftest import free_port


def _free_port() -> int:
    return free_port()


def _session_pids(sid: int) -> list[int]:
    """Processes of one session (the service's process tree, started with start_new_session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:     # stat fields after the command: state ppid pgrp session ...
                pids.append(int(entry.name))
    return pids


def _kill_session(sid: int) -> None:
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def serve_config(tiny_pair, tmp_path) -> tuple[Path, int, Path]:
    port, outcomes = _free_port(), tmp_path / "outcomes"
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": _free_port()},
        "grpc_options": {"port": port,
                         "grpc_servicer_functions": ["metaspec.protocol.convert.add_MetaSpecServicer_to_server"]},
        "controller_options": {"runtime_env": {"env_vars": {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
                                                            "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}}},
        "applications": [{"name": "metaspec", "route_prefix": "/metaspec",
                          "import_path": "metaspec.deploy.app:build_app",
                          "args": {"pools": [{"name": "tiny", "target": tiny_pair.target,
                                              "drafter": tiny_pair.drafter}],
                                   "router": {"outcome_dir": str(outcomes)}}}],
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port, outcomes


def test_serve_then_generate_then_abrupt_stop_loses_no_acknowledged_outcome(serve_config):
    path, port, outcomes = serve_config
    proc = subprocess.Popen([sys.executable, "-m", "metaspec.cli", "serve", "--config", str(path), "--num-cpus", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, seen = time.monotonic() + 600, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "serving gRPC on" in line:
                break
        assert any(f"127.0.0.1:{port}" in line for line in seen), "".join(seen[-30:])
        out = subprocess.run([sys.executable, "-m", "metaspec.cli", "generate", "--server", f"127.0.0.1:{port}",
                              "def add(a, b):", "--max-tokens", "8"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "[sps on tiny (fixed) | 8 tokens" in out.stdout

        acked: list[str] = []
        stop = threading.Event()

        def client_loop(idx: int) -> None:
            with Client(f"127.0.0.1:{port}", timeout_s=60) as client:
                i = 0
                while not stop.is_set():
                    rid = f"c{idx}-{i}"
                    try:
                        client.generate("count with me", max_tokens=4, request_id=rid)
                        acked.append(rid)
                    except ServiceError:
                        return                    # the service is gone
                    i += 1

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        while len(acked) < 40 and all(t.is_alive() for t in threads):
            time.sleep(0.05)
        _kill_session(proc.pid)                   # every process of the service, mid-traffic, no shutdown path
        stop.set()
        for t in threads:
            t.join(timeout=120)
        snapshot = list(acked)
    finally:
        _kill_session(proc.pid)
        proc.wait(timeout=60)
    assert len(snapshot) >= 40
    logged = {o.request_id for o in read_outcomes(outcome_files(outcomes))}
    assert set(snapshot) <= logged


def _wait_serving(proc, port: int, limit_s: float = 600) -> None:
    deadline, seen = time.monotonic() + limit_s, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "serving gRPC on" in line:
            break
    assert any(f"127.0.0.1:{port}" in line for line in seen), "".join(seen[-30:])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_sigterm_leaves_no_ray_process_and_no_port_behind(serve_config):
    """Direct ingress (as shipped: the Router replica holds the port). After SIGTERM the command exits, and within
    a bounded wait none of the processes it started (raylet, GCS, DashboardAgent, RuntimeEnvAgent, workers) is
    alive and both ports are free."""
    import psutil

    from metaspec.deploy.app import LOW_LATENCY_ENV

    path, port, _ = serve_config
    config = yaml.safe_load(path.read_text())
    config["controller_options"]["runtime_env"]["env_vars"] |= LOW_LATENCY_ENV | {
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(port), "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http := _free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http)}
    config["grpc_options"]["port"], config["http_options"]["port"] = _free_port(), _free_port()   # fallback proxy
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "metaspec.cli", "serve", "--config", str(path), "--num-cpus", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_serving(proc, port)
        with Client(f"127.0.0.1:{port}", timeout_s=120) as client:
            assert client.generate("hi", max_tokens=2).completion_tokens == 2
        started = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started if p.is_running())
        assert "raylet" in names and "gcs_server" in names, names
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
        _, alive = psutil.wait_procs(started, timeout=15)
        left = [(p.pid, p.name()) for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, (left, proc.stdout.read()[-3000:])
        assert _port_free(port) and _port_free(http)
    finally:
        _kill_session(proc.pid)
        proc.wait(timeout=60)
