"""Fails when the virtualenv holds a package the lock does not pin, or at another version: the lock is stale
(pyproject.toml gained a dependency) and a fresh clone would install something CI never tested."""
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

IGNORED = {"tunedeck", "pip", "setuptools", "wheel"}


def locked(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = Version(next(iter(req.specifier)).version)
    return pins


def main(lock_file: str) -> int:
    pins = locked(Path(lock_file))
    problems = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in IGNORED:
            continue
        installed = Version(dist.version)
        if name not in pins:
            problems.append(f"{name} {installed} is installed but not in the lock")
        elif installed.public != pins[name].public:
            problems.append(f"{name} {installed} is installed, the lock says {pins[name]}")
    if problems:
        print(f"{lock_file} does not match this install:\n  " + "\n  ".join(sorted(problems)) +
              "\nRun scripts/lock.sh and commit requirements/lock.txt (a deliberate upgrade).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
