"""`metaspec generate` on the tiny pair: constraints, sampling options and `--json` (one JSON result per line)."""

from __future__ import annotations

import json
import re

from metaspec.cli import main


def _run(capsys, tiny_pair, *extra: str) -> tuple[int, list[dict]]:
    rc = main(["generate", "Code: ", "--target", tiny_pair.target, "--drafter", tiny_pair.drafter,
               "--dtype", "float32", "--max-tokens", "12", "--json", *extra])
    return rc, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_json_output_under_a_regex(capsys, tiny_pair):
    rc, (record,) = _run(capsys, tiny_pair, "--regex", "[0-9]{3}-[a-z]{2}", "--method", "pld")
    assert rc == 0 and re.fullmatch("[0-9]{3}-[a-z]{2}", record["text"])
    assert record["method"] == "pld" and record["finish_reason"] == "stop" and record["acceptance_length"] >= 1


def test_json_schema_and_sampling_options(capsys, tiny_pair, tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    rc, (record,) = _run(capsys, tiny_pair, f"--json-schema=@{tmp_path / 's.json'}", "--temperature", "0.8",
                         "--top-p", "0.9", "--top-k", "20", "--seed", "3")
    assert rc == 0 and isinstance(json.loads(record["text"])["ok"], bool)


def test_a_stop_string_ends_the_text(capsys, tiny_pair):
    _, (free,) = _run(capsys, tiny_pair)
    stop = free["text"][3:5]
    _, (stopped,) = _run(capsys, tiny_pair, "--stop", stop)
    assert stopped["finish_reason"] == "stop" and stopped["text"] == free["text"][:free["text"].index(stop)]


def test_errors_are_json_too(capsys, tiny_pair):
    rc, (record,) = _run(capsys, tiny_pair, "--json-schema", "{oops")
    assert rc == 2 and "Expecting property name" in record["error"]
    rc, (record,) = _run(capsys, tiny_pair, "--top-p", "1.5")
    assert rc == 2 and "top_p" in record["error"]


def test_dtype_auto_resolves_and_a_bad_dtype_is_a_usage_error(capsys, tiny_pair):
    from metaspec.cli import _dtype
    from metaspec.workers.model import resolve_dtype

    assert _dtype("auto") == resolve_dtype("auto", "cpu") and _dtype("float32") == "float32"
    try:
        main(["generate", "x", "--target", tiny_pair.target, "--dtype", "int4"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--dtype int4 was accepted")
    assert "dtype must be one of" in capsys.readouterr().err
