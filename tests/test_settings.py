"""One source of settings: the flags, environment variables, defaults and
range checks all come from the settings dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

from dworkers.common.grpc_engine import POLLING_ENGINE
from dworkers.common.settings import add_flags, describe, from_args
from dworkers.frontend.service import FrontendSettings
from dworkers.master.node import MasterSettings
from dworkers.worker.worker import WorkerSettings

pytestmark = pytest.mark.unit
SERVICES = (MasterSettings, WorkerSettings, FrontendSettings)


def parse(cls, *argv: str):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, cls)
    return from_args(cls, parser.parse_args(list(argv)))


@pytest.mark.parametrize("cls", SERVICES)
def test_defaults_come_from_the_dataclass_and_every_field_has_a_flag(cls):
    settings = parse(cls)
    assert settings == cls()
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    flags = {a.dest for a in parser._actions}

    def names(c):
        for field in dataclasses.fields(c):
            if field.metadata.get("group"):
                yield from names(field.default_factory)
            else:
                yield field.name
    assert set(names(cls)) <= flags


def test_flags_and_environment_set_nested_settings(monkeypatch):
    monkeypatch.setenv("DWORKERS_WORK_TIMEOUT", "12.5")
    settings = parse(MasterSettings, "--zk", "zk1:2181", "--max-pending", "7", "--reflection", "off")
    assert settings.cluster.zk == "zk1:2181"
    assert settings.core.max_pending == 7 and settings.core.work_timeout == 12.5
    assert settings.reflection is False
    assert "max_pending=7" in describe(settings) and "zk=zk1:2181" in describe(settings)


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--concurrency", "2000"], ["--executor", "fork"],
                                  ["--shutdown-grace", "-1"]])
def test_out_of_range_values_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parser = argparse.ArgumentParser()
        add_flags(parser, WorkerSettings)
        parser.parse_args(argv)
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("environment, expected",
                         [(None, "polling"), ("", ""), ("-event_engine_dns", "-event_engine_dns")])
def test_the_command_chooses_grpcs_polling_engine_before_grpc_loads_unless_the_environment_says(environment, expected):
    """gRPC reads GRPC_EXPERIMENTS once, when it is imported: the command
    must set it before anything imports gRPC, and leave a user's own alone."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if environment is not None:
        env["GRPC_EXPERIMENTS"] = environment
    probe = ("import builtins, os\n"
             "real = builtins.__import__\n"
             "def spy(name, *a, **k):\n"
             "    if name == 'grpc' or name.startswith('grpc.'):\n"
             "        print('grpc loads with', repr(os.environ.get('GRPC_EXPERIMENTS')), flush=True)\n"
             "        builtins.__import__ = real\n"
             "    return real(name, *a, **k)\n"
             "builtins.__import__ = spy\n"
             "import dworkers.cli\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    want = POLLING_ENGINE if expected == "polling" else expected
    assert out.stdout.splitlines()[0] == f"grpc loads with {want!r}"
