"""Build stylequeue's container images with no registry and no network inside the builds.

    python3 deploy/images.py build api worker-cpu worker-gpu   # `make images`
    python3 deploy/images.py base-image                        # `make base-image`
    python3 deploy/images.py wheels cpu                        # `make wheels`
    python3 deploy/images.py standins                          # stand-ins for postgres, redis, S3, flower

How: ``wheels`` fills ``.docker-build/wheels/py3XX/`` on the host with ``pip download`` (so the host's
own pip configuration applies: its index, find-links, CA bundle and proxy), for the base image's
Python and platform. ``build`` serves that folder over HTTP on 127.0.0.1 for the length of the build
and builds with ``--network host`` and ``PIP_NO_INDEX=1``: every package of every image comes from
the wheelhouse, never from a hard-coded index, and no certificate or proxy setting enters an image.

The base is ``BASE_IMAGE`` (default ``python:3.12-slim``). Where it is neither present nor pullable
(no registry), ``base-image`` makes one: ``debootstrap`` of Debian 12 from the distribution mirror
apt already uses, ``docker import``, then Debian's Python 3.11 in a venv (deploy/standins/python).
Only the standard library here: it runs with the host's python3 before anything is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".docker-build"
STANDINS = REPO / "deploy" / "standins"

DEFAULT_BASE = os.environ.get("BASE_IMAGE") or "python:3.12-slim"
LOCAL_DEBIAN = "stylequeue/debian:bookworm"
LOCAL_PYTHON = "stylequeue/python:3.11-bookworm"
# torch per worker flavour: pinned builds, overridable (e.g. TORCH_CPU_SPEC=torch==2.13.0+cpu with
# PIP_EXTRA_INDEX_URL naming a CPU wheel index where the host's pip has none).
TORCH = {
    "cpu": os.environ.get("TORCH_CPU_SPEC") or "torch==2.13.0+cpu",
    "cuda": os.environ.get("TORCH_CUDA_SPEC") or "torch==2.14.1",
}
# What the stand-ins install with pip (the rest come from Debian's packages).
STANDIN_PIP = {"s3": ["moto[server]==5.2.5"], "flower": ["flower==2.0.1", "celery[redis]==5.7.0"]}
#: image name -> (Dockerfile, tag, torch flavour or None)
IMAGES = {
    "api": ("deploy/Dockerfile.api", "stylequeue-api", None),
    "worker-cpu": ("deploy/Dockerfile.worker", "stylequeue-worker-cpu", "cpu"),
    "worker-gpu": ("deploy/Dockerfile.worker", "stylequeue-worker", "cuda"),
}
#: stand-in -> (folder under deploy/standins, tag); each stands in for the image compose.yaml names.
STANDIN_IMAGES = {
    "postgres": ("postgres", "stylequeue/standin-postgres:15"),
    "redis": ("redis", "stylequeue/standin-redis:7.0"),
    "s3": ("s3", "stylequeue/standin-s3:moto-5.2.5"),
    "flower": ("flower", "stylequeue/standin-flower:2.0.1"),
}


def log(message: str) -> None:
    print(f"[images] {message}", flush=True)


def run(cmd: Sequence[str], *, timeout: float | None = None, env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(list(cmd), check=True, timeout=timeout, env=env)


def output(cmd: Sequence[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


# --- the daemon -------------------------------------------------------------------------------------

_STARTED: list[subprocess.Popen[bytes]] = []  # the dockerd this process started, if it did


def daemon_up() -> bool:
    try:
        return output(["docker", "info"], timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_daemon() -> None:
    """Start dockerd here when it is installed but not running (Debian's init script stops at
    ``ulimit -n 1048576`` where the hard limit is lower, so not through it)."""
    if daemon_up():
        return
    if not shutil.which("dockerd") or os.geteuid() != 0:
        raise SystemExit("the docker daemon is not running (and cannot be started from here)")
    WORK.mkdir(exist_ok=True)
    log("starting dockerd (log: .docker-build/dockerd.log)")
    with open(WORK / "dockerd.log", "ab") as out:
        _STARTED[:] = [
            subprocess.Popen(
                ["dockerd", "--pidfile", str(WORK / "dockerd.pid")],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        ]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if daemon_up():
            return
        time.sleep(1)
    raise SystemExit("dockerd did not come up within 90 s: see .docker-build/dockerd.log")


def stop_started_daemon() -> None:
    """Stop the dockerd that ensure_daemon started (it stops its containerd too), if any."""
    for proc in _STARTED:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log("stopped the dockerd this run started")
    _STARTED.clear()


def have_image(name: str) -> bool:
    return output(["docker", "image", "inspect", name], timeout=60).returncode == 0


def registry_reachable(probe: str | None = None) -> bool:
    """Whether images can be pulled: ``probe`` (default: the base) is present or a pull succeeds."""
    return _pullable(probe or DEFAULT_BASE)


@functools.cache
def _pullable(probe: str) -> bool:
    if have_image(probe):
        return True
    try:
        pulled = output(["docker", "pull", "-q", probe], timeout=600)
    except subprocess.TimeoutExpired:
        return False
    if pulled.returncode != 0:
        log(f"cannot pull {probe}: {pulled.stderr.strip().splitlines()[-1:]}")
    return pulled.returncode == 0


# --- the base image -----------------------------------------------------------------------------


def debian_mirror() -> str:
    found = output(["apt-get", "indextargets", "--format", "$(REPO_URI)", "Codename: bookworm"])
    uris = sorted({u for u in found.stdout.split() if u.startswith("http")})
    return uris[0] if uris else "http://deb.debian.org/debian/"


def build_debian() -> None:
    if have_image(LOCAL_DEBIAN):
        return
    if not shutil.which("debootstrap"):
        raise SystemExit("no registry and no debootstrap: apt-get install debootstrap")
    rootfs = WORK / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    cmd = ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror()]
    log("$ " + " ".join(cmd) + "  (log: .docker-build/debootstrap.log)")
    with open(WORK / "debootstrap.log", "wb") as out:
        subprocess.run(cmd, check=True, timeout=1800, stdout=out, stderr=subprocess.STDOUT)
    for junk in ("var/lib/apt/lists", "var/cache/apt/archives"):
        for path in (rootfs / junk).glob("*"):
            if path.is_file():
                path.unlink()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(
        ["docker", "import", "--change", 'CMD ["bash"]', "-", LOCAL_DEBIAN], stdin=tar.stdout, check=True
    )
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


def build_base_image() -> str:
    """The local Python base: Debian 12 from debootstrap plus Debian's Python (no registry needed)."""
    if not have_image(LOCAL_PYTHON):
        build_debian()
        docker_build(STANDINS / "python", LOCAL_PYTHON, {"DEBIAN_IMAGE": LOCAL_DEBIAN})
    return LOCAL_PYTHON


def resolve_base(base: str | None = None) -> str:
    """``base`` (or BASE_IMAGE) when present or pullable, else the local base (built if missing)."""
    wanted = base or DEFAULT_BASE
    if registry_reachable(wanted):
        return wanted
    log(f"{wanted} cannot be pulled here: using the local base {LOCAL_PYTHON}")
    return build_base_image()


def python_version(image: str) -> str:
    """'3.11' for an image whose ``python`` is 3.11: the wheelhouse is for that version."""
    code = "import sys; print('%d.%d' % sys.version_info[:2])"
    found = output(["docker", "run", "--rm", "--network", "none", image, "python", "-c", code])
    if found.returncode != 0:
        raise SystemExit(f"{image} has no working `python`: {found.stderr.strip()}")
    return found.stdout.strip()


# --- the wheelhouse -----------------------------------------------------------------------------


def platforms() -> list[str]:
    """The manylinux tags a Debian 12 (glibc 2.36) image on this machine's architecture takes."""
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(36, 16, -1)]
    return [*tags, f"manylinux2014_{arch}", f"linux_{arch}"]


def wheel_sets() -> dict[str, list[str]]:
    """Folder -> pip requirement arguments (each folder is a find-links of its own)."""
    reqs = REPO / "deploy" / "worker-requirements.txt"
    # `pip install /app` builds the project: its build backend comes from the wheelhouse too.
    found = re.search(r"^requires = \[(.*?)\]", (REPO / "pyproject.toml").read_text(), flags=re.M | re.S)
    build = re.findall(r'"([^"]+)"', found[1]) if found else ["setuptools"]
    return {
        "common": ["-r", str(reqs), *build],
        "standins": [spec for specs in STANDIN_PIP.values() for spec in specs],
        "torch-cpu": [TORCH["cpu"]],
        "torch-cuda": [TORCH["cuda"]],
    }


def pip_download(folder: Path, py: str, args: Sequence[str]) -> None:
    plat = [flag for tag in platforms() for flag in ("--platform", tag)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(folder)]
    cmd += ["--only-binary=:all:", "--python-version", py, "--implementation", "cp", *plat, *args]
    run(cmd, timeout=3600)


def missing_in(image: str, house: Path, folders: Sequence[str], args: Sequence[str]) -> str | None:
    """Resolve ``args`` inside ``image`` from the wheelhouse alone (pip's dry run, no network): the
    first requirement it cannot satisfy, or None. pip on the host evaluates environment markers for
    its own Python (3.11.7, say), so what a 3.11.2 image also needs is found here."""
    links = [flag for f in folders for flag in ("--find-links", f"/wheels/{f}")]
    reqs = [a.replace(str(REPO / "deploy"), "/deploy") for a in args]
    cmd = ["docker", "run", "--rm", "--network", "none", "-v", f"{house}:/wheels:ro"]
    cmd += ["-v", f"{REPO / 'deploy'}:/deploy:ro", image, "pip", "install", "--dry-run", "--quiet"]
    found = output([*cmd, "--no-index", *links, *reqs], timeout=600)
    if found.returncode == 0:
        return None
    for line in found.stderr.splitlines():
        if "No matching distribution found for " in line:
            return line.split("No matching distribution found for ", 1)[1].split(";")[0].strip()
    raise SystemExit(f"pip in {image} cannot resolve {' '.join(args)}:\n{found.stderr}")


def fill_wheels(image: str, sets: Sequence[str]) -> Path:
    """Download each requirement set for ``image``'s Python into .docker-build/wheels/py3XX/<set>/,
    then resolve it inside ``image`` and fetch what that finds missing, until nothing is (once per
    content of the requirements: a stamp records what each folder holds)."""
    py = python_version(image)
    house = WORK / "wheels" / f"py{py.replace('.', '')}"
    for name in sets:
        args = wheel_sets()[name]
        texts = [Path(a).read_text() if a.endswith(".txt") else a for a in args]
        texts += [(REPO / "deploy" / "api-requirements.txt").read_text(), image, *platforms()]
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
        folder, stamp = house / name, house / f"{name}.stamp"
        if stamp.is_file() and stamp.read_text() == digest:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        pip_download(folder, py, args)
        together = [name] if name in ("common", "standins") else ["common", name]
        for _ in range(20):
            missing = missing_in(image, house, together, args)
            if missing is None:
                break
            log(f"{image} also needs {missing}")
            pip_download(folder, py, [missing])
        else:
            raise SystemExit(f"the wheelhouse for {image} still lacks packages after 20 rounds")
        stamp.write_text(digest)
    return house


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass


# The wheelhouse's port: fixed, because the legacy builder keys its layer cache on build arguments
# (PIP_FIND_LINKS holds the URL), so a new port each run would rebuild every layer. A free one if taken.
WHEELHOUSE_PORT = int(os.environ.get("STYLEQUEUE_WHEELHOUSE_PORT") or 47621)


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """``folder`` over HTTP on 127.0.0.1 while the block runs: the builds' only package source."""
    handler = functools.partial(_Quiet, directory=str(folder))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELHOUSE_PORT), handler)
    except OSError:
        log(f"port {WHEELHOUSE_PORT} is taken: serving the wheelhouse on another (no layer cache)")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- builds -------------------------------------------------------------------------------------


@functools.cache
def buildkit() -> bool:
    """BuildKit where the CLI has buildx; the legacy builder otherwise (Debian 12's docker.io)."""
    return output(["docker", "buildx", "version"], timeout=30).returncode == 0


def docker_build(
    context: Path, tag: str, args: dict[str, str], dockerfile: str | None = None, host_network: bool = False
) -> None:
    cmd = ["docker", "build", "--force-rm", "-t", tag]
    if dockerfile:
        cmd += ["-f", str(REPO / dockerfile)]
    if host_network:  # the wheelhouse listens on the host's loopback
        cmd += ["--network", "host"]
    for key, value in args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    env = {**os.environ, "DOCKER_BUILDKIT": "1" if buildkit() else "0"}
    started = time.monotonic()
    run([*cmd, str(context)], timeout=3600, env=env)
    log(f"{tag}: built in {time.monotonic() - started:.0f} s, {image_size_mb(tag):.0f} MB")


def image_size_mb(tag: str) -> float:
    found = output(["docker", "image", "inspect", "-f", "{{.Size}}", tag])
    return int(found.stdout.strip() or 0) / 1e6


def stage_weights() -> None:
    """WEIGHTS_FILE (when set) into deploy/weights/vgg19.pth, which the worker images copy."""
    source = os.environ.get("WEIGHTS_FILE")
    if source:
        if not Path(source).is_file():
            raise SystemExit(f"WEIGHTS_FILE={source} is not a file")
        shutil.copyfile(source, REPO / "deploy" / "weights" / "vgg19.pth")
        log(f"baking {source} into the worker images")


def build_images(names: Sequence[str], base: str | None = None) -> str:
    """Build the project images ``names`` (keys of IMAGES) on the resolved base; returns the base."""
    ensure_daemon()
    base = resolve_base(base)
    flavours = [IMAGES[n][2] for n in names if IMAGES[n][2]]
    house = fill_wheels(base, ["common", *(f"torch-{f}" for f in flavours)])
    stage_weights()
    with serve(house) as url:
        for name in names:
            dockerfile, tag, flavour = IMAGES[name]
            links = [f"{url}/common/"] + ([f"{url}/torch-{flavour}/"] if flavour else [])
            args = {"BASE_IMAGE": base, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": " ".join(links)}
            if flavour:
                args |= {"TORCH_SPEC": TORCH[flavour], "DEVICE": "cpu" if flavour == "cpu" else "auto"}
            docker_build(REPO, tag, args, dockerfile, host_network=True)
    return base


def build_standins() -> dict[str, str]:
    """The stand-in images (Debian packages, moto for S3): stand-in -> tag."""
    ensure_daemon()
    base = build_base_image()
    house = fill_wheels(base, ["standins"])
    with serve(house) as url:
        for name, (folder, tag) in STANDIN_IMAGES.items():
            if have_image(tag):
                continue
            args = {"DEBIAN_IMAGE": LOCAL_DEBIAN, "PYTHON_IMAGE": base}
            if name in STANDIN_PIP:
                args |= {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": f"{url}/standins/"}
                args["PIP_SPECS"] = " ".join(STANDIN_PIP[name])
            docker_build(STANDINS / folder, tag, args, host_network=True)
    return {name: tag for name, (_, tag) in STANDIN_IMAGES.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="step", required=True)
    build = sub.add_parser("build", help="build project images")
    build.add_argument("names", nargs="*", help=f"some of {', '.join(IMAGES)} (default: all)")
    build.add_argument("--base", help=f"base image (default BASE_IMAGE or {DEFAULT_BASE})")
    sub.add_parser("base-image", help=f"make {LOCAL_PYTHON} with debootstrap (no registry)")
    wheels = sub.add_parser("wheels", help="fill the wheelhouse for the base image's Python")
    wheels.add_argument("flavours", nargs="*", help="cpu and/or cuda (default: both)")
    sub.add_parser("standins", help="stand-ins for postgres, redis, S3 (moto) and flower")
    args = parser.parse_args(argv)
    started = time.monotonic()
    unknown = set(getattr(args, "names", [])) - set(IMAGES)
    unknown |= set(getattr(args, "flavours", [])) - set(TORCH)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    if args.step == "build":
        build_images(args.names or list(IMAGES), args.base)
    elif args.step == "base-image":
        ensure_daemon()
        log(f"local base: {build_base_image()}")
    elif args.step == "wheels":
        ensure_daemon()
        sets = ["common", *(f"torch-{f}" for f in args.flavours or TORCH)]
        log(f"wheelhouse: {fill_wheels(resolve_base(), sets)}")
    else:
        log(f"stand-ins: {build_standins()}")
    log(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
