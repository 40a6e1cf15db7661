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


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_times_s_round_trips_exactly(tmp_path, suffix):
    import statistics

    path = tmp_path / f"t{suffix}"
    times = [0.0123456789012345, 1e-7, 0.1, 2.5e-3, 0.0123456789012346]
    w = ResultsWriter(path, "normbench.profile/1", {}, KEYS)
    w.write(_rec("l1", "4x3", time_median_s=statistics.median(times), times_s=times, repeats=5))
    back = read_results(path).records[0]
    assert back["times_s"] == times  # a list of floats again, every digit kept (CSV: one JSON cell)
    assert statistics.median(back["times_s"]) == back["time_median_s"] and back["repeats"] == 5
    if suffix == ".csv":
        assert '"[0.0123456789012345, 1e-07, 0.1, 0.0025, 0.0123456789012346]"' in path.read_text()


def test_open_results_rules(tmp_path):
    from normbench.results import environment_differences, open_results, opened_results

    path = tmp_path / "r.json"
    env = {"device": "cpu", "torch_version": "2.13.0", "threads": 2, "other": "x"}
    open_results(path, "normbench.profile/1", env, KEYS).write(_rec("l1", [1]))
    assert opened_results()[-1] == path
    with pytest.raises(UserError, match=r"r.json exists: pass --resume .* or --force"):
        open_results(path, "normbench.profile/1", env, KEYS)
    # a field other than device, torch version and threads may differ
    w = open_results(path, "normbench.profile/1", {**env, "other": "y"}, KEYS, resume=True)
    assert w.has({"norm": "l1", "shape": [1]})
    with pytest.raises(UserError, match=r"cannot resume, it was measured with threads 2 -> 1\b"):
        open_results(path, "normbench.profile/1", {**env, "threads": 1}, KEYS, resume=True)
    old = read_results(path)
    assert environment_differences(old, {**env, "device": "cuda", "torch_version": "2.12"}) == [
        "device cpu -> cuda", "torch_version 2.13.0 -> 2.12"]
    w = open_results(path, "normbench.profile/1", {}, KEYS, force=True)
    assert read_results(path).records == []
