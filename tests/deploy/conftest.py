"""One loopback Ray for every test of tests/deploy (package scope); each module starts and stops its own Serve app.

Starting Ray is the slow and fragile part on a loaded 2-core machine (a GCS that has not let go of its port, a
raylet still exiting). So Ray starts once, every module's Serve is shut down and waited for until none of its actors
is left, and at the end Ray's processes (this process's children) are waited for until they are gone.
"""

from __future__ import annotations

import logging
import time

import pytest

logger = logging.getLogger(__name__)
RAY_CPUS = 4                   # logical CPUs of the shared Ray (the largest module needs 4)
# Direct ingress keeps a stopping Router replica draining for 30 s by default: a test app need not wait.
QUICK_SHUTDOWN = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
# Ray's own processes that `ray.init(address="local")` starts as children of this process.
RAY_PROCESS_NAMES = ("gcs_server", "raylet", "dashboard", "agent", "log_monitor", "monitor", "ray::", "runtime_env",
                     "default_worker", "setup_worker", "plasma")


@pytest.fixture(scope="package")
def ray_local():
    """The package's Ray: started once, shut down after the last deploy test, its processes waited for."""
    import ray

    if ray.is_initialized():       # a Ray left by something else: not ours to reuse
        stop_ray()
    wait_ray_processes_gone()
    ray.init(address="local", num_cpus=RAY_CPUS, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False)
    try:
        yield
    finally:
        stop_ray()


def stop_serve(limit_s: float = 90.0) -> None:
    """Shut Serve down and wait until none of its actors is alive (killed past `limit_s`), so that the next
    module's serve.start gets a fresh controller with its own options."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    except Exception as exc:       # a controller that failed to stop in time: its actors are killed below
        logger.warning("serve.shutdown: %s", exc)
    deadline = time.monotonic() + limit_s
    while left := _serve_actors():
        if time.monotonic() > deadline:
            for name in left:
                try:
                    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
                except Exception:
                    pass
            deadline = time.monotonic() + limit_s
        time.sleep(0.2)


def _serve_actors() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == "serve"]


def stop_ray(limit_s: float = 60.0) -> None:
    import ray

    ray.shutdown()
    wait_ray_processes_gone(limit_s)


def wait_ray_processes_gone(limit_s: float = 60.0) -> None:
    """Wait until no Ray process started by this process is left (SIGKILL for those past `limit_s`)."""
    import psutil

    deadline = time.monotonic() + limit_s
    while left := _ray_children():
        if time.monotonic() > deadline:
            for proc in left:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(left, timeout=10)
            return
        time.sleep(0.2)


def _ray_children() -> list:
    import psutil

    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            text = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            continue
        if any(n in text for n in RAY_PROCESS_NAMES):
            out.append(proc)
    return out
