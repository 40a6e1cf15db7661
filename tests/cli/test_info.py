import json
import subprocess
import sys

from click.testing import CliRunner

from normbench import __version__
from normbench.cli import main


def test_info_json_lists_cpu_dtypes_and_bandwidth():
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    cpu = data["devices"][0]
    assert cpu["device"] == "cpu" and cpu["threads"] >= 1
    assert {"fp32", "fp64", "bf16"} <= set(cpu["dtypes"])
    assert cpu["copy_gbps"] > 0.1


def test_info_table_and_version():
    runner = CliRunner()
    result = runner.invoke(main, ["info", "--no-bandwidth"])
    assert result.exit_code == 0 and "cpu" in result.output
    assert __version__ in runner.invoke(main, ["--version"]).output


def test_unknown_command_is_one_line_exit_2():
    result = CliRunner().invoke(main, ["nonsense"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and result.output.startswith("Error:")


def test_python_dash_m_and_console_script():
    out = subprocess.run([sys.executable, "-m", "normbench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "info" in out.stdout
    out = subprocess.run(["normbench", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout
