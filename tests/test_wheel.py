"""The built wheel carries everything the service reads at run time: every Lua script,
every migration and every static asset; the Dockerfile installs that wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("hongbao-*.whl")
    return zipfile.ZipFile(built)


@pytest.mark.slow
def test_every_lua_script_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    scripts = sorted(p.name for p in (ROOT / "lua").glob("*.lua"))
    assert scripts, "no Lua scripts found in lua/"
    for name in scripts:
        assert f"app/lua/{name}" in names
        packed = wheel.read(f"app/lua/{name}").decode()
        assert packed == (ROOT / "lua" / name).read_text(encoding="utf-8")


@pytest.mark.slow
def test_migrations_and_static_assets_are_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for path in [
        *(ROOT / "app/store/migrations").glob("*.sql"),
        *(ROOT / "app/web/static").iterdir(),
    ]:
        assert path.relative_to(ROOT).as_posix() in names


def test_dockerfile_installs_the_wheel_instead_of_copying_sources() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip wheel" in dockerfile
    assert "/wheels/hongbao-" in dockerfile
    runtime = dockerfile.rsplit("FROM ", 1)[1]
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    assert "lua" not in runtime.replace("# ", "")
    assert "/src/app" not in runtime
