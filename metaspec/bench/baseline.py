"""`--baseline-ref GITREF` in `metaspec bench serve`: the same in-process load on another commit's engine.

The commit's subpackages are extracted with `git archive` into a temporary folder laid out as the installed
package maps them (`metaspec/workers` <- `workers/`, ...), and `baseline_driver.py` runs there in a subprocess
that stays up for the whole bench, so its loads interleave with ours. Prompts, models, dtype, threads and
max_tokens are ours; the driver sends back raw traces, measured here with the same functions as ours.

>>> with Baseline("84ce1a3", setup) as old:
...     traces, wall_s, peak_mb = old.run("ar", concurrency=16)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from metaspec.bench.load import Trace

SUBPACKAGES = ("workers", "selector", "cluster", "protocol", "deploy")   # package-dir in pyproject.toml
DRIVER = Path(__file__).resolve().parent / "baseline_driver.py"


def repo_root() -> Path:
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent)
    return Path(out.stdout.strip())


def resolve(ref: str) -> str:
    out = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], capture_output=True, text=True,
                         cwd=repo_root())
    if out.returncode != 0:
        raise ValueError(f"--baseline-ref {ref!r} is not a commit here: {out.stderr.strip()}")
    return out.stdout.strip()


def extract(commit: str, into: Path) -> Path:
    """`into/src` = the commit's subpackages; `into/root/metaspec/<name>` links to each. Returns `into/root`."""
    src, pkg = into / "src", into / "root" / "metaspec"
    src.mkdir(parents=True)
    pkg.mkdir(parents=True)
    listed = subprocess.run(["git", "ls-tree", "--name-only", commit], capture_output=True, text=True, check=True,
                            cwd=repo_root()).stdout.split()
    names = [n for n in SUBPACKAGES if n in listed]
    archive = subprocess.run(["git", "archive", commit, *names], capture_output=True, check=True, cwd=repo_root())
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    (pkg / "__init__.py").write_text("")
    for name in names:
        (pkg / name).symlink_to(src / name, target_is_directory=True)
    return into / "root"


class Baseline:
    """The other commit's engine in a long-lived subprocess (see baseline_driver.py)."""

    def __init__(self, ref: str, setup: dict) -> None:
        self.ref, self.commit = ref, resolve(ref)
        self.tmp = Path(tempfile.mkdtemp(prefix="metaspec-baseline-"))
        root = extract(self.commit, self.tmp)
        self.log = open(self.tmp / "driver.log", "w+")
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), str(root)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._send(setup)
        self.methods: list[str] = []

    def _send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            self.log.seek(0)
            tail = self.log.read()[-2000:]
            raise RuntimeError(f"baseline driver ({self.ref}) exited {self.proc.poll()}:\n{tail}")
        return json.loads(line)

    def warm(self, methods: list[str]) -> list[str]:
        self._send({"warm": methods})
        self.methods = self._reply()["methods"]
        return self.methods

    def run(self, method: str | None, concurrency: int) -> tuple[list[Trace], float, float | None]:
        self._send({"method": method, "concurrency": concurrency})
        r = self._reply()
        return [Trace(**t) for t in r["traces"]], r["wall_s"], r["peak_rss_mb"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Baseline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
