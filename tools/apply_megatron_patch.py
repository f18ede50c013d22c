#!/usr/bin/env python3
"""Apply megatron-usp's patches to a Megatron-LM checkout.

    python tools/apply_megatron_patch.py MEGATRON_DIR            # apply (idempotent)
    python tools/apply_megatron_patch.py MEGATRON_DIR --check    # report only, change nothing

The checkout's version comes from its git tag (``core_vX.Y.Z`` at HEAD) or else from
``megatron/core/package_info.py`` (MAJOR/MINOR/PATCH, read as text, never imported); ``--version`` overrides both.
Patch sets live in ``patches/core_vX.Y.Z/*.patch`` (``--patches-dir`` to use another folder); each patch of a set
touches its own files. An exact version match is used first, then the nearest patch release of the same
MAJOR.MINOR (said so loudly: run ``--check`` first). Patches go in with ``git apply`` (no git repository needed).

Exit codes:
  0  applied now, or already applied (with --check: already applied)
  1  --check only: not applied yet, applies cleanly
  2  usage error: not a Megatron-LM directory, version unknown, git missing
  3  no patch set for this version (the available ones are listed)
  4  conflict: a patch neither applies nor is applied (the failing file and hunk are shown); nothing was changed
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

EXIT_OK, EXIT_APPLICABLE, EXIT_USAGE, EXIT_NO_PATCH, EXIT_CONFLICT = 0, 1, 2, 3, 4
DEFAULT_PATCHES_DIR = Path(__file__).resolve().parent.parent / "patches"
PACKAGE_INFO = Path("megatron/core/package_info.py")
Version = Tuple[int, int, int]


class PatchToolError(Exception):
    """A problem the user must fix; carries the exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def format_version(version: Version) -> str:
    return ".".join(map(str, version))


def parse_version(text: str) -> Version:
    """``"0.16.1"`` or ``"core_v0.16.1"`` -> ``(0, 16, 1)``."""
    match = re.fullmatch(r"(?:core_v)?(\d+)\.(\d+)\.(\d+)", text.strip())
    if not match:
        raise PatchToolError(f"version {text!r} is not MAJOR.MINOR.PATCH (e.g. 0.16.1)", EXIT_USAGE)
    return tuple(int(part) for part in match.groups())  # type: ignore[return-value]


def version_from_package_info(megatron_dir: Path) -> Optional[Version]:
    """MAJOR/MINOR/PATCH assignments of megatron/core/package_info.py, or None when absent."""
    path = megatron_dir / PACKAGE_INFO
    if not path.is_file():
        return None
    text = path.read_text()
    parts = []
    for name in ("MAJOR", "MINOR", "PATCH"):
        match = re.search(rf"^{name}\s*=\s*(\d+)\s*$", text, re.MULTILINE)
        if not match:
            raise PatchToolError(f"{path} has no line '{name} = <number>': pass --version X.Y.Z", EXIT_USAGE)
        parts.append(int(match.group(1)))
    return tuple(parts)  # type: ignore[return-value]


def version_from_git_tag(megatron_dir: Path) -> Optional[Version]:
    """The ``core_vX.Y.Z`` tag at HEAD of the checkout's own repository, or None."""
    if not (megatron_dir / ".git").exists():  # a plain copy, or a folder inside some other repository
        return None
    result = subprocess.run(
        ["git", "-C", str(megatron_dir), "tag", "--points-at", "HEAD"], capture_output=True, text=True
    )
    tags = [tag for tag in result.stdout.split() if re.fullmatch(r"core_v\d+\.\d+\.\d+", tag)]
    return parse_version(sorted(tags)[-1]) if result.returncode == 0 and tags else None


def available_patch_sets(patches_dir: Path) -> List[Version]:
    if not patches_dir.is_dir():
        raise PatchToolError(f"patches folder {patches_dir} does not exist: pass --patches-dir", EXIT_USAGE)
    versions = []
    for entry in patches_dir.iterdir():
        if entry.is_dir() and re.fullmatch(r"core_v\d+\.\d+\.\d+", entry.name) and any(entry.glob("*.patch")):
            versions.append(parse_version(entry.name))
    return sorted(versions)


def choose_patch_set(candidates: List[Tuple[str, Version]], available: List[Version]) -> Tuple[Version, str]:
    """Pick a patch set for the detected versions (in order of trust). Returns (version, why)."""
    for source, version in candidates:
        if version in available:
            return version, f"exact match of {source} {format_version(version)}"
    for source, version in candidates:
        same_minor = [v for v in available if v[:2] == version[:2]]
        if same_minor:
            nearest = min(same_minor, key=lambda v: (abs(v[2] - version[2]), -v[2]))
            return nearest, (
                f"NO patch set for {source} {format_version(version)}; using core_v{format_version(nearest)}, the "
                f"nearest patch release of {version[0]}.{version[1]} (Megatron-LM's tags and package_info can differ "
                "by a patch release)"
            )
    detected = ", ".join(f"{source} {format_version(version)}" for source, version in candidates)
    listed = ", ".join(f"core_v{format_version(v)}" for v in available) or "none"
    raise PatchToolError(
        f"no patch set for this checkout ({detected}). Available: {listed}. Check out one of those tags "
        "(git checkout core_vX.Y.Z), or pass --version X.Y.Z to try a set on this checkout with --check "
        "(the patches only touch pretrain_gpt.py and the file that constructs GPTModel).",
        EXIT_NO_PATCH,
    )


@dataclass
class GitApply:
    """Runs ``git apply`` on one checkout, also when it is a plain folder or sits inside another repository."""

    megatron_dir: Path

    def __post_init__(self) -> None:
        if shutil.which("git") is None:
            raise PatchToolError("git is not on PATH: install git (the tool uses 'git apply')", EXIT_USAGE)
        self.cwd, self.prefix = self.megatron_dir, None
        result = subprocess.run(
            ["git", "-C", str(self.megatron_dir), "rev-parse", "--show-toplevel"], capture_output=True, text=True
        )
        if result.returncode == 0:
            top = Path(result.stdout.strip()).resolve()
            if top != self.megatron_dir.resolve():  # git apply takes paths from the repository's top
                self.cwd, self.prefix = top, self.megatron_dir.resolve().relative_to(top).as_posix()

    def run(self, patch: Path, *flags: str) -> subprocess.CompletedProcess:
        directory = [f"--directory={self.prefix}"] if self.prefix else []
        command = ["git", "apply", *directory, *flags, str(patch.resolve())]
        return subprocess.run(command, cwd=self.cwd, capture_output=True, text=True)

    def state(self, patch: Path) -> str:
        """``applied``, ``applicable`` or ``conflict``."""
        if self.run(patch, "--reverse", "--check").returncode == 0:
            return "applied"
        return "applicable" if self.run(patch, "--check").returncode == 0 else "conflict"


def explain_conflict(patch: Path, git_stderr: str) -> str:
    """Which file and hunk failed (from git's 'patch failed: FILE:LINE'), and the lines that hunk adds."""
    lines = [f"  {patch.name} does not apply and is not applied:"]
    lines += [f"    git: {line}" for line in git_stderr.strip().splitlines()]
    for path, line in re.findall(r"patch failed: (.+):(\d+)", git_stderr):
        hunk = _hunk_at(patch, path, int(line))
        if hunk:
            lines.append(f"    the hunk of {path} at line {line} adds:")
            lines += [f"      {added}" for added in hunk]
    lines.append(
        "    what to do: check out the tag this patch set is for, or make these edits by hand (each added line "
        "carries 'usp' in its name), then run with --check again"
    )
    return "\n".join(lines)


def _hunk_at(patch: Path, path: str, old_start: int) -> List[str]:
    current_file, in_hunk, added = None, False, []
    for line in patch.read_text().splitlines():
        if line.startswith("+++ "):
            current_file, in_hunk = line[4:].split("/", 1)[-1], False
        elif line.startswith("@@"):
            match = re.match(r"@@ -(\d+)", line)
            in_hunk = current_file == path and match is not None and int(match.group(1)) == old_start
        elif in_hunk and line.startswith("+"):
            added.append(line[1:])
        elif in_hunk and not line.startswith((" ", "-", "\\")):
            in_hunk = False
    return added


def run_tool(megatron_dir: Path, patches_dir: Path, check: bool, version_override: Optional[str]) -> int:
    if not megatron_dir.is_dir():
        raise PatchToolError(f"{megatron_dir} is not a directory: pass a Megatron-LM checkout", EXIT_USAGE)
    if not (megatron_dir / "pretrain_gpt.py").is_file():
        raise PatchToolError(
            f"{megatron_dir} has no pretrain_gpt.py: pass the top folder of a Megatron-LM checkout "
            "(git clone https://github.com/NVIDIA/Megatron-LM), not the megatron-core pip package",
            EXIT_USAGE,
        )
    candidates: List[Tuple[str, Version]] = []
    if version_override:
        candidates.append(("--version", parse_version(version_override)))
    else:
        tag = version_from_git_tag(megatron_dir)
        if tag:
            candidates.append(("git tag", tag))
        package = version_from_package_info(megatron_dir)
        if package:
            candidates.append((str(PACKAGE_INFO), package))
    if not candidates:
        raise PatchToolError(
            f"cannot tell the Megatron-LM version of {megatron_dir}: no core_vX.Y.Z tag at HEAD and no {PACKAGE_INFO};"
            " pass --version X.Y.Z",
            EXIT_USAGE,
        )
    version, why = choose_patch_set(candidates, available_patch_sets(patches_dir))
    set_dir = patches_dir / f"core_v{format_version(version)}"
    print(f"patch set {set_dir} ({why})")
    git = GitApply(megatron_dir)
    patches = sorted(set_dir.glob("*.patch"))
    states = {patch: git.state(patch) for patch in patches}
    for patch, state in states.items():
        print(f"  {patch.name}: {state}")
    conflicts = [patch for patch, state in states.items() if state == "conflict"]
    if conflicts:
        for patch in conflicts:
            print(explain_conflict(patch, git.run(patch, "--check", "--verbose").stderr))
        print("conflict: nothing was changed")
        return EXIT_CONFLICT
    pending = [patch for patch, state in states.items() if state == "applicable"]
    if not pending:
        print("already applied: nothing to do")
        return EXIT_OK
    if check:
        print(f"applicable: {len(pending)} patch(es) would apply cleanly (run without --check to apply)")
        return EXIT_APPLICABLE
    for patch in pending:
        result = git.run(patch)
        if result.returncode != 0:  # --check passed a moment ago, so this is unexpected
            raise PatchToolError(f"git apply {patch} failed:\n{result.stderr}", EXIT_CONFLICT)
        print(f"  applied {patch.name}")
    print("applied")
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("Exit codes:"):],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("megatron_dir", type=Path, metavar="MEGATRON_DIR", help="top folder of a Megatron-LM checkout")
    parser.add_argument("--check", action="store_true", help="report applicable / applied / conflict; change nothing")
    parser.add_argument("--patches-dir", type=Path, default=DEFAULT_PATCHES_DIR,
                        help=f"folder of core_vX.Y.Z/*.patch sets (default {DEFAULT_PATCHES_DIR})")
    parser.add_argument("--version", dest="version_override", metavar="X.Y.Z",
                        help="use this Megatron-LM version instead of detecting it")
    options = parser.parse_args(argv)
    try:
        return run_tool(options.megatron_dir, options.patches_dir, options.check, options.version_override)
    except PatchToolError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
