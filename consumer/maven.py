"""Fetching a local service's jars from Maven Central: its pom.xml, and running ``mvn`` on it.

The local Kafka (:mod:`consumer.kafka.launcher`) and the local Schema Registry
(:mod:`consumer.registry`) each have a pom under ``deploy/`` whose only job is to resolve
their artifacts; ``mvn`` copies or unpacks them where the caller wants them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from consumer.errors import RtcbusError

_SOURCE_ROOT = Path(__file__).resolve().parents[1]
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def find_pom(name: str, packaged: Path) -> Path:
    """The pom of ``deploy/<name>/pom.xml``: in a source checkout there, else ``packaged``
    (where a wheel carries it, see ``pyproject.toml``).

    If neither exists, the source checkout's path, for :func:`run_mvn` to name as missing.
    """
    source = _SOURCE_ROOT / "deploy" / name / "pom.xml"
    if not source.is_file() and packaged.is_file():
        return packaged
    return source


def run_mvn(pom: Path, arguments: list[str], what: str, error: type[RtcbusError]) -> None:
    """Run ``mvn -q -B -f <pom> <arguments>`` to fetch ``what`` (e.g. ``"Kafka 4.1.0"``).

    Raises:
        error: mvn is not on PATH, ``pom`` is missing, or mvn failed (with its first
            ``[ERROR]`` line, else its standard error or exit status).
    """
    mvn = shutil.which("mvn")
    if mvn is None:
        raise error(f"Maven (mvn) is not on PATH, to fetch {what} from Maven Central")
    if not pom.is_file():
        raise error(f"{pom} is missing (it comes with a source checkout)")
    result = subprocess.run([mvn, "-q", "-B", "-f", str(pom), *arguments], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        # Maven colours its output even in batch mode (-B) on some versions.
        lines = (_ANSI_ESCAPE.sub("", line) for line in result.stdout.splitlines())
        errors = [line.removeprefix("[ERROR]").strip() for line in lines if line.startswith("[ERROR]")]
        reason = errors[0] if errors else result.stderr.strip() or f"exit status {result.returncode}"
        raise error(f"mvn could not resolve {what}: {reason[:500]}")
