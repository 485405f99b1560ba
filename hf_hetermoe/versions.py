"""The library versions hf-hetermoe supports, checked where a job starts (launcher, callback, CLI).

HeterMoE wraps private Trainer methods and relies on transformers 5's fused experts modules, so a transformers
4.x or 6.x import may "work" and then train the wrong thing. Out-of-range versions fail at once, naming the
package, the version found, the supported range and the pip command that fixes it. The ranges are setup.py's
`install_requires`; keep the two in step.
"""

from __future__ import annotations

import importlib
from typing import Mapping

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

SUPPORTED: dict[str, str] = {
    "torch": ">=2.6",
    "transformers": ">=5,<6",
    "accelerate": ">=1.10",
}


class UnsupportedVersionError(ImportError):
    """An installed dependency is outside the range hf-hetermoe supports (an ImportError, as transformers' own
    `require_version` raises, so `except ImportError` guards keep working)."""


def installed_versions() -> dict[str, str]:
    """`{package: version}` of the imported modules (what actually runs, not what pip metadata says)."""
    return {name: str(getattr(importlib.import_module(name), "__version__", "unknown")) for name in SUPPORTED}


def _supported(version: str, spec: str) -> bool:
    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    # Local builds (2.13.0+cpu) and pre-releases of a supported line (5.3.0.dev0) are that line.
    release = Version(parsed.base_version)
    return SpecifierSet(spec).contains(release, prereleases=True)


def check_versions(installed: Mapping[str, str] | None = None) -> None:
    """Raise `UnsupportedVersionError` listing every dependency outside its supported range."""
    installed = installed_versions() if installed is None else installed
    from ._version import __version__

    bad = [(name, installed.get(name, "missing"), spec) for name, spec in SUPPORTED.items()
           if not _supported(installed.get(name, "missing"), spec)]
    if bad:
        found = ", ".join(f"{name} {version}" for name, version, _ in bad)
        wanted = ", ".join(f"{name}{spec}" for name, _, spec in bad)
        pins = " ".join(f"'{name}{spec}'" for name, _, spec in bad)
        raise UnsupportedVersionError(
            f"hetermoe: hf-hetermoe {__version__} supports {wanted}, but this environment has {found}. "
            f"Install supported versions: pip install {pins}"
        )
