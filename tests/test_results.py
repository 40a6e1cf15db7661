import json

import pytest

from normbench.errors import UserError
from normbench.results import ResultsWriter, environment, read_results, schema_name

KEYS = ("norm", "shape")


def _rec(norm, shape, status="ok", **extra):
    return {"norm": norm, "shape": shape, "status": status, "reason": None, **extra}


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_every_write_leaves_a_complete_file_and_resume_skips_done_cells(tmp_path, suffix):
    path = tmp_path / f"r{suffix}"
    env = environment("cpu", argv=["normbench", "x"])
    w = ResultsWriter(path, schema_name("profile"), env, KEYS)
    w.write(_rec("l1", [2, 3], time_median_s=0.5, case={"scale": 1e3}))
    first = read_results(path, schema=schema_name("profile"))
    assert len(first.records) == 1 and first.records[0]["time_median_s"] == 0.5
    w.write(_rec("l2", [2, 3], status="error", reason="boom"))
    w.write(_rec("linf", [2, 3], status="skipped", reason="unsupported"))

    resumed = ResultsWriter(path, schema_name("profile"), env, KEYS, resume=True)
    assert resumed.has({"norm": "l1", "shape": [2, 3]})
    assert resumed.has({"norm": "linf", "shape": [2, 3]})
    assert not resumed.has({"norm": "l2", "shape": [2, 3]})  # errors run again
    resumed.write(_rec("l2", [2, 3]))
    res = read_results(path)
    assert sorted(r["norm"] for r in res.records) == ["l1", "l2", "linf"]
    assert res.records[0]["case"] == {"scale": 1e3}
    if suffix != ".csv":
        assert res.schema == "normbench.profile/1"
        assert res.environment["command"] == "normbench x"


def test_fresh_writer_truncates(tmp_path):
    path = tmp_path / "r.json"
    w = ResultsWriter(path, "normbench.profile/1", {}, KEYS)
    w.write(_rec("l1", [1]))
    ResultsWriter(path, "normbench.profile/1", {}, KEYS)
    assert json.loads(path.read_text())["records"] == []


def test_errors(tmp_path):
    with pytest.raises(UserError, match="end in .json"):
        ResultsWriter(tmp_path / "r.txt", "s", {}, KEYS)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a readable .json"):
        read_results(bad)
    other = tmp_path / "o.json"
    ResultsWriter(other, "normbench.stability/1", {}, KEYS)
    with pytest.raises(UserError, match="holds normbench.stability/1"):
        ResultsWriter(other, "normbench.profile/1", {}, KEYS, resume=True)
    with pytest.raises(UserError, match="cannot read"):
        read_results(tmp_path / "missing.json")


def test_environment_fields():
    env = environment("cpu")
    for key in ("normbench_version", "torch_version", "device", "device_name", "threads", "timestamp", "command"):
        assert env[key] not in (None, "")


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_appends_keep_the_file_valid_and_new_columns_widen_csv(tmp_path, suffix):
    path = tmp_path / f"r{suffix}"
    w = ResultsWriter(path, "normbench.profile/1", {"x": 1}, KEYS)
    for i in range(5):
        w.write(_rec("l1", [i]))
        assert len(read_results(path).records) == i + 1
    w.write(_rec("l2", [9], gbps=3.5))
    recs = read_results(path).records
    assert len(recs) == 6 and recs[-1]["gbps"] == 3.5 and recs[0].get("gbps") is None
