"""Running the swarm: the daemons of a profile, supervisord's config, the health wait."""

from __future__ import annotations

import configparser
import subprocess
import sys

import pytest

from schemas.config import load_settings
from services.control.daemons import daemons, external_backends
from services.control.supervisor import render_config
from tests.conftest import REPO, free_port, process_env


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in [n for n in __import__("os").environ if n.startswith("SWARM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SWARM_DATA_DIR", str(tmp_path))


def test_default_profile_runs_model_hosts_registry_wrappers_and_router_in_that_order():
    found = daemons(load_settings(), python="py")
    names = [d.name for d in sorted(found, key=lambda d: d.priority)]
    assert names == [
        "modelhost-smollm2",
        "modelhost-gemma3",
        "registry",
        "wrapper-reasoner",
        "wrapper-classifier",
        "wrapper-tlc_domain_classifier",
        "router",
    ]
    by_name = {d.name: d for d in found}
    assert by_name["modelhost-gemma3"].argv == (
        "py",
        "-m",
        "services.modelhost",
        "--backend",
        "gemma3",
    )
    assert by_name["wrapper-reasoner"].health_url == "http://127.0.0.1:8050/health"
    assert by_name["router"].argv == ("py", "-m", "router")
    assert by_name["router"].health_url == "http://127.0.0.1:6103/health"


def test_a_real_ollama_is_expected_not_started():
    settings = load_settings(REPO / "config" / "swarm.ollama.yaml")
    assert not [d for d in daemons(settings) if d.name.startswith("modelhost")]
    assert external_backends(settings) == {
        name: f"http://127.0.0.1:{backend.port}" for name, backend in settings.backends.items()
    }


def test_supervisor_config_has_one_restarting_program_per_daemon(tmp_path):
    settings = load_settings()
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(render_config(settings, daemons(settings)))
    programs = {s.removeprefix("program:"): parser[s] for s in parser if s.startswith("program:")}
    assert set(programs) == {d.name for d in daemons(settings)}
    for name, program in programs.items():
        assert program["autorestart"] == "true"
        assert program["stdout_logfile"] == str(tmp_path / "logs" / f"{name}.log")
    assert programs["registry"]["command"].endswith(" -m registry")
    assert (tmp_path / "logs").is_dir()


@pytest.mark.process
def test_wait_names_the_daemon_that_did_not_come_up(tmp_path):
    log_dir = tmp_path / "state" / "logs"
    log_dir.mkdir(parents=True)
    (log_dir / "registry.log").write_text("boom: could not open the database\n")
    env = process_env(tmp_path, SWARM_REGISTRY__PORT=str(free_port()))
    env["SWARM_CONFIG"] = str(tmp_path / "profile.yaml")
    (tmp_path / "profile.yaml").write_text("registry: {}\n")
    done = subprocess.run(
        [sys.executable, "-m", "services.control", "wait", "--timeout", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert "error: registry is not healthy" in done.stdout
    assert "boom: could not open the database" in done.stdout
