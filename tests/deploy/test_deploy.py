"""deploy/ by reading its files; `make deploy-test` (deploy/smoke.py) runs them for real.

Most checks parse compose.yaml (PyYAML resolves its ``<<`` merges). ``test_compose_config_validates``
also runs ``docker compose config`` / ``docker-compose config`` when one is installed (set
STYLEQUEUE_TEST_COMPOSE to a compose binary to pick one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent

API = "api"
INIT = "minio-init"
#: Services that hold MinIO's root login; nothing else may see it.
ROOT_HOLDERS = {"minio", INIT}
#: Environment keys whose value is a credential.
SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER|TOKEN", re.I)
#: ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error} (after dropping $$).
INTERP = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
#: What the app's MinIO policy may allow: objects, listing, multipart uploads. Nothing else.
ALLOWED_ACTIONS = {
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:ListBucket",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
    "s3:ListBucketMultipartUploads",
}
REQUIRED_ACTIONS = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"}
BUCKET_ACTIONS = {"s3:ListBucket", "s3:ListBucketMultipartUploads"}


# --- helpers ------------------------------------------------------------------------------------


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is not installed")


def interpolations(text: str) -> list[tuple[str, str | None, str]]:
    """(name, operator or None, argument) for every ${...} in one string ($$ is a literal $)."""
    return [(m[1], m[2], m[3] or "") for m in INTERP.finditer(text.replace("$$", ""))]


def file_interpolations(data: Any) -> list[tuple[str, str | None, str]]:
    """Every ${...} compose interpolates in a parsed file: its string values, not its comments."""
    return [i for s in strings(data) for i in interpolations(s)]


def required_vars(data: Any) -> set[str]:
    """Variables interpolated with no default: ${X}, ${X:?err}, ${X?err}."""
    return {name for name, op, _ in file_interpolations(data) if op in (None, "?", ":?")}


def with_defaults(value: str) -> str:
    """The value as compose would see it with no variable set (defaults only; ${X} -> '')."""

    def sub(m: re.Match[str]) -> str:
        return m[3] if m[2] in ("-", ":-") else ""

    return INTERP.sub(sub, value)


def single_required_var(value: Any) -> str | None:
    """X if ``value`` is exactly one ${X:?...} / ${X?...} / ${X} and nothing else, else None."""
    if not isinstance(value, str):
        return None
    m = INTERP.fullmatch(value.strip())
    return m[1] if m and m[2] in (None, "?", ":?") else None


def env_of(svc: dict[str, Any]) -> dict[str, Any]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def port_host_ips(svc: dict[str, Any]) -> list[str]:
    """The host address each published port binds, with defaults applied ('' = all interfaces)."""
    ips = []
    for port in svc.get("ports") or []:
        if isinstance(port, dict):
            ips.append(with_defaults(str(port.get("host_ip", ""))))
            continue
        spec = with_defaults(str(port)).split("/")[0]
        if spec.startswith("["):  # [::1]:8000:8000
            ips.append(spec[1 : spec.index("]")])
            continue
        parts = spec.split(":")
        ips.append(parts[0] if len(parts) == 3 else "")
    return ips


def parse_env_file(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def depends(svc: dict[str, Any]) -> dict[str, Any]:
    deps = svc.get("depends_on") or {}
    return {d: {} for d in deps} if isinstance(deps, list) else dict(deps)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (DEPLOY / "compose.yaml").read_text()


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    data = _yaml().safe_load(compose_text)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file((DEPLOY / ".env.example").read_text())


@pytest.fixture(scope="module")
def override() -> dict[str, Any]:
    data = _yaml().safe_load((DEPLOY / "compose.s3-public.yaml").read_text())
    assert isinstance(data, dict)
    return data


# --- the services -------------------------------------------------------------------------------


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    assert {"postgres", "redis", "minio", INIT, "migrate", API, "worker", "dispatcher"} <= set(
        compose["services"]
    )


def test_compose_works_with_compose_v1(compose: dict[str, Any]) -> None:
    # docker-compose 1.29 rejects a top-level `name:` (the project name comes from deploy/.env).
    assert "name" not in compose


def test_compose_builds_reference_existing_files(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name


def test_worker_reserves_gpus_and_scales(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works
    assert worker["stop_grace_period"]


def test_visibility_timeout_exceeds_time_limit(compose: dict[str, Any]) -> None:
    for name in (API, "worker", "dispatcher"):
        env = env_of(compose["services"][name])
        assert int(env["STYLEQUEUE_VISIBILITY_TIMEOUT_S"]) > int(env["STYLEQUEUE_TASK_TIME_LIMIT_S"])


def test_api_waits_for_migrations(compose: dict[str, Any]) -> None:
    deps = depends(compose["services"][API])
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert compose["services"]["migrate"]["command"] == ["stylequeue", "migrate"]
    assert "dispatch" in compose["services"]["dispatcher"]["command"]


# --- network exposure ---------------------------------------------------------------------------


def test_only_the_api_publishes_a_port(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert svc.get("network_mode") != "host", f"{name}: host networking exposes every port"
        if name != API:
            assert not svc.get("ports"), f"{name} publishes {svc.get('ports')}"
    assert len(compose["services"][API].get("ports") or []) == 1


def test_api_port_binds_loopback_by_default(compose: dict[str, Any]) -> None:
    ips = port_host_ips(compose["services"][API])
    assert ips and all(ip in ("127.0.0.1", "::1") for ip in ips), ips


def test_s3_public_override_binds_loopback_and_needs_its_url(override: dict[str, Any]) -> None:
    for name, svc in override["services"].items():
        if svc.get("ports"):
            assert name == "minio", name
            ips = port_host_ips(svc)
            assert all(ip in ("127.0.0.1", "::1") for ip in ips), ips
    # The API and the webhook senders sign links for the public address; nothing else changes.
    for name in (API, "webhooks"):
        endpoint = env_of(override["services"][name])["STYLEQUEUE_S3_PUBLIC_ENDPOINT_URL"]
        assert single_required_var(endpoint) == "STYLEQUEUE_S3_PUBLIC_URL"
        assert "STYLEQUEUE_S3_ENDPOINT_URL" not in env_of(override["services"][name])


# --- credentials ----------------------------------------------------------------------------------


def test_no_literal_secrets_in_compose(compose: dict[str, Any], compose_text: str) -> None:
    assert "stylequeue-secret" not in compose_text  # the old hard-coded MinIO root password
    envs = {name: env_of(svc) for name, svc in compose["services"].items()}
    envs.update({k: v for k, v in compose.items() if k.startswith("x-") and isinstance(v, dict)})
    for where, env in envs.items():
        for key, value in env.items():
            if SECRET_KEY.search(key):
                # Exactly one ${VAR:?...}: no literal, no default that would become the secret.
                assert single_required_var(value), f"{where}: {key}={value!r} is not from deploy/.env"
            for m in re.finditer(r"://([^:/@\s]+):([^@\s]+)@", str(value)):
                assert single_required_var(m[2]), f"{where}: {key} embeds a literal password"
    for name, svc in compose["services"].items():
        files = svc.get("env_file") or []
        for f in [files] if isinstance(files, str) else files:
            path = f if isinstance(f, str) else f["path"]
            assert Path(path).name == ".env", f"{name}: env_file {path} would be committed"
    # The init's mc login takes the root user/password from its environment at run time.
    script = " ".join(compose["services"][INIT]["command"])
    alias = re.search(r"mc alias set \S+ \S+ (\S+) (\S+)", script)
    assert alias, "minio-init does not log in with mc alias set"
    assert all(re.fullmatch(r'"?\$\$\{?[A-Z_]+\}?"?', arg) for arg in alias.groups()), alias.groups()


def test_app_credentials_are_not_minio_root(compose: dict[str, Any]) -> None:
    services = compose["services"]
    minio = env_of(services["minio"])
    root_vars = {
        single_required_var(minio["MINIO_ROOT_USER"]),
        single_required_var(minio["MINIO_ROOT_PASSWORD"]),
    }
    assert None not in root_vars
    for name in (API, "worker"):
        env = env_of(services[name])
        key = single_required_var(env["AWS_ACCESS_KEY_ID"])
        secret = single_required_var(env["AWS_SECRET_ACCESS_KEY"])
        assert key and secret and key != secret
        assert not {key, secret} & root_vars, f"{name} uses the MinIO root login"
    for name, svc in services.items():
        if name not in ROOT_HOLDERS:
            used = {v for s in strings(svc) for v, _, _ in interpolations(s)}
            assert not used & root_vars, f"{name} sees the MinIO root login"
    for name in ("migrate",):  # least privilege: no storage credentials at all
        assert not any(k.startswith("AWS_") for k in env_of(services[name])), name


def test_api_public_url_comes_from_env(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    env = env_of(compose["services"][API])
    assert single_required_var(env["STYLEQUEUE_PUBLIC_URL"]) == "STYLEQUEUE_PUBLIC_URL"
    assert env_example["STYLEQUEUE_PUBLIC_URL"].startswith("https://")
    assert "FORWARDED_ALLOW_IPS" in env  # uvicorn's proxy-header trust list, for the TLS proxy


def test_env_example_defines_every_required_variable(
    compose: dict[str, Any], override: dict[str, Any], env_example: dict[str, str]
) -> None:
    required = required_vars(compose) | required_vars(override)
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_APP_SECRET_KEY"} <= required
    assert required - set(env_example) == set(), "not in deploy/.env.example"
    every = {name for name, _, _ in file_interpolations([compose, override])}
    assert every - set(env_example) == set(), "undocumented in deploy/.env.example"


def test_env_example_holds_no_secret_values(env_example: dict[str, str]) -> None:
    secrets = {k: v for k, v in env_example.items() if re.search(r"PASSWORD|SECRET", k)}
    assert len(secrets) >= 3
    assert {k: v for k, v in secrets.items() if v} == {}, "placeholders only: leave secrets empty"


# --- the least-privilege MinIO user ---------------------------------------------------------------


def test_init_creates_app_user_and_policy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    init = services[INIT]
    assert with_defaults(init["image"]).startswith("minio/mc:RELEASE.")
    assert depends(init)["minio"]["condition"] == "service_healthy"
    assert init.get("restart") in ("no", None)
    script = " ".join(init["command"])
    init_env = env_of(init)
    app_env = env_of(services[API])
    # The user it creates is the one the app logs in as (same deploy/.env variables).
    user = re.search(r'mc admin user add \S+ "?\$\$\{?(\w+)\}?"? "?\$\$\{?(\w+)\}?"?', script)
    assert user, "minio-init creates no user"
    assert single_required_var(init_env[user[1]]) == single_required_var(app_env["AWS_ACCESS_KEY_ID"])
    assert single_required_var(init_env[user[2]]) == single_required_var(app_env["AWS_SECRET_ACCESS_KEY"])
    created = re.search(r"mc admin policy create \S+ (\S+) (\S+)", script)
    assert created, "minio-init creates no policy"
    attach = re.search(r'mc admin policy attach \S+ (\S+) --user "?\$\$\{?(\w+)\}?"?', script)
    assert attach and attach[1] == created[1] and attach[2] == user[1], "policy not attached to the app user"
    assert re.search(r"mc mb (--ignore-existing|-p) \S+/" + re.escape(_bucket(compose)), script)


def test_app_policy_is_least_privilege(compose: dict[str, Any]) -> None:
    bucket = _bucket(compose)
    policy = json.loads(_policy_file(compose).read_text())
    actions: set[str] = set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st
        acts = {st["Action"]} if isinstance(st["Action"], str) else set(st["Action"])
        res = {st["Resource"]} if isinstance(st["Resource"], str) else set(st["Resource"])
        assert acts <= ALLOWED_ACTIONS, acts - ALLOWED_ACTIONS
        expected = f"arn:aws:s3:::{bucket}" if acts <= BUCKET_ACTIONS else f"arn:aws:s3:::{bucket}/*"
        assert not acts & BUCKET_ACTIONS or acts <= BUCKET_ACTIONS, "mixed bucket/object statement"
        assert res == {expected}, res
        actions |= acts
    assert actions >= REQUIRED_ACTIONS


def test_app_services_wait_for_the_init(compose: dict[str, Any]) -> None:
    users = [n for n, s in compose["services"].items() if "AWS_ACCESS_KEY_ID" in env_of(s)]
    assert {API, "worker", "dispatcher"} <= set(users)
    for name in users:
        assert depends(compose["services"][name])[INIT]["condition"] == "service_completed_successfully", name


def _bucket(compose: dict[str, Any]) -> str:
    url = env_of(compose["services"][API])["STYLEQUEUE_STORAGE_URL"]
    m = re.fullmatch(r"s3://([^/]+)(/.*)?", url)
    assert m, url
    return m[1]


def _policy_file(compose: dict[str, Any]) -> Path:
    init = compose["services"][INIT]
    created = re.search(r"mc admin policy create \S+ \S+ (\S+)", " ".join(init["command"]))
    assert created
    for vol in init.get("volumes") or []:
        src, dst = (vol["source"], vol["target"]) if isinstance(vol, dict) else vol.split(":")[:2]
        if dst == created[1]:
            path: Path = (DEPLOY / src).resolve()
            assert path.is_file(), path
            return path
    raise AssertionError(f"{created[1]} is not mounted into {INIT}")


# --- optional: the real compose parser ------------------------------------------------------------


def _compose_cmd() -> list[str] | None:
    if os.environ.get("STYLEQUEUE_TEST_COMPOSE"):
        return [os.environ["STYLEQUEUE_TEST_COMPOSE"]]
    if shutil.which("docker"):
        ok = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if ok.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_validates(tmp_path: Path) -> None:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("no docker compose / docker-compose here")
    text = (DEPLOY / ".env.example").read_text()
    filled = re.sub(r"^(\w*(?:PASSWORD|SECRET|TOKEN)\w*)=$", r"\1=test-not-a-secret-\1", text, flags=re.M)
    filled = filled.replace(
        "STYLEQUEUE_S3_PUBLIC_URL=\n", "STYLEQUEUE_S3_PUBLIC_URL=https://s3.example.com\n"
    )
    (tmp_path / "full.env").write_text(filled)
    (tmp_path / "empty.env").write_text(text)
    # Shell variables override the env file: drop every one compose.yaml reads.
    names = set(parse_env_file(text))
    names |= {n for n, _, _ in interpolations((DEPLOY / "compose.yaml").read_text())}
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}
    files = ["-f", str(DEPLOY / "compose.yaml"), "-f", str(DEPLOY / "compose.s3-public.yaml")]

    def run(env_file: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cmd, "--env-file", str(tmp_path / env_file), *files, "config"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    good = run("full.env")
    assert good.returncode == 0, good.stderr
    assert "127.0.0.1" in good.stdout
    bad = run("empty.env")  # the secrets left empty in .env.example must stop compose
    assert bad.returncode != 0 and "deploy/.env" in bad.stderr, bad.stderr


# --- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfile_copies_existing_paths(dockerfile: str) -> None:
    text = (DEPLOY / dockerfile).read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        sources = line.split()[:-1]
        for src in sources:
            if src == "README.md":
                continue  # written by the lead (pyproject's readme); checked at build time
            assert (REPO / src).exists(), f"{dockerfile}: COPY {src} does not exist"


def test_api_image_installs_no_torch() -> None:
    text = (DEPLOY / "Dockerfile.api").read_text()
    reqs = (DEPLOY / "api-requirements.txt").read_text()
    assert "--no-deps" in text
    assert not re.search(r"^(torch|torchvision)\b", reqs, flags=re.M)


def docker_copy(src: Path, dest: Path, into: bool) -> None:
    """COPY as Docker does it: a folder's contents into dest; a file into dest (a ``dest/``) or as it."""
    if src.is_dir():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        return
    target = dest / src.name if into else dest
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, target)


def test_api_image_cli_has_its_commands_and_no_engine(tmp_path: Path) -> None:
    """The API image's tree (its COPY lines) with no torch: `stylequeue` starts, without `run`."""
    app = tmp_path / "app"
    for line in re.findall(r"^COPY (.+)$", (DEPLOY / "Dockerfile.api").read_text(), flags=re.M):
        *sources, dest = line.split()
        for src in sources:
            target = app / dest.removeprefix("/app").strip("/")
            assert target.is_relative_to(app), f"COPY {src} {dest}: outside /app"
            if (REPO / src).exists():
                docker_copy(REPO / src, target, into=dest.endswith("/"))
    # -S: no .pth files, so not this checkout's editable install; the packages come from app/ only
    code = (
        f"import sys; sys.path[:0] = [{str(app)!r}]; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        "sys.modules['torch'] = sys.modules['torchvision'] = None  # the image has neither\n"
        "from shared.cli import main\n"
        "for argv in (['--help'], ['api', '--help'], ['dispatch', '--help'], ['worker', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^    ([\w-]+)(?: |$)", out.stdout.split("options:")[0], flags=re.M)
    assert listed == [
        "api",
        "migrate",
        "keys",
        "tenants",
        "worker",
        "dispatch",
        "webhooks",
        "reconcile",
        "health",
        "submit",
        "status",
        "webhook-secret",
    ]


def test_worker_image_never_downloads_weights() -> None:
    text = (DEPLOY / "Dockerfile.worker").read_text()
    assert "weights fetch" not in text and "--index-url" not in text and "nvidia/cuda" not in text
    assert "STYLEQUEUE_WEIGHTS=/opt/stylequeue/weights/vgg19.pth" in text
    assert "COPY deploy/weights/ /opt/stylequeue/weights/" in text


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_images_build_on_a_chosen_base_as_non_root(dockerfile: str) -> None:
    text = (DEPLOY / dockerfile).read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.12-slim$", text, flags=re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.M)
    assert re.search(r"^USER stylequeue$", text, flags=re.M) and "HEALTHCHECK" in text
    for arg in ("PIP_FIND_LINKS", "PIP_NO_INDEX"):  # the wheelhouse make images serves
        assert re.search(rf"^ARG {arg}=$", text, flags=re.M), arg


def test_image_requirements_are_pinned_and_match_the_project() -> None:
    import tomllib

    pins = {}
    for line in (DEPLOY / "api-requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{line}: not pinned"
            pins[re.sub(r"\[.*\]", "", name).lower()] = version
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    service = {re.split(r"[<>=\[ ]", d, maxsplit=1)[0].lower() for d in deps} - {
        "torch",
        "torchvision",
        "numpy",
    }
    assert set(pins) == service
    worker = (DEPLOY / "worker-requirements.txt").read_text()
    assert "-r api-requirements.txt" in worker and re.search(r"^numpy==", worker, flags=re.M)
    assert "torchvision" not in re.sub(r"#.*", "", worker)


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".docker-build", "demo-out", "tests"} <= ignored
    copied = {
        m
        for df in ("Dockerfile.api", "Dockerfile.worker")
        for m in re.findall(r"^COPY (\S+)", (DEPLOY / df).read_text(), flags=re.M)
    }
    assert not {c.split("/")[0] for c in copied} & ignored, "a COPY source is ignored"


def test_every_image_is_pinned_and_overridable(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        image = svc["image"]
        var = INTERP.fullmatch(image)
        assert var and var[2] == ":-", f"{name}: image {image!r} is not ${{VAR:-default}}"
        default = var[3]
        if not default.startswith("stylequeue-"):
            assert ":" in default and not default.endswith(":latest"), f"{name}: {default} is not pinned"


def test_long_running_services_have_their_own_health_checks(compose: dict[str, Any]) -> None:
    image_checked = {API}  # Dockerfile.api's HEALTHCHECK probes the API's port
    for name, svc in compose["services"].items():
        if svc.get("restart") == "no" or svc.get("profiles"):
            continue
        check = svc.get("healthcheck")
        assert check or name in image_checked, f"{name} has no health check"
        if check and svc.get("image", "").endswith("stylequeue-api}") and name != API:
            assert check.get("disable") or name in " ".join(check["test"]), f"{name} inherits the API's check"
    assert compose["services"]["migrate"]["healthcheck"] == {"disable": True}
    assert compose["services"]["worker"]["healthcheck"]["test"][-2:] == ["health", "worker"]


def test_cpu_compose_changes_only_the_worker(compose: dict[str, Any], tmp_path: Path) -> None:
    sys.path.insert(0, str(DEPLOY))
    try:
        import compose_cpu
    finally:
        sys.path.remove(str(DEPLOY))
    cpu = compose_cpu.cpu_compose(compose)
    worker = cpu["services"]["worker"]
    assert "deploy" not in worker and "build" not in worker
    assert with_defaults(worker["image"]) == "stylequeue-worker-cpu"
    assert env_of(worker)["STYLEQUEUE_DEVICE"] == "cpu"
    assert {k: v for k, v in cpu["services"].items() if k != "worker"} == {
        k: v for k, v in compose["services"].items() if k != "worker"
    }
    written = _yaml().safe_load(compose_cpu.write(tmp_path / "c.yaml").read_text())
    assert written["services"]["worker"] == worker
