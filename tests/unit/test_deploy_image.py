"""deploy/Containerfile, checked statically (no image can be built here), and the iptables
backend wrapper it installs, run for real against stand-in backends."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
WRAPPER = ROOT / "deploy" / "iptables-backend.sh"

#: Every place the code that runs in the image starts a program, and what it runs.
#: A new call site fails the test below: list its binaries here and install them.
CALL_SITES: dict[tuple[str, str], set[str]] = {
    ("enforcers/iptables.py", "Iptables.save"):
        {"iptables-save", "ip6tables-save", "ip"},
    ("enforcers/iptables.py", "Iptables._restore_errors"):
        {"iptables-restore", "ip6tables-restore", "ip"},
    ("enforcers/netns.py", "_ip"): {"ip"},
}
#: Development-only code that is in the image but never runs in a deployment.
DEV_ONLY = ("portcullis/demo/", "portcullis/brokers.py", "benchmarks/")
RUNTIME = ("policy", "topics", "watchers", "streams", "enforcers", "portcullis")
SPAWNERS = {
    "subprocess": {"run", "Popen", "call", "check_call", "check_output", "getoutput"},
    "asyncio": {"create_subprocess_exec", "create_subprocess_shell"},
    "os": {"system", "popen", "execv", "execvp", "execve", "execvpe", "spawnv", "spawnvp"},
}


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def call_sites() -> dict[tuple[str, str], list[str]]:
    """(file, function) -> the first argv items that are string literals, per call."""
    found: dict[tuple[str, str], list[str]] = {}
    for package in RUNTIME:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(DEV_ONLY):
                continue
            tree = ast.parse(path.read_text())

            def visit(node: ast.AST, scope: list[str], rel: str = rel) -> None:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                        visit(child, [*scope, child.name])
                        continue
                    if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                            and isinstance(child.func.value, ast.Name)
                            and child.func.attr in SPAWNERS.get(child.func.value.id, ())):
                        literals = found.setdefault((rel, ".".join(scope)), [])
                        arg = child.args[0] if child.args else None
                        if isinstance(arg, ast.List) and arg.elts and isinstance(
                                arg.elts[0], ast.Constant):
                            literals.append(str(arg.elts[0].value))
                    visit(child, scope)

            visit(tree, [])
    return found


def test_containerfile_has_the_instructions_an_image_needs() -> None:
    ins = instructions()
    words = [w for w, _ in ins]
    assert words[0] == "FROM" and ins[0][1].endswith("python:3.11-slim-bookworm")
    assert {"RUN", "COPY", "USER", "ENTRYPOINT"} <= set(words)
    assert ins[words.index("ENTRYPOINT")][1] == '["portcullis"]'
    user = [rest for w, rest in ins if w == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root"), "the default user must not be root"
    runs = " ".join(rest for w, rest in ins if w == "RUN")
    assert "pip install --no-cache-dir ." in runs
    copied = {shlex.split(rest)[0].strip("./") for w, rest in ins if w == "COPY"}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    assert set(packages) | {"pyproject.toml"} <= copied, "every package must be copied"


def apt_packages() -> set[str]:
    runs = " ".join(rest for w, rest in instructions() if w == "RUN")
    m = re.search(r"apt-get install ([^&]*)", runs)
    assert m, "no apt-get install in the Containerfile"
    return {w for w in m.group(1).split() if not w.startswith("-") and "=" not in w}


def test_every_subprocess_call_site_is_known() -> None:
    found = call_sites()
    assert set(found) == set(CALL_SITES), (
        "the code that runs in the image starts programs at new or removed places: "
        f"{sorted(set(found) ^ set(CALL_SITES))}; update CALL_SITES and deploy/Containerfile")
    for site, literals in found.items():
        assert set(literals) <= CALL_SITES[site], (site, literals)


def _package_of(binary: str) -> str:
    path = subprocess.run(["bash", "-c", f"command -v {shlex.quote(binary)}"],
                          capture_output=True, text=True).stdout.strip()
    assert path, f"{binary} is not installed here (./dev install installs it)"
    real = os.path.realpath(path)
    candidates = {real, real.removeprefix("/usr"), "/usr" + real}
    for candidate in candidates:
        proc = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout.split(":")[0].strip()
    raise AssertionError(f"no Debian package owns {binary} ({real})")


def test_the_image_installs_every_binary_the_code_runs() -> None:
    wanted = set().union(*CALL_SITES.values())
    # The wrapper runs each backend's own commands.
    wanted |= {f"{f}-{b}-{t}" for f in ("iptables", "ip6tables") for b in ("nft", "legacy")
               for t in ("save", "restore")}
    installed = apt_packages()
    missing = {b: _package_of(b) for b in sorted(wanted) if _package_of(b) not in installed}
    assert not missing, f"the Containerfile installs none of the packages of: {missing}"


def test_the_wrapper_is_installed_under_every_name_the_enforcer_runs() -> None:
    runs = " ".join(rest for w, rest in instructions() if w == "RUN")
    m = re.search(r"for c in ([^;]*); do", runs)
    assert m
    names = set(m.group(1).split())
    assert {"iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore"} <= names
    assert any(w == "COPY" and "iptables-backend.sh /usr/local/sbin/portcullis-iptables" in rest
               for w, rest in instructions())


@pytest.fixture
def fake_backends(tmp_path: Path) -> Path:
    """iptables-{nft,legacy}-save/-restore stand-ins: each save prints RULES_<backend> rules,
    every call logs its name and arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for family in ("iptables", "ip6tables"):
        for backend in ("nft", "legacy"):
            for tool in ("save", "restore"):
                script = bin_dir / f"{family}-{backend}-{tool}"
                script.write_text(
                    "#!/bin/sh\n"
                    f'echo "{family}-{backend}-{tool} $*" >> "$CALLS"\n'
                    + (f'i=0; while [ $i -lt "${{RULES_{backend}:-0}}" ]; do '
                       'echo "-A X -j ACCEPT"; i=$((i+1)); done\n' if tool == "save" else ""))
                script.chmod(0o755)
    for name in ("iptables-save", "iptables-restore", "ip6tables-restore"):
        (bin_dir / name).symlink_to(WRAPPER)
    return tmp_path


def _run(tmp: Path, name: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    calls = tmp / "calls"
    calls.unlink(missing_ok=True)
    proc = subprocess.run(
        [str(tmp / "bin" / name), "--noflush", "--wait"], capture_output=True, text=True,
        env={"PATH": f"{tmp / 'bin'}:/usr/bin:/bin", "CALLS": str(calls),
             "PORTCULLIS_IPTABLES_CACHE": str(tmp / "cache"), **env}, timeout=30)
    return proc, calls.read_text().splitlines() if calls.exists() else []


def test_wrapper_auto_picks_the_backend_with_more_rules_once(fake_backends: Path) -> None:
    proc, calls = _run(fake_backends, "iptables-restore", RULES_legacy="5", RULES_nft="2")
    assert proc.returncode == 0, proc.stderr
    assert calls[-1] == "iptables-legacy-restore --noflush --wait"
    assert (fake_backends / "cache").read_text().strip() == "legacy"
    # Decided once: later calls neither count again nor change their mind.
    proc, calls = _run(fake_backends, "ip6tables-restore", RULES_legacy="0", RULES_nft="9")
    assert calls == ["ip6tables-legacy-restore --noflush --wait"]


def test_wrapper_auto_prefers_nft_on_a_tie_and_obeys_the_setting(fake_backends: Path) -> None:
    _proc, calls = _run(fake_backends, "iptables-save")
    assert calls[-1] == "iptables-nft-save --noflush --wait"
    (fake_backends / "cache").unlink()
    _proc, calls = _run(fake_backends, "iptables-save", PORTCULLIS_IPTABLES_BACKEND="legacy",
                        RULES_nft="7")
    assert calls == ["iptables-legacy-save --noflush --wait"]
    proc, calls = _run(fake_backends, "iptables-save", PORTCULLIS_IPTABLES_BACKEND="bogus")
    assert proc.returncode == 2 and "expected nft, legacy or auto" in proc.stderr
    assert calls == []
