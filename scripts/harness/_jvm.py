"""JVM brokers (Kafka, Pulsar): fetch a pom's runtime classpath once, build ``java`` command lines.

Private helper of ``kafka.py`` and ``pulsar.py``, not a broker module. Standard library only.
The jars land in ``core.CACHE_DIR / "jars" / "<name>-<sha256 of the pom, 12 chars>"``; Maven
downloads into a temporary sibling folder that is renamed into place only when complete, so a half
download is never used and editing a pom fetches a fresh classpath.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from . import core

#: Poms and config templates of the JVM brokers.
JVM_DIR = Path(__file__).resolve().with_name("jvm")
#: One log4j2 config for every JVM broker: all output to stdout, which ``core.spawn`` logs.
LOG4J_CONFIG = JVM_DIR / "log4j2.properties"
#: Pinned: Maven 3.8.7's default dependency plugin predates ``-DincludeScope`` fixes.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
#: Marker written inside a jar folder once every jar is in it.
COMPLETE = ".complete"
#: Fetching Pulsar's 270+ jars from a cold Maven cache takes minutes.
FETCH_TIMEOUT_S = 1800.0
#: How often to tell the user a fetch is still going.
PROGRESS_EVERY_S = 15.0
#: JVM flags shared by the brokers: small heap, quick start, die rather than limp on OOM.
TEST_JVM_FLAGS = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.net.preferIPv4Stack=true",
    "-Djava.awt.headless=true",
)


def java() -> str:
    """The ``java`` binary (Java 17 is the default here)."""
    home = os.environ.get("JAVA_HOME")
    candidates = [Path(home) / "bin" / "java"] if home else []
    found = shutil.which("java")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.exists():
            return str(c)
    raise core.HarnessError("no java on PATH: install a JDK 17 (apt-get install openjdk-17-jre-headless)")


def jar_dir(name: str, pom: Path) -> Path:
    """Where the jars of ``pom`` live in the cache (whether fetched yet or not)."""
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    return core.CACHE_DIR / "jars" / f"{name}-{digest}"


def fetch_jars(name: str, pom: Path) -> Path:
    """Return the folder holding the runtime classpath of ``pom``, downloading it on first use."""
    dest = jar_dir(name, pom)
    if (dest / COMPLETE).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # One fetch at a time (the CLI starts brokers in parallel threads; kafka and kafka3 share a
    # classpath, and concurrent mvn runs on one ~/.m2 can corrupt it).
    with open(dest.parent / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / COMPLETE).exists():  # whoever held the lock may have fetched it
            _fetch(name, pom, dest)
    return dest


def _fetch(name: str, pom: Path, dest: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise core.HarnessError(
            f"{name}: mvn not found; install Maven (apt-get install maven) to fetch the jars"
        )
    if dest.exists():  # left by a crash before the marker: never trust it
        shutil.rmtree(dest, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    mvn_log = tmp.with_name(tmp.name + ".mvn.log")
    cmd = [
        mvn, "-B", "-q", "-f", str(pom), f"{DEPENDENCY_PLUGIN}:copy-dependencies",
        f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
    ]  # fmt: skip
    core.say(f"{name}: fetching jars from Maven Central into {dest} (once; this can take minutes)")
    start = time.monotonic()
    try:
        with open(mvn_log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            next_note = start + PROGRESS_EVERY_S
            while proc.poll() is None:
                now = time.monotonic()
                if now - start > FETCH_TIMEOUT_S:
                    proc.kill()
                    proc.wait()
                    raise core.HarnessError(
                        f"{name}: mvn did not finish in {FETCH_TIMEOUT_S:.0f}s:\n{core.log_tail(mvn_log)}"
                    )
                if now >= next_note:
                    core.say(f"{name}: still fetching ({now - start:.0f}s)")
                    next_note = now + PROGRESS_EVERY_S
                time.sleep(0.5)
        if proc.returncode != 0:
            raise core.HarnessError(
                f"{name}: mvn failed with {proc.returncode} fetching {pom.name}:\n{core.log_tail(mvn_log)}"
            )
        jars = _jars(tmp)
        if not jars:
            raise core.HarnessError(f"{name}: mvn copied no jars for {pom.name}:\n{core.log_tail(mvn_log)}")
        (tmp / COMPLETE).write_text(f"{len(jars)} jars from {pom.name}\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / COMPLETE).exists():  # not a concurrent fetch that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        mvn_log.unlink(missing_ok=True)
    size_mb = sum(j.stat().st_size for j in _jars(dest)) / 2**20
    core.say(f"{name}: {len(_jars(dest))} jars, {size_mb:.0f} MiB, in {time.monotonic() - start:.0f}s")


def _jars(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jar"))


#: Flags that buy a quicker start with slower steady-state throughput (C1 only, serial GC).
QUICK_START_FLAGS = frozenset({"-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"})


def _benchmark() -> bool:
    """``INFEED_JVM_BENCHMARK=1``: run the brokers with the JVM's default JIT and GC."""
    return os.environ.get("INFEED_JVM_BENCHMARK", "").strip().lower() in ("1", "true", "yes")


def java_cmd(
    jars: Path, main: str, args: Sequence[str], *, flags: Sequence[str] = TEST_JVM_FLAGS
) -> list[str]:
    """``java FLAGS -cp "JARS/*" MAIN ARGS`` with the harness's log4j2 config."""
    return [
        java(),
        *(f for f in flags if not (_benchmark() and f in QUICK_START_FLAGS)),
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        "-cp",
        f"{jars}/*",  # expanded by java itself
        main,
        *args,
    ]


def write_properties(path: Path, props: dict[str, object]) -> None:
    lines = [f"{k}={v}" for k, v in props.items()]
    path.write_text("# written by scripts/harness\n" + "\n".join(lines) + "\n")
