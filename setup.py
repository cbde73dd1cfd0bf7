"""Packaging. The `dworkers` package is the services/ tree, plus the gRPC
code generated from protos/ into gen/ (`dworkers.v1`): a build from a
checkout, a git URL or an sdist generates it first, so installs never need
`make proto`. Metadata and dependencies are in pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
PROTOS = sorted((ROOT / "protos" / "dworkers" / "v1").glob("*.proto"))
GEN = ROOT / "gen"
STAMP = GEN / ".generated"


def generate() -> None:
    """Runs protoc (from grpcio-tools, a build requirement) when gen/ is
    missing or older than a .proto file."""
    if STAMP.exists() and all(p.stat().st_mtime <= STAMP.stat().st_mtime for p in PROTOS):
        return
    import grpc_tools
    from grpc_tools import protoc

    GEN.mkdir(exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT / 'protos'}", f"-I{well_known}", f"--python_out={GEN}", f"--pyi_out={GEN}",
            f"--grpc_python_out={GEN}", *map(str, PROTOS)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on protos/dworkers/v1")
    (GEN / "dworkers" / "v1" / "__init__.py").write_text('"""Generated from protos/dworkers/v1: never edit."""\n')
    STAMP.touch()


generate()
setup(
    package_dir={"dworkers": "services", "dworkers.v1": "gen/dworkers/v1"},
    packages=["dworkers", *(f"dworkers.{name}" for name in find_packages("services")), "dworkers.v1"],
    package_data={"dworkers": ["py.typed"], "dworkers.dashboard": ["static/*"], "dworkers.v1": ["*.pyi"]},
)
