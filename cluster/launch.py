"""`metaspec cluster up|down|status|deploy`: thin wrappers over Ray's own commands for one cluster launcher YAML.

Each action is a list of commands (argv lists, never a shell line built here); `--dry-run` prints them instead:

>>> [shlex.join(c.argv) for c in commands("down", ClusterArgs("cluster/aws.yaml", yes=True))]
['ray down cluster/aws.yaml --yes']
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CLUSTER_YAML = Path(__file__).resolve().parent / "aws.yaml"
DEFAULT_SERVE_YAML = Path(__file__).resolve().parent / "serve.yaml"
TOKEN_FILE = Path("~/.ray/auth_token")   # Ray's default token path; aws.yaml copies it to every node
SECRETS_DIR = Path("~/.metaspec/secrets")   # redis_password, server.crt, server.key; aws.yaml copies them too
TLS_NAME = "metaspec"                    # the name a generated self-signed certificate is for (--tls-server-name)
REMOTE_SERVE_YAML = "~/metaspec-serve.yaml"
ACTIONS = ("up", "down", "status", "deploy")


@dataclass(frozen=True)
class ClusterArgs:
    cluster_yaml: str = str(DEFAULT_CLUSTER_YAML)   # Ray cluster launcher config
    yes: bool = False                               # answer Ray's confirmation prompts
    serve_yaml: str = str(DEFAULT_SERVE_YAML)       # deploy: the Serve config to deploy
    address: str | None = None                      # deploy: a reachable dashboard (http://head:8265) to
                                                    # `serve deploy` to directly; None = run it on the head node


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    quiet: bool = False   # its stdout goes nowhere (it prints a secret)

    def line(self) -> str:
        return shlex.join(self.argv) + (" > /dev/null" if self.quiet else "")


def commands(action: str, args: ClusterArgs, token_file: Path = TOKEN_FILE,
             secrets_dir: Path = SECRETS_DIR) -> list[Command]:
    """The commands one action runs, in order."""
    yes = ("--yes",) if args.yes else ()
    y = args.cluster_yaml
    if action == "up":
        token = [] if token_file.expanduser().exists() else [Command(("ray", "get-auth-token", "--generate"), True)]
        return token + secret_commands(secrets_dir.expanduser()) + [Command(("ray", "up", y, *yes))]
    if action == "down":
        return [Command(("ray", "down", y, *yes))]
    if action == "status":
        return [Command(("ray", "exec", y, "ray status && serve status"))]
    if action == "deploy":
        if args.address:
            return [Command(("serve", "deploy", args.serve_yaml, "--address", args.address))]
        return [Command(("ray", "rsync-up", y, args.serve_yaml, REMOTE_SERVE_YAML)),
                Command(("ray", "exec", y, f"serve deploy {REMOTE_SERVE_YAML}"))]
    raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")


def secret_commands(root: Path) -> list[Command]:
    """What creates the secrets aws.yaml mounts, for those missing, in a directory only the user can enter: the
    tables' Redis password and a self-signed TLS certificate for the name TLS_NAME (put your own server.crt and
    server.key there to use a real one). Nothing is printed."""
    password, crt, key = root / "redis_password", root / "server.crt", root / "server.key"
    out = [] if root.is_dir() else [Command(("mkdir", "-p", "-m", "700", str(root)))]
    if not password.exists():
        out += [Command(("openssl", "rand", "-out", str(password), "-hex", "32"), True),
                Command(("chmod", "600", str(password)))]
    if not (crt.exists() and key.exists()):
        out += [Command(("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                         "-nodes", "-days", "365", "-subj", f"/CN={TLS_NAME}", "-addext",
                         f"subjectAltName=DNS:{TLS_NAME}", "-keyout", str(key), "-out", str(crt)), True),
                Command(("chmod", "600", str(key)))]
    return out


def checkout_problem(cluster_yaml: str, cwd: Path) -> str | None:
    """Why `ray up` from `cwd` would sync the wrong folder: the YAML mounts "." (the checkout) relative to the
    directory it runs in, which must then be a metaspec checkout. None when fine."""
    import yaml

    mounts = (yaml.safe_load(Path(cluster_yaml).read_text()) or {}).get("file_mounts") or {}
    if "." in mounts.values() and not (cwd / "pyproject.toml").exists():
        return (f"{cluster_yaml} syncs '.' to every node: run this from the metaspec repository root "
                f"({cwd} has no pyproject.toml)")
    return None


def run(action: str, args: ClusterArgs, dry_run: bool = False) -> int:
    """Print (dry run) or run the action's commands; the first failure's exit code stops the rest."""
    if action == "up" and (problem := checkout_problem(args.cluster_yaml, Path.cwd())):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    for cmd in commands(action, args):
        print(("" if dry_run else "$ ") + cmd.line(), flush=True)
        if dry_run:
            continue
        try:
            code = subprocess.run(cmd.argv, stdout=subprocess.DEVNULL if cmd.quiet else None).returncode
        except FileNotFoundError as exc:   # `ray`/`serve` not on PATH
            print(f"error: {exc}", file=sys.stderr)
            return 127
        if code:
            return code
    return 0
