"""The service's loopback Ray answers on every interface: Ray 2.60 binds its GCS, raylet and worker servers there
even with `_node_ip_address="127.0.0.1"` (README "Security"). What keeps a stranger out is Ray's token auth, which
Ray (>= 2.59) turns on for a local cluster by itself (RAY_AUTH_MODE=token, token in ~/.ray/auth_token). These
tests hold that default: a caller without the token is refused, one with it is let in."""

from __future__ import annotations

import os
import subprocess
import sys

CONNECT = """
import ray, sys
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
except ConnectionError as exc:
    print("refused:", exc)
    sys.exit(3)
print("connected", ray.cluster_resources().get("CPU"))
"""


def _connect(gcs: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CONNECT, gcs], env=env, capture_output=True, text=True, timeout=180)


def test_the_local_ray_refuses_a_caller_without_its_token(ray_local, tmp_path):
    import ray
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

    assert os.environ.get(AUTH_MODE_ENV_VAR) == "token"        # what ray.init(address="local") set up
    gcs = ray.get_runtime_context().gcs_address
    stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    stranger |= {"HOME": str(tmp_path), AUTH_MODE_ENV_VAR: "disabled"}      # no token file, no token variable
    refused = _connect(gcs, stranger)
    assert refused.returncode == 3, refused.stdout + refused.stderr[-3000:]
    assert "Authentication token is missing or incorrect" in refused.stderr
    let_in = _connect(gcs, dict(os.environ))                   # the service's own environment: its token
    assert let_in.returncode == 0 and "connected" in let_in.stdout, let_in.stdout + let_in.stderr[-3000:]
