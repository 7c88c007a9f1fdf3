"""Fetching source packages from the package registries into a cache folder, installing nothing.

An npm package is fetched with `npm pack NAME@VERSION` and unpacked (its files under `package/`);
a Debian package with `apt-get download NAME` and unpacked with `dpkg-deb -x` (its files under
their installed paths, e.g. `usr/share/wordnet`). Each lands in `{cache}/{npm|deb}/{name}` and is
marked complete with a `source.json` ({"registry", "name", "version"}) once unpacked, so a
finished fetch is reused and an interrupted one is redone. Nothing is installed system-wide.
"""

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass

MARKER = "source.json"


class FetchError(RuntimeError):
    """A package that could not be fetched; the message says which, how, and what to do."""


@dataclass(frozen=True)
class FetchedPackage:
    """An unpacked package: its root folder (npm: the tarball's `package/`; deb: `/`)."""

    registry: str
    name: str
    version: str
    root: str


def _cached(folder: str, registry: str, name: str) -> FetchedPackage:
    with open(os.path.join(folder, MARKER), encoding="utf-8") as marker:
        version = json.load(marker)["version"]
    root = os.path.join(folder, "package") if registry == "npm" else folder
    return FetchedPackage(registry, name, version, root)


def _run(command, cwd: str, what: str) -> str:
    if shutil.which(command[0]) is None:
        raise FetchError(f"{what}: `{command[0]}` is not installed (it is needed to fetch from "
                         f"the {'npm' if command[0] == 'npm' else 'Debian'} registry)")
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        hint = (" (run `apt-get update` first if the package is unknown)"
                if command[0] == "apt-get" else "")
        raise FetchError(f"{what}: `{' '.join(command)}` failed with status {result.returncode}"
                         f"{hint}: {result.stderr.strip()[-500:]}")
    return result.stdout


def _fetch(cache: str, registry: str, name: str, unpack) -> FetchedPackage:
    folder = os.path.join(cache, registry, name)
    if os.path.isfile(os.path.join(folder, MARKER)):
        return _cached(folder, registry, name)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{name}.", dir=os.path.dirname(folder))
    try:
        unpacked = os.path.join(work, "unpacked")
        os.makedirs(unpacked)
        version = unpack(work, unpacked)
        with open(os.path.join(unpacked, MARKER), "w", encoding="utf-8") as marker:
            json.dump({"registry": registry, "name": name, "version": version}, marker)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(unpacked, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _cached(folder, registry, name)


def _check_members(archive: tarfile.TarFile, tarball: str) -> None:
    for member in archive.getmembers():
        if member.issym() or member.islnk() or os.path.isabs(member.name) \
                or ".." in member.name.split("/"):
            raise FetchError(f"{tarball}: member {member.name!r} is a link or leaves the folder")


def npm_package(cache: str, name: str, version: str) -> FetchedPackage:
    """`npm pack name@version`, unpacked into the cache (module docstring)."""

    def unpack(work: str, unpacked: str) -> str:
        what = f"npm package {name}@{version}"
        output = _run(["npm", "pack", f"{name}@{version}", "--silent"], work, what)
        tarball = os.path.join(work, output.strip().splitlines()[-1])
        with tarfile.open(tarball) as archive:
            # The "data" filter refuses links and paths outside the folder (Python 3.10.12+);
            # older Pythons check the member names themselves.
            if hasattr(tarfile, "data_filter"):
                archive.extractall(unpacked, filter="data")
            else:
                _check_members(archive, tarball)
                archive.extractall(unpacked)
        return version

    return _fetch(cache, "npm", name, unpack)


def debian_package(cache: str, name: str) -> FetchedPackage:
    """`apt-get download name` (the candidate version), unpacked into the cache."""

    def unpack(work: str, unpacked: str) -> str:
        what = f"Debian package {name}"
        _run(["apt-get", "download", name], work, what)
        debs = [entry for entry in os.listdir(work) if entry.endswith(".deb")]
        if len(debs) != 1:
            raise FetchError(f"{what}: apt-get download left {debs}, expected one .deb")
        deb = os.path.join(work, debs[0])
        _run(["dpkg-deb", "-x", deb, unpacked], work, what)
        return _run(["dpkg-deb", "-f", deb, "Version"], work, what).strip()

    return _fetch(cache, "deb", name, unpack)
