"""What must not travel with a job or be written down: secret-looking variables and credentials in URIs.

A Ray job's `runtime_env` is shown by the Ray dashboard and `ray job list`, and each node's
runtime-env agent logs it; a URI is written to MLflow params and tags, checkpoint metadata and
printed lines. So credentials reach the nodes the cluster's own way (the nodes' environment,
instance or pod identity, a credentials file named by path), never as a job variable unless the
user says so by name, and a URI that carries credentials (`https://user:token@host`,
`s3://KEY:SECRET@bucket`) is refused where it enters (`uri_credentials_problem`), so nothing
downstream has to redact it.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional
from urllib.parse import parse_qsl, urlsplit

# a name holding one of these anywhere looks like a secret: AWS_SECRET_ACCESS_KEY, HF_TOKEN, DB_PASSWORD
SECRET_WORDS: tuple[str, ...] = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE", "APIKEY",
                                 "SIGNATURE")
# ... or one of these as a whole `_`-separated part: AWS_ACCESS_KEY_ID, API_KEY, MY_PASS, AWS_SESSION_X
SECRET_PARTS: frozenset[str] = frozenset({"KEY", "KEYS", "PASS", "SESSION", "SIG", "COOKIE"})
# a name ending in one of these holds a path to credentials, not the credentials (AWS_SHARED_CREDENTIALS_FILE)
PATH_PARTS: frozenset[str] = frozenset({"FILE", "PATH", "DIR"})
SHIP_FLAG = "--ship-secret"


def looks_secret(name: str) -> bool:
    """Whether the variable `name` looks like it holds a secret (a path to one does not)."""
    upper = name.upper()
    parts = [part for part in re.split(r"[^A-Z0-9]+", upper) if part]
    if parts and parts[-1] in PATH_PARTS:
        return False
    return any(word in upper for word in SECRET_WORDS) or any(part in SECRET_PARTS for part in parts)


def uri_credentials_problem(uri: object) -> Optional[str]:
    """Why `uri` must not be used because it carries credentials (user info or a secret-looking query
    parameter), or None. Plain paths and URIs without credentials pass."""
    if not isinstance(uri, str) or "://" not in uri:
        return None
    try:
        parts = urlsplit(uri.strip())
    except ValueError:
        return None  # not a URI this check can read; the field's own check reports it
    where = f"{parts.scheme}://{parts.hostname or ''}"
    if "@" in parts.netloc:
        return (f"{where}... carries credentials before '@'; they would be written to MLflow, checkpoints and "
                f"logs: give them to every node the cluster's way instead (environment variables such as "
                f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or MLFLOW_TRACKING_USERNAME/PASSWORD, instance or pod "
                f"identity, or a credentials file named by path)")
    secret_params = [key for key, _ in parse_qsl(parts.query, keep_blank_values=True) if looks_secret(key)]
    if secret_params:
        return (f"{where}... carries credentials in its query ({', '.join(secret_params)}); they would be written "
                f"to MLflow, checkpoints and logs: give them to every node the cluster's way instead")
    return None


def credential_problems(fields: Mapping[str, object]) -> list[tuple[str, str]]:
    """(field, reason) for each of `fields` (field name -> URI or None) whose URI carries credentials."""
    return [(name, problem) for name, value in fields.items()
            if (problem := uri_credentials_problem(value)) is not None]


class ShipRefused(ValueError):
    """A variable that `study submit` will not put into the job; the message names the flag."""


def shipped_env(environ: Mapping[str, str], names: list[str], secret_names: list[str]) -> dict[str, str]:
    """The variables of `environ` the user asked the job to carry: `names` (`--env`) and `secret_names`
    (`--ship-secret`, which allows a secret-looking name). ShipRefused, naming the flag, for a name that is
    not set, a secret-looking name given only to `--env`, or a value that is a URI with credentials."""
    allowed = set(secret_names)
    env: dict[str, str] = {}
    for name, flag in [(n, "--env") for n in names] + [(n, SHIP_FLAG) for n in secret_names]:
        if name not in environ:
            raise ShipRefused(f"{flag} {name}: not set in this environment")
        if looks_secret(name) and name not in allowed:
            raise ShipRefused(f"{flag} {name}: looks like a secret; a job's variables are shown by the Ray "
                              f"dashboard and `ray job list` and logged on every node, so credentials come from "
                              f"the nodes' own environment or a credentials file; to ship it anyway, name it "
                              f"with {SHIP_FLAG} {name}")
        problem = uri_credentials_problem(environ[name])
        if problem is not None:
            raise ShipRefused(f"{flag} {name}: {problem}")
        env[name] = environ[name]
    return env
