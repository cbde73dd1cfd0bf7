"""What `pip install` of the project gives a user: one package, `dworkers`,
with its generated gRPC code, built from a checkout that never ran
`make proto`, and nothing named `services` on their path."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration
NOT_SHIPPED = {".venv", "gen", "build", "node_modules", ".git", "__pycache__", ".pytest_cache", ".hypothesis", ".run"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout without generated code."""
    source = tmp_path_factory.mktemp("checkout") / "dworkers"
    shutil.copytree(ROOT, source, ignore=lambda _dir, names: [
        n for n in names if n in NOT_SHIPPED or n.endswith(".egg-info")])
    out = tmp_path_factory.mktemp("wheel")
    # The build requirements are in the test venv: no isolation (no download).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source)], check=True, timeout=300)
    (built,) = out.glob("dworkers-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    """A new venv with the wheel installed; third-party dependencies come from
    the test venv's site-packages (a path entry: its .pth files, among them
    the checkout's editable install, are not run)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_wheel_holds_one_package_with_its_generated_code(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"dworkers", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for module in ("dworkers/v1/__init__.py", "dworkers/v1/work_pb2.py", "dworkers/v1/frontend_pb2_grpc.py",
                   "dworkers/cli.py", "dworkers/master/node.py", "dworkers/worker/jobs.py"):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "dworkers = dworkers.cli:main" in entry_points


def test_an_application_with_its_own_services_package_imports_dworkers(fresh_venv, tmp_path):
    app = tmp_path / "app"
    (app / "services").mkdir(parents=True)
    (app / "services" / "__init__.py").write_text("MINE = True\n")
    (app / "myapp").mkdir()
    (app / "myapp" / "__init__.py").write_text("")
    (app / "myapp" / "jobs.py").write_text(textwrap.dedent("""
        from dworkers.worker.jobs import job

        @job("shout")
        def shout(payload):
            return payload.upper()
    """))
    # -P: the current directory is not on the path, as for the `dworkers`
    # command; loading jobs puts it there, as `celery -A` does.
    check = f"VENV = {str(fresh_venv)!r}\n" + textwrap.dedent("""
        import dworkers, dworkers.cli
        from dworkers.v1 import frontend_pb2_grpc, work_pb2
        from dworkers.worker import jobs
        assert jobs.load(["myapp.jobs"])["shout"](b"hi") == b"HI"
        import services
        assert services.MINE and dworkers.__file__.startswith(VENV), dworkers.__file__
        print("ok")
    """)
    done = subprocess.run([str(fresh_venv / "bin" / "python"), "-P", "-c", check], cwd=app, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    command = subprocess.run([str(fresh_venv / "bin" / "dworkers"), "--help"], cwd=app, capture_output=True,
                             text=True, timeout=60)
    assert command.returncode == 0 and "worker" in command.stdout, command.stderr
