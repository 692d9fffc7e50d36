"""Where runs go, and whether this job may log in there: checked before anything heavy loads.

The tracking URI (:func:`resolve_uri`) and the check that a tracking server answers and accepts
this job's login (:func:`probe_server`). Standard library only, so that a single run's bad store
or bad credentials are reported before torch, Lightning and MLflow are imported; ``schema`` and
``tracking`` re-export these names.

A team's server (``scripts/mlflow_server.sh`` beyond loopback) runs MLflow's basic-auth app. Jobs
log in with MLflow's own variables, ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``,
which MLflow's client reads from the environment. They stay in the environment: never in
``tracking.uri`` (it is logged with every run), a config, an override or a tag.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from l2lab.base import ConfigError

ENV_URI = "MLFLOW_TRACKING_URI"
ENV_USER = "MLFLOW_TRACKING_USERNAME"
ENV_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
PROBE_TIMEOUT_S = 10.0
#: Ray calls the function this variable names on every ``ray.init`` runtime env (see
#: :func:`ray_runtime_env`).
RAY_HOOK = "RAY_RUNTIME_ENV_HOOK"
#: An endpoint every logged-in user may call (the answer is filtered by their permissions).
_PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"


def resolve_uri(uri: str | None = None, cwd: Path | None = None) -> str:
    """The tracking URI: an explicit one, else ``$MLFLOW_TRACKING_URI``, else the local SQLite
    store under ``<cwd>/mlruns``; SQLite paths are made absolute so that jobs in any folder
    agree. A URI with a login in it (``http://user:pw@host``) is refused: the URI is logged."""
    uri = uri or os.environ.get(ENV_URI) or "sqlite:///mlruns/mlflow.db"
    base = (cwd or Path.cwd()).resolve()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path.startswith("/"):
            uri = "sqlite:///" + str(base / path)
    elif "://" not in uri and not uri.startswith("sqlite:"):
        raise ConfigError(
            f"tracking.uri must be an MLflow tracking URI (sqlite:///path/to/mlflow.db, "
            f"http://host:port, ...), got {uri!r}. (MLflow >= 3.13 refuses the file store.)"
        )
    elif uri.startswith(("http://", "https://")) and "@" in urllib.parse.urlsplit(uri).netloc:
        parts = urllib.parse.urlsplit(uri)
        bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        raise ConfigError(  # the login is not echoed: this message may end up in a log
            f"tracking.uri (or {ENV_URI}) carries a login (http://USER:PASSWORD@...); the URI is "
            f"logged with every run's params and config, so it must not. Use {bare} and export "
            f"{ENV_USER} and {ENV_PASSWORD} in the environment of every job instead."
        )
    return uri


def credentials() -> tuple[str, str] | None:
    """``(username, password)`` from MLflow's variables when both are set (MLflow's client
    sends a login only then)."""
    user, password = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    return (user, password) if user and password else None


def _login_error(uri: str, status: int) -> ConfigError:
    creds = credentials()
    if status == 403:
        return ConfigError(
            f"tracking.uri: the MLflow server at {uri} let user {os.environ.get(ENV_USER)!r} "
            f"({ENV_USER}) in but refuses it access (HTTP 403). Ask the store's admin for a "
            f"permission on your experiments (scripts/mlflow_users.py grant), or set "
            f"{ENV_USER} and {ENV_PASSWORD} to another member's login."
        )
    if creds is None:
        unset = [v for v in (ENV_USER, ENV_PASSWORD) if not os.environ.get(v)]
        return ConfigError(
            f"tracking.uri: the MLflow server at {uri} asks for a login (HTTP {status}) and "
            f"{' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set. Export "
            f"{ENV_USER} and {ENV_PASSWORD} (your login on that server; its admin adds users "
            f"with scripts/mlflow_users.py) in the environment of every job, never in "
            f"tracking.uri, a config or an override, where they would be logged."
        )
    return ConfigError(
        f"tracking.uri: the MLflow server at {uri} refuses the login of user {creds[0]!r} "
        f"(HTTP {status}: no such user, or a wrong password). Check {ENV_USER} and "
        f"{ENV_PASSWORD} in the environment of this job; the store's admin can reset a password "
        f"(scripts/mlflow_users.py password NAME)."
    )


def permission_denied(exc: BaseException, experiment_id: str) -> ConfigError | None:
    """MLflow's 403 on creating a run, as one paragraph naming the login (``None``: another
    error)."""
    if getattr(exc, "error_code", None) != "PERMISSION_DENIED":
        return None
    user = os.environ.get(ENV_USER)
    return ConfigError(
        f"experiment_name: the MLflow server lets user {user!r} ({ENV_USER}) read experiment id "
        f"{experiment_id} but not write into it (HTTP 403). Ask the store's admin to make you a "
        f"member of it (scripts/mlflow_users.py grant {user or 'NAME'} EXPERIMENT --role member), "
        f"or log into an experiment_name of your own (you manage the experiments you create)."
    )


def _tls_context():
    """HTTPS as MLflow's client does it: its CA bundle, client certificate and insecure switch
    (``MLFLOW_TRACKING_SERVER_CERT_PATH``, ``..._CLIENT_CERT_PATH``, ``..._INSECURE_TLS``)."""
    import ssl

    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # noqa: S323 (the user asked for it)
    ctx = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))
    if cert := os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
        ctx.load_cert_chain(cert)
    return ctx


def _get(url: str, timeout: float, auth: bool) -> None:
    request = urllib.request.Request(url)
    if auth and (creds := credentials()):
        token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = _tls_context() if url.startswith("https://") else None
    with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:  # noqa: S310
        resp.read(64)


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail within seconds when an HTTP tracking server does not answer (MLflow's own client
    would retry for minutes), or refuses this job's login (MLflow's client would fail with a 401
    traceback at the first call, or in the middle of a run)."""
    try:
        try:
            _get(uri.rstrip("/") + "/health", timeout, auth=False)
        except urllib.error.HTTPError:
            pass  # it answered: a server is there (perhaps behind a proxy without /health)
        try:
            _get(uri.rstrip("/") + _PROBE_PATH, timeout, auth=True)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise _login_error(uri, e.code) from None
            # anything else (a proxy that serves only some paths, ...) is MLflow's to report
    except ConfigError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(
            f"tracking.uri: no MLflow tracking server answers at {uri} ({reason}). Start one "
            f"(mlflow server --host 127.0.0.1 --port PORT --backend-store-uri ...), or unset "
            f"{ENV_URI} / tracking.uri to use the local store sqlite:///<cwd>/mlruns/mlflow.db."
        ) from None


def ray_runtime_env(runtime_env: dict | None) -> dict:
    """Ray's ``RAY_RUNTIME_ENV_HOOK``: the sweep's ``ray.init`` gives every Ray worker this
    process's login variables, so jobs on other nodes log in too, although the login is in no
    config (a ``runtime_env`` in ``hydra.launcher.ray.init`` would be written to ``.hydra/``)."""
    runtime_env = dict(runtime_env or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    for name in (ENV_USER, ENV_PASSWORD):
        if os.environ.get(name) and name not in env_vars:
            env_vars[name] = os.environ[name]
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env
