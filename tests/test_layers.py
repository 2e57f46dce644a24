"""The two layers: the method (`import sts`) stands on torch, transformers and pydantic alone and
never loads the runner (the `sts` command); the command says in one line what it lacks."""

import importlib.metadata
import re
import subprocess
import sys

from sts.cli.commands import CLI_EXTRA


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_the_method_loads_no_runner_module_and_no_plotting():
    result = run_python(
        "import sys, sts\n"
        "print(sorted(name for name in sts.__all__ if getattr(sts, name)))  # the whole API, loaded\n"
        "print(sorted(m for m in sys.modules if m == 'sts.cli' or m.startswith('sts.cli.') or m == 'matplotlib'))"
    )
    assert result.returncode == 0, result.stderr
    api, loaded = result.stdout.strip().splitlines()
    for name in ("apply_sts", "remove_sts", "set_progress", "step_stats", "STSCallback", "STSConfig"):
        assert f"'{name}'" in api
    assert loaded == "[]", f"import sts loaded {loaded}"


def test_the_cli_extra_matches_the_package_metadata():
    extra = {
        re.split(r"[<>=!~; \[]", requirement, maxsplit=1)[0].lower()
        for requirement in importlib.metadata.requires("sts-mllm")
        if re.search(r"""extra\s*==\s*["']cli["']""", requirement)
    }
    assert extra == set(CLI_EXTRA)


def test_the_command_without_its_extra_says_what_to_install_in_one_line(tmp_path):
    result = run_python(
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if not installed\n"
        "from sts.cli import main\n"
        f"sys.exit(main(['demo', '--out', {str(tmp_path / 'demo')!r}]))"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sts: error: the sts command needs its cli extra (missing: matplotlib); pip install 'sts-mllm[cli]'"
    ]
    assert not (tmp_path / "demo").exists()  # refused before any work


def test_a_config_error_is_said_before_torch_or_transformers_is_imported():
    """What keeps the command's answer to a wrong recipe fast (benchmarks/cli_start.py measures it)."""
    result = run_python(
        "import sys\n"
        "from sts.cli import main\n"
        "status = main(['train', 'demo', 'stages.0.learning_rat=1e-3'])\n"
        "print(status, sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    assert result.stdout.strip() == "2 []"
    assert result.stderr.strip().startswith("sts: error: config error at stages.0.learning_rat")
