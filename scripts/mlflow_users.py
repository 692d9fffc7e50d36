#!/usr/bin/env python
"""Users and their permissions on a team's MLflow store (scripts/mlflow_server.sh, authenticated).

    scripts/mlflow_users.py add NAME [--experiment EXP --role member] [--password-file FILE]
    scripts/mlflow_users.py grant NAME EXP --role viewer|member|manager|none
    scripts/mlflow_users.py password NAME [--password-file FILE]
    scripts/mlflow_users.py show NAME
    scripts/mlflow_users.py remove NAME

Roles on an experiment: viewer = READ (sees its runs), member = EDIT (also logs runs into it),
manager = MANAGE (also deletes it and grants others), none = NO_PERMISSIONS. Every logged-in user
reads every experiment (the server's default permission, READ) and may create experiments of
their own, which they manage; `grant` creates EXP if it does not exist yet, so that members can
log into a team experiment (l2lab's default name is DATA-MODEL, e.g. digits-mlp).

The server: --tracking-uri URI, else $MLFLOW_TRACKING_URI. The admin's login: --admin-password-file
FILE (the file scripts/mlflow_server.sh was given; user --admin-user, default admin), else
$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD. A password is never an argument (every
user of the machine could read it with ps): a new password comes from --password-file FILE (its
first line, at least 12 characters), else a random one is made and printed once, to hand over.

Each command is one or two calls of MLflow's auth REST API (shown with --verbose), e.g.
    POST /api/2.0/mlflow/users/create                {"username", "password"}
    POST /api/3.0/mlflow/users/permissions/grant     {"username", "resource_type": "experiment",
                                                      "resource_id": EXPERIMENT_ID, "permission"}
Exit status: 0 done, 1 the server refused (the message says why), 2 a bad argument.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROLES = {"viewer": "READ", "member": "EDIT", "manager": "MANAGE", "none": "NO_PERMISSIONS"}
VERBOSE = [False]


class Refused(Exception):
    """The server said no; the message says why (``status``: the HTTP status, if any)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def read_password(path: str) -> str:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SystemExit(f"mlflow_users.py: {path}: {e.strerror}") from None
    password = lines[0].strip() if lines else ""
    if len(password) < 12:
        raise SystemExit(f"mlflow_users.py: {path}: the password (its first line) must have at "
                         "least 12 characters (MLflow's rule)")
    return password


class Server:
    def __init__(self, uri: str, user: str, password: str) -> None:
        self.uri = uri.rstrip("/")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.auth = f"Basic {token}"
        self.user = user

    def call(self, method: str, path: str, body: dict | None = None, **query: str) -> dict:
        url = self.uri + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": self.auth, "Content-Type": "application/json"})
        if VERBOSE[0]:  # the body may hold a password: only its keys are shown
            print(f"  {method} {path} {sorted(body) if body else query or ''}", file=sys.stderr)
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            raise Refused(self._why(e, method, path, body), e.code) from None
        except (urllib.error.URLError, OSError) as e:
            raise Refused(f"no MLflow server answers at {self.uri} "
                          f"({getattr(e, 'reason', e)})") from None
        return json.loads(text) if text.strip() else {}

    def _why(self, e: urllib.error.HTTPError, method: str, path: str, body: dict | None) -> str:
        text = e.read().decode(errors="replace")
        try:
            detail = json.loads(text).get("message", text)
        except ValueError:
            detail = text
        detail = " ".join(detail.split())[:300]
        if e.code == 401:
            return (f"the server at {self.uri} refuses the login of {self.user!r} (HTTP 401): "
                    "give the admin's password with --admin-password-file FILE, or set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an admin's login")
        if e.code == 403:
            return (f"{self.user!r} may not do this on {self.uri} (HTTP 403: {detail}); "
                    "users and permissions are the admin's to change")
        if "already exists" in detail and path.endswith("/users/create"):
            return (f"user {(body or {}).get('username')!r} already exists (to give it a new "
                    "password: mlflow_users.py password NAME)")
        return f"{method} {path}: HTTP {e.code}: {detail}"

    def experiment_id(self, name: str, create: bool) -> str:
        try:
            return self.call("GET", "/api/2.0/mlflow/experiments/get-by-name",
                             experiment_name=name)["experiment"]["experiment_id"]
        except Refused as e:
            if not create or e.status != 404:
                raise
        exp_id = self.call("POST", "/api/2.0/mlflow/experiments/create", {"name": name})
        print(f"created experiment {name!r} (id {exp_id['experiment_id']})")
        return exp_id["experiment_id"]

    def grant(self, user: str, experiment: str, role: str) -> None:
        exp_id = self.experiment_id(experiment, create=True)
        self.call("POST", "/api/3.0/mlflow/users/permissions/grant",
                  {"username": user, "resource_type": "experiment", "resource_id": exp_id,
                   "permission": ROLES[role]})
        print(f"{user!r} is {role} ({ROLES[role]}) of experiment {experiment!r}")


def new_password(path: str | None) -> tuple[str, bool]:
    if path:
        return read_password(path), False
    return secrets.token_urlsafe(18), True


def run(args: argparse.Namespace, server: Server) -> None:
    if args.command == "add":
        password, made = new_password(args.password_file)
        server.call("POST", "/api/2.0/mlflow/users/create",
                    {"username": args.name, "password": password})
        print(f"added user {args.name!r}" + (f"; password (shown once): {password}" if made
                                             else f" with the password in {args.password_file}"))
        if args.experiment:
            server.grant(args.name, args.experiment, args.role)
    elif args.command == "grant":
        server.grant(args.name, args.experiment, args.role)
    elif args.command == "password":
        password, made = new_password(args.password_file)
        server.call("PATCH", "/api/2.0/mlflow/users/update-password",
                    {"username": args.name, "password": password})
        print(f"new password of {args.name!r}" + (f" (shown once): {password}" if made
                                                   else f": the one in {args.password_file}"))
    elif args.command == "remove":
        server.call("DELETE", "/api/2.0/mlflow/users/delete", {"username": args.name})
        print(f"removed user {args.name!r}")
    elif args.command == "show":
        user = server.call("GET", "/api/2.0/mlflow/users/get", username=args.name)["user"]
        perms = server.call("GET", "/api/3.0/mlflow/users/permissions/list", username=args.name)
        print(f"{user['username']}{' (admin)' if user.get('is_admin') else ''}")
        for p in perms.get("permissions", []):
            print("  " + ", ".join(f"{k}={v}" for k, v in p.items()))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlflow_users.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="the server (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--admin-password-file", help="the admin's password (its first line)")
    p.add_argument("--admin-user", default=None,
                   help="the admin's name with --admin-password-file (default admin)")
    p.add_argument("--verbose", action="store_true", help="show the REST calls (no passwords)")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="a new user (and, with --experiment, a role on it)")
    add.add_argument("name")
    add.add_argument("--password-file", help="the new user's password (default: a random one)")
    add.add_argument("--experiment", help="an experiment to give the user a role on")
    add.add_argument("--role", choices=ROLES, default="member", help="default member (EDIT)")
    grant = sub.add_parser("grant", help="a user's role on an experiment (created if missing)")
    grant.add_argument("name")
    grant.add_argument("experiment")
    grant.add_argument("--role", choices=ROLES, required=True)
    pw = sub.add_parser("password", help="set a user's password")
    pw.add_argument("name")
    pw.add_argument("--password-file", help="the new password (default: a random one)")
    sub.add_parser("show", help="a user and their permissions").add_argument("name")
    sub.add_parser("remove", help="delete a user").add_argument("name")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    VERBOSE[0] = args.verbose
    if not args.tracking_uri:
        print("mlflow_users.py: no server: give --tracking-uri http://HOST:PORT or set "
              "MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    if args.admin_password_file:
        user, password = args.admin_user or "admin", read_password(args.admin_password_file)
    else:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if not (user and password):
            print("mlflow_users.py: no admin login: give --admin-password-file FILE (the file "
                  "scripts/mlflow_server.sh was given), or set MLFLOW_TRACKING_USERNAME and "
                  "MLFLOW_TRACKING_PASSWORD to an admin's login", file=sys.stderr)
            return 2
    if args.command == "add" and args.role != "member" and not args.experiment:
        print("mlflow_users.py: --role needs --experiment", file=sys.stderr)
        return 2
    try:
        run(args, Server(args.tracking_uri, user, password))
    except Refused as e:
        print(f"mlflow_users.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
