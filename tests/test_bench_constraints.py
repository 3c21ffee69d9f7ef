"""`metaspec bench --constraints`: the validator, the per-subset summary, and one tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from metaspec.bench_constraints import (ConstraintBenchConfig, check_output, format_table, load_schemas,
                                        run_constraint_bench)

from .conftest import data_dir

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}, "required": ["n"]}


@pytest.mark.parametrize("text, verdict", [('{"n": 2}', "valid"), ('{"n": 7}', "schema_violation"),
                                           ('{"n": 2', "invalid_json"), ("{}", "schema_violation")])
def test_check_output(text, verdict):
    assert check_output(SCHEMA, text) == verdict


def test_check_output_survives_a_schema_the_validator_cannot_use():
    assert check_output({"$ref": "#/definitions/missing"}, "1") == "validator_error"


def test_end_to_end_on_the_tiny_pair(tiny_pair):
    if data_dir() is None:
        pytest.skip("JSONSchemaBench sample not found (../shared/data next to the clone)")
    cfg = ConstraintBenchConfig(target=tiny_pair.target, drafter=tiny_pair.drafter, dtype="float32", threads=1,
                                arms=("pld",), subsets=("Github_trivial", "Snowplow"), n_per_subset=1, max_tokens=24,
                                data_dir=str(data_dir()))
    assert [r["subset"] for r in load_schemas(cfg)] == ["Github_trivial", "Snowplow"]
    result = run_constraint_bench(cfg)
    json.dumps(result)                                                  # the JSON output is serialisable
    all_row = result["summary"][-1]
    assert all_row["subset"] == "all" and all_row["schemas"] == 2
    assert all_row["finished"] + all_row["cut_by_max_tokens"] == all_row["compiled"]
    assert all_row["valid"] == all_row["finished"] - all_row["validator_error"]     # every finished output valid
    assert all_row["all_same_as_ar"]                                               # fp32: identical outputs
    for record in result["records"]:
        if record["compiled"]:
            assert {"unconstrained", "ar/no-ff", "ar", "pld"} <= set(record["runs"])
    assert "pld x" in format_table(result)
