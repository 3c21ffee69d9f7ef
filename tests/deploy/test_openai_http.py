"""The OpenAI-compatible HTTP API, driven by the official `openai` package against a running Serve app.

One app (direct ingress, as deploy/metaspec.yaml ships), one pool of tiny models with a drafter; the same Router
that answers gRPC answers HTTP. The pool takes 1 request + 1 queued, so a burst meets a full queue (429).
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from metaspec.deploy.app import LOW_LATENCY_ENV, ServeOptions, start
from metaspec.deploy.config import hash_api_key, load_app_config
from metaspec.protocol.client import Client

from .conftest import QUICK_SHUTDOWN, stop_serve
from .test_service import SLOW_MACHINE, _free_port, wait_for


KEY = "http-key-1"
APP = "metaspec-http"
MODEL = "metaspec"
LONG = {"max_tokens": 600, "extra_body": {"ignore_eos": True, "metaspec": {"method": "ar"}}}


@pytest.fixture(scope="module")
def service(ray_local, tiny_pair, tmp_path_factory):
    cfg = load_app_config({
        # draft_budget off: with it, whether sps drafts on the tiny pair depends on measured timings
        "pools": [{"name": "a", "target": tiny_pair.target, "drafter": tiny_pair.drafter, "tables": None,
                   "draft_budget": False, "max_ongoing_requests": 1, "max_queued_requests": 1}],
        "router": {"outcome_dir": str(tmp_path_factory.mktemp("outcomes")), "default_max_tokens": 16,
                   "max_tokens_limit": 600, "api_key_hashes": [hash_api_key(KEY)], "pool_watch_s": 0.2,
                   "methods": ["sps", "ar"]}})
    try:
        grpc_port, http_port = _free_port(), _free_port()
        start(cfg, ServeOptions(grpc_port=grpc_port, http_port=http_port, proxy_grpc_port=_free_port(),
                                proxy_http_port=_free_port(), app_name=APP,
                                controller_env=SLOW_MACHINE | LOW_LATENCY_ENV | QUICK_SHUTDOWN))
        root = f"http://127.0.0.1:{http_port}"
        yield {"root": root, "base_url": f"{root}/v1", "grpc": f"127.0.0.1:{grpc_port}"}
    finally:
        stop_serve()


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service["base_url"], api_key=KEY, max_retries=0, timeout=120)


def _check_metaspec(body, method: str | None = None) -> None:
    meta, spec = body.metaspec, body.metrics["speculative_decoding"]
    assert meta["pool"] == "a" and meta["reason"] in ("fixed", "override") and meta["request_id"]
    assert method is None or meta["method"] == method
    assert spec["mean_acceptance_length"] >= 1.0 and 0.0 <= spec["draft_acceptance_rate"] <= 1.0
    assert 0 <= spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
    assert meta["timings"]["ttft_s"] > 0


# ---- the happy path -----------------------------------------------------------------------------------------

def test_completion_unary(client):
    out = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=24, temperature=0,
                                    extra_body={"ignore_eos": True})
    (choice,) = out.choices
    assert out.object == "text_completion" and out.model == MODEL and choice.text
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 24 and out.usage.prompt_tokens > 0
    _check_metaspec(out, "sps")                              # the fixed policy's first method
    assert out.metrics["speculative_decoding"]["num_drafts"] > 0


def test_completion_stream_adds_up_to_the_unary_answer(client):
    kw = dict(model=MODEL, prompt="for i in range(10):", max_tokens=40, temperature=0,
              extra_body={"ignore_eos": True, "metaspec": {"method": "pld"}})
    unary = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    *deltas, finish, tail = chunks
    assert len(deltas) >= 2 and all(c.choices[0].finish_reason is None for c in deltas)
    assert "".join(c.choices[0].text for c in deltas) == unary.choices[0].text
    assert finish.choices[0].finish_reason == "length"
    _check_metaspec(finish, "pld")                           # metaspec's fields come with the finishing chunk
    assert finish.metaspec["reason"] == "override"
    assert tail.choices == [] and tail.usage.completion_tokens == 40 == unary.usage.completion_tokens


def test_chat_unary_and_stream(client):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    kw = dict(model=MODEL, messages=messages, max_tokens=20, temperature=0, seed=3, extra_body={"ignore_eos": True})
    unary = client.chat.completions.create(**kw)
    message = unary.choices[0].message
    assert unary.object == "chat.completion" and message.role == "assistant" and message.content
    assert unary.usage.completion_tokens == 20
    _check_metaspec(unary)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].metaspec["method"] == unary.metaspec["method"]


def test_sampling_with_a_seed_is_reproducible(client):
    kw = dict(model=MODEL, prompt="import os", max_tokens=12, temperature=0.9, top_p=0.9, seed=7,
              extra_body={"ignore_eos": True, "metaspec": {"method": "ar"}})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_stop_string_ends_the_text(client):
    free = client.completions.create(model=MODEL, prompt="x = 1", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[5:7]
    assert stop.strip(), free
    out = client.completions.create(model=MODEL, prompt="x = 1", max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert out.finish_reason == "stop" and out.text == free[:free.index(stop)]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "ok"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_json_schema_response_matches_its_schema(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "A person as JSON."}], max_tokens=60,
              response_format=fmt, temperature=0)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    else:
        out = client.chat.completions.create(**kw)
        assert out.choices[0].finish_reason == "stop"
        text = out.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_structured_outputs(client):
    obj = client.completions.create(model=MODEL, prompt="{", max_tokens=40, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}})   # (as vLLM's does)
    text = obj.choices[0].text
    assert text.startswith("{")           # any object: a random model may not close it within max_tokens
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict)
    pattern = "[0-9]{3}-[a-z]{2}"
    regex = client.completions.create(model=MODEL, prompt="Code: ", max_tokens=20,
                                      extra_body={"structured_outputs": {"regex": pattern},
                                                  "metaspec": {"method": "pld"}})
    assert re.fullmatch(pattern, regex.choices[0].text) and regex.metaspec["method"] == "pld"
    grammar = client.completions.create(model=MODEL, prompt="Answer: ", max_tokens=10,
                                        extra_body={"structured_outputs": {"grammar": 'start: "yes" | "no"'}})
    assert grammar.choices[0].text in ("yes", "no")


def test_models_and_health(client, service):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.max_model_len == 1024
    assert {"ar", "sps", "pld"} <= set(model.metaspec["methods"]) and "sps" in model.metaspec["pools"]["a"]["methods"]
    anonymous = openai.OpenAI(base_url=service["root"], api_key="unused", max_retries=0)
    health = anonymous.get("/health", cast_to=object, options={"headers": {"Authorization": openai.omit}})  # no key
    assert health == {"status": "alive"}                 # liveness only: nothing about pools without a key
    health = client.get("/../health", cast_to=object)   # (base_url ends in /v1)
    assert health["status"] == "ok" and health["pools"] == [{"name": "a", "ok": True, "detail": ""}]
    assert health["outcome_log"]["appended"] >= 1 and "file" not in health["outcome_log"]


def test_http_and_grpc_share_one_router(client, service):
    """The same Router replica answers both: its outcome log and its request ids are one."""
    out = client.completions.create(model=MODEL, prompt="shared", max_tokens=3)
    with Client(service["grpc"], api_key=KEY, timeout_s=60) as grpc_client:
        reply = grpc_client.generate("shared", max_tokens=3)
    assert (out.metaspec["selector_version"], out.metaspec["pool"]) == (reply.selector_version, reply.pool)


# ---- errors: OpenAI error objects with their HTTP status ----------------------------------------------------

BAD_REQUESTS = [
    # (case, create kwargs, exception, status, message regex)
    ("n > 1", {"n": 2}, "BadRequestError", 400, r"n=2 is not supported"),
    ("logprobs", {"logprobs": 2}, "BadRequestError", 400, "logprobs=2 is not supported"),
    ("unknown field", {"extra_body": {"frobnicate": 1}}, "BadRequestError", 400, "unsupported field.*frobnicate"),
    ("negative temperature", {"temperature": -1}, "BadRequestError", 400, "temperature must be a number >= 0"),
    ("top_p above 1", {"top_p": 1.5}, "BadRequestError", 400, r"top_p must be in \(0, 1\]"),
    ("vanishing temperature", {"temperature": 1e-300}, "BadRequestError", 400, "temperature"),   # gRPC's limits
    ("negative seed", {"seed": -1}, "BadRequestError", 400, "out of range"),
    ("max_tokens above limit", {"max_tokens": 601}, "BadRequestError", 400, "max_tokens must be <= 600"),
    ("unknown method", {"extra_body": {"metaspec": {"method": "warp"}}}, "BadRequestError", 400,
     "unknown method 'warp'"),
    ("invalid regex", {"extra_body": {"structured_outputs": {"regex": "(a"}}}, "BadRequestError", 400,
     "regex not supported"),
    ("two structured outputs", {"extra_body": {"structured_outputs": {"regex": "a", "grammar": "b"}}},
     "BadRequestError", 400, "exactly one of json, regex, grammar"),
    ("unknown model", {"model": "gpt-4"}, "NotFoundError", 404, "model 'gpt-4' does not exist"),
]


@pytest.mark.parametrize("case, fields, error, status, message", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_bad_request(client, case, fields, error, status, message, stream):
    kw = {"model": MODEL, "prompt": "hi", "max_tokens": 4} | fields
    with pytest.raises(getattr(openai, error)) as err:
        out = client.completions.create(stream=stream, **kw)
        list(out) if stream else None
    assert err.value.status_code == status and re.search(message, err.value.message), err.value.message
    assert err.value.body["type"] and err.value.body["code"]            # the OpenAI error object


@pytest.mark.parametrize("key, message", [(None, "missing API key"), ("wrong", "invalid API key")])
def test_api_key_is_required(service, key, message):
    no_header = {"Authorization": openai.omit} if key is None else None          # no Authorization header at all
    other = openai.OpenAI(base_url=service["base_url"], api_key=key or "unused", max_retries=0)
    for call in (lambda: other.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_headers=no_header),
                 lambda: other.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                       extra_headers=no_header),
                 lambda: other.models.list(extra_headers=no_header)):
        with pytest.raises(openai.AuthenticationError, match=message) as err:
            call()
        assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"


def test_a_deadline_answers_504(client):
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=MODEL, prompt="deadline", max_tokens=600,
                                  extra_body={"ignore_eos": True, "metaspec": {"method": "ar", "timeout_s": 0.02}})
    assert err.value.status_code == 504 and "deadline" in err.value.message
    assert err.value.body["code"] == "deadline_exceeded"


def test_a_full_queue_answers_429(client):
    """One running + one queued: of four concurrent long requests at least one meets a full queue."""
    def one(i: int) -> int:
        try:
            client.completions.create(model=MODEL, prompt=f"burst {i}", **(LONG | {"max_tokens": 200}))
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(4)))
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 1, codes


def test_a_lost_pool_answers_503_and_comes_back(client):
    """While the only pool has no running replica, requests get 503 (not a hang); then it serves again."""
    from metaspec.deploy.loadtest import kill_one_replica

    kill_one_replica(APP, "a")
    codes = []

    def saw_503() -> bool:
        try:
            client.completions.create(model=MODEL, prompt="anyone?", max_tokens=2, timeout=5)
            codes.append(200)
        except openai.APIStatusError as exc:
            codes.append(exc.status_code)
            assert exc.status_code == 503 and exc.body["type"] == "service_unavailable_error", exc.message
            return True
        except openai.APITimeoutError:
            codes.append("timeout")
        return False

    wait_for(saw_503, "a 503 while the pool is down", 60)
    wait_for(lambda: _serves(client), "the pool to come back", 120)


def _serves(client) -> bool:
    try:
        return client.completions.create(model=MODEL, prompt="back?", max_tokens=2, timeout=10).usage is not None
    except (openai.APIStatusError, openai.APITimeoutError):
        return False


# ---- the chat template (no Serve) ---------------------------------------------------------------------------

def test_a_tokenizer_without_a_template_gets_the_default_one(tiny_tokenizer_dir, tmp_path):
    import asyncio

    from metaspec.deploy.openai_http import ChatTemplate

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert asyncio.run(ChatTemplate(str(tiny_tokenizer_dir)).render(messages)) == "Be brief.\n\nUser: hi\nAssistant:"
    own = tmp_path / "own"
    shutil.copytree(tiny_tokenizer_dir, own)
    cfg = json.loads((own / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<go>"
    (own / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert asyncio.run(ChatTemplate(str(own)).render(messages)) == "<system>Be brief.<user>hi<go>"


def test_cli_generate_against_the_service(service, capsys, monkeypatch):
    """`metaspec generate --server ... --json` (gRPC) with a constraint and the sampling options; the key comes
    from the environment."""
    from metaspec.cli import main

    monkeypatch.setenv("METASPEC_API_KEY", KEY)
    rc = main(["generate", "--server", service["grpc"], "--json", "--regex", "[a-z]{4}",
               "--max-tokens", "8", "--top-k", "5", "--top-p", "0.9", "--temperature", "0.5", "Word: "])
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert rc == 0 and re.fullmatch("[a-z]{4}", record["text"]) and record["pool"] == "a"
    assert record["finish_reason"] == "stop" and record["acceptance"]["acceptance_length"] >= 1


@pytest.mark.parametrize("backend", ["openai", "grpc"])
def test_bench_serve_drives_the_running_service(service, tiny_pair, backend):
    """`metaspec bench serve --backend openai --base-url ...` (and `--backend grpc --server ...`): the same
    workload and metrics through the running service; every request gets its max_tokens, the named arm serves."""
    from metaspec.bench.backends import EngineSpec
    from metaspec.bench.serve import ServeConfig, run_serve

    from ..conftest import data_dir

    if data_dir() is None:
        pytest.skip("the shared evaluation data is not on this machine")
    where = {"base_url": service["base_url"]} if backend == "openai" else {"server": service["grpc"]}
    cfg = ServeConfig(backend=backend, **where, api_key=KEY, engine=EngineSpec(target=tiny_pair.target, drafter=None),
                      methods=("ar", "sps"), concurrency=(1,), num_prompts=3, max_tokens=8, max_prompt_tokens=48,
                      data_dir=str(data_dir()), progress=False, warmup=False)
    result = run_serve(cfg)
    records = {r["method"]: r for r in result["records"]}
    errors = [e for run in result["runs"] for e in run["errors"]]
    assert set(records) == {"ar", "sps"} and not errors, errors
    for r in records.values():
        assert r["failed"] == 0 and r["requests"] == 3 and r["output_tokens_per_s"] > 0, r
        assert r["output_tokens"] == 3 * 8, r
