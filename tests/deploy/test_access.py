"""API keys and per-key quotas (deploy/access.py) on a fake clock; the service-level tests are in test_reload.py."""

from __future__ import annotations

import pytest

from metaspec.deploy.access import Access, AccessConfig, access_config, read_key_file
from metaspec.deploy.config import Quota, hash_api_key, load_app_config
from metaspec.deploy.status import Status


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_come_from_the_config_and_a_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026-12\n{hash_api_key('file-key')}  # ci\n\n")
    spec = load_app_config({"router": {"api_key_hashes": [hash_api_key("inline")],
                                       "api_keys_file": str(path)}}).router
    access = Access(access_config(spec))
    assert access.authenticate("inline", "p", "h") == hash_api_key("inline")
    assert access.authenticate("file-key", "p", "h") == hash_api_key("file-key")
    with pytest.raises(Status, match="invalid API key"):
        access.authenticate("other", "p", "h")
    path.write_text("not-a-digest\n")
    with pytest.raises(ValueError, match="not sha256 hex digests"):
        access_config(spec)
    assert read_key_file(None) == ()


def test_no_keys_means_no_authentication():
    access = Access(AccessConfig())
    assert access.authenticate(None, "p", "h") is None
    access.admit(None)


def test_request_quota_refuses_past_the_minute_and_recovers():
    clock, digest = Clock(), hash_api_key("k")
    access = Access(AccessConfig((digest,), Quota(requests_per_min=2)), clock)
    access.admit(digest)
    access.admit(digest)
    with pytest.raises(Status, match="2 requests per minute") as err:
        access.admit(digest)
    assert err.value.code.name == "RESOURCE_EXHAUSTED"
    clock.now += 60.5
    access.admit(digest)


def test_token_quota_counts_what_finished_requests_used_and_per_key_overrides_apply():
    clock, a, b = Clock(), hash_api_key("a"), hash_api_key("b")
    access = Access(AccessConfig((a, b), Quota(tokens_per_min=100), {b: Quota()}), clock)
    access.admit(a)
    access.charge(a, 100)
    with pytest.raises(Status, match="100 tokens per minute"):
        access.admit(a)
    for _ in range(5):             # b has its own (unlimited) quota
        access.admit(b)
        access.charge(b, 1000)


def test_rotation_keeps_what_a_remaining_key_spent_and_forgets_removed_keys():
    clock, a, b = Clock(), hash_api_key("a"), hash_api_key("b")
    access = Access(AccessConfig((a, b), Quota(requests_per_min=1)), clock)
    access.admit(a)
    rotated = access.rotated(AccessConfig((a,), Quota(requests_per_min=1)))
    with pytest.raises(Status, match="RESOURCE_EXHAUSTED|requests per minute"):
        rotated.admit(a)
    with pytest.raises(Status, match="invalid API key"):
        rotated.authenticate("b", "p", "h")


def test_quota_keys_must_be_digests():
    with pytest.raises(ValueError, match="sha256"):
        load_app_config({"router": {"quotas": {"plain": {"requests_per_min": 1}}}})
