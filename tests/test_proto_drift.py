"""The checked-in generated protobuf code must match proto/quota/v1/*.proto."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATE = REPO_ROOT / "proto" / "generate.py"
CHECKED_IN = REPO_ROOT / "quota_sidecar" / "_proto"


@pytest.fixture(scope="module")
def generate_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("proto_generate", GENERATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_check(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATE), "--check", *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _copy_of_checked_in(tmp_path: Path) -> Path:
    copy = tmp_path / "_proto"
    shutil.copytree(CHECKED_IN, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_checked_in_code_matches_the_proto() -> None:
    result = _run_check()
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_modules_import_from_our_package() -> None:
    from quota_sidecar._proto.quota.v1 import quota_pb2, quota_pb2_grpc

    assert quota_pb2.CheckAndReserveRequest.__module__ == "quota_sidecar._proto.quota.v1.quota_pb2"
    assert quota_pb2_grpc.QuotaServiceStub is not None
    assert "from quota.v1 import" not in (CHECKED_IN / "quota" / "v1" / "quota_pb2_grpc.py").read_text()


def test_an_edited_file_is_detected(tmp_path: Path) -> None:
    copy = _copy_of_checked_in(tmp_path)
    edited = copy / "quota" / "v1" / "quota_pb2_grpc.py"
    edited.write_text(edited.read_text() + "# hand edit\n")
    result = _run_check("--out", str(copy))
    assert result.returncode == 1
    assert "differs: quota/v1/quota_pb2_grpc.py" in result.stderr
    assert "python proto/generate.py" in result.stderr


def test_missing_and_stale_files_are_detected(generate_module: ModuleType, tmp_path: Path) -> None:
    copy = _copy_of_checked_in(tmp_path)
    (copy / "quota" / "v1" / "quota_pb2.pyi").unlink()
    (copy / "quota" / "v1" / "old_pb2.py").write_text("# from a deleted .proto\n")
    problems = generate_module.compare_trees(CHECKED_IN, copy)
    assert problems == ["stale (no longer generated): quota/v1/old_pb2.py", "missing: quota/v1/quota_pb2.pyi"]
    assert generate_module.compare_trees(CHECKED_IN, CHECKED_IN) == []


def test_generation_is_deterministic(generate_module: ModuleType, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    generate_module.generate(first)
    generate_module.generate(second)
    assert generate_module.compare_trees(first, second) == []
    assert generate_module.compare_trees(first, CHECKED_IN) == []


def test_generation_removes_stale_modules(generate_module: ModuleType, tmp_path: Path) -> None:
    copy = _copy_of_checked_in(tmp_path)
    (copy / "quota" / "v1" / "old_pb2_grpc.py").write_text("# stale\n")
    generate_module.generate(copy)
    assert not (copy / "quota" / "v1" / "old_pb2_grpc.py").exists()


def test_wrong_grpcio_tools_version_is_refused(
    generate_module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generate_module, "PINNED_GRPCIO_TOOLS_VERSION", "0.0.1")
    with pytest.raises(generate_module.GenerateError, match="pinned to 0.0.1"):
        generate_module.generate(tmp_path)
    assert generate_module.main(["--out", str(tmp_path)]) == 2


def test_missing_grpcio_tools_is_refused(
    generate_module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(generate_module.importlib.metadata, "version", not_installed)
    with pytest.raises(generate_module.GenerateError, match="grpcio-tools is not installed"):
        generate_module.generate(tmp_path)
