"""A PEP 517 build backend with no dependencies, shipped at the root of the agent bundle.

Boards have no internet: `pip install --no-index` of the bundle cannot fetch setuptools,
so the bundle builds its own wheel with the standard library (`requires = []`). It packs
the `devices_agent` directory next to it and declares the `flotilla-agent` script.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
NAME = "flotilla_agent"
PACKAGE = "devices_agent"


def _version() -> str:
    for line in (_ROOT / PACKAGE / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "0.0.0"


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")
    return f"{path},sha256={digest},{len(data)}"


def _dist_info_files(version: str) -> dict[str, bytes]:
    dist_info = f"{NAME}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: flotilla-agent\nVersion: {version}\nRequires-Python: >=3.11\n"
    wheel = "Wheel-Version: 1.0\nGenerator: flotilla-bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    entry_points = "[console_scripts]\nflotilla-agent = devices_agent.__main__:main\n"
    return {
        f"{dist_info}/METADATA": metadata.encode(),
        f"{dist_info}/WHEEL": wheel.encode(),
        f"{dist_info}/entry_points.txt": entry_points.encode(),
    }


def build_wheel(
    wheel_directory: str,
    config_settings: dict[str, object] | None = None,
    metadata_directory: str | None = None,
) -> str:
    """Write the wheel into `wheel_directory`; returns its file name."""
    version = _version()
    filename = f"{NAME}-{version}-py3-none-any.whl"
    records: list[str] = []
    with zipfile.ZipFile(Path(wheel_directory) / filename, "w", zipfile.ZIP_DEFLATED) as wheel:
        for path in sorted((_ROOT / PACKAGE).rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts:
                continue
            arcname = path.relative_to(_ROOT).as_posix()
            data = path.read_bytes()
            wheel.writestr(arcname, data)
            records.append(_record_line(arcname, data))
        for arcname, data in _dist_info_files(version).items():
            wheel.writestr(arcname, data)
            records.append(_record_line(arcname, data))
        record_name = f"{NAME}-{version}.dist-info/RECORD"
        records.append(f"{record_name},,")
        wheel.writestr(record_name, "\n".join(records) + "\n")
    return filename


def build_sdist(sdist_directory: str, config_settings: dict[str, object] | None = None) -> str:
    """Not needed on a board (the bundle is the sdist); refuse clearly."""
    raise NotImplementedError(f"{os.path.basename(__file__)} builds wheels only")


def get_requires_for_build_wheel(config_settings: dict[str, object] | None = None) -> list[str]:
    """Nothing to install to build: that is the point of this backend."""
    return []
