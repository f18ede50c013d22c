"""tools/apply_megatron_patch.py on small fake Megatron-LM checkouts made here (no network, no Megatron-LM)."""
import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "apply_megatron_patch.py"

PRETRAIN = "".join(f"line {i}\n" for i in range(1, 21)) + "    pretrain(\n        extra_args_provider=None,\n    )\n"
PATCHED = PRETRAIN.replace("line 3\n", "line 3\nimport usp_glue\n").replace(
    "extra_args_provider=None", "extra_args_provider=usp_glue.provider"
)


def package_info(major: int, minor: int, patch: int) -> str:
    return f'# fake\n\nMAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = ""\nVERSION = (MAJOR, MINOR)\n'


def make_checkout(root: Path, version=(0, 16, 1), pretrain: str = PRETRAIN) -> Path:
    (root / "megatron" / "core").mkdir(parents=True)
    (root / "megatron" / "core" / "package_info.py").write_text(package_info(*version))
    (root / "pretrain_gpt.py").write_text(pretrain)
    return root


def make_patches(root: Path, versions=("0.16.1", "0.19.0")) -> Path:
    diff = "".join(difflib.unified_diff(
        PRETRAIN.splitlines(True), PATCHED.splitlines(True), "a/pretrain_gpt.py", "b/pretrain_gpt.py"
    ))
    for version in versions:
        (root / f"core_v{version}").mkdir(parents=True)
        (root / f"core_v{version}" / "0001-usp.patch").write_text(diff)
    return root


def git(*args, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def run_tool(checkout: Path, patches: Path, *flags: str):
    result = subprocess.run([sys.executable, str(TOOL), str(checkout), "--patches-dir", str(patches), *flags],
                            capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture
def setup(tmp_path):
    return make_checkout(tmp_path / "Megatron-LM"), make_patches(tmp_path / "patches")


def test_check_on_a_clean_checkout_reports_applicable_and_changes_nothing(setup):
    checkout, patches = setup
    code, out = run_tool(checkout, patches, "--check")
    assert code == 1, out
    assert "exact match of megatron/core/package_info.py 0.16.1" in out and "applicable" in out
    assert (checkout / "pretrain_gpt.py").read_text() == PRETRAIN


def test_apply_then_check_then_reapply_is_idempotent(setup):
    checkout, patches = setup
    code, out = run_tool(checkout, patches)
    assert code == 0 and "applied 0001-usp.patch" in out, out
    assert (checkout / "pretrain_gpt.py").read_text() == PATCHED
    code, out = run_tool(checkout, patches, "--check")
    assert code == 0 and "already applied" in out, out
    code, out = run_tool(checkout, patches)
    assert code == 0 and "already applied" in out, out
    assert (checkout / "pretrain_gpt.py").read_text() == PATCHED


@pytest.mark.parametrize("flags", [("--check",), ()])
def test_conflict_names_file_and_hunk_and_changes_nothing(tmp_path, flags):
    drifted = PRETRAIN.replace("line 2\n", "line two\n")  # context of the first hunk changed upstream
    checkout = make_checkout(tmp_path / "Megatron-LM", pretrain=drifted)
    code, out = run_tool(checkout, make_patches(tmp_path / "patches"), *flags)
    assert code == 4, out
    assert "patch failed: pretrain_gpt.py:1" in out and "import usp_glue" in out and "nothing was changed" in out
    assert (checkout / "pretrain_gpt.py").read_text() == drifted


def test_unknown_version_lists_the_available_patch_sets(tmp_path):
    checkout = make_checkout(tmp_path / "Megatron-LM", version=(0, 15, 0))
    code, out = run_tool(checkout, make_patches(tmp_path / "patches"), "--check")
    assert code == 3, out
    assert "0.15.0" in out and "Available: core_v0.16.1, core_v0.19.0" in out
    assert (checkout / "pretrain_gpt.py").read_text() == PRETRAIN


def test_other_patch_release_of_the_same_minor_is_used_and_said(tmp_path):
    checkout = make_checkout(tmp_path / "Megatron-LM", version=(0, 19, 1))
    code, out = run_tool(checkout, make_patches(tmp_path / "patches"))
    assert code == 0, out
    assert "NO patch set for megatron/core/package_info.py 0.19.1; using core_v0.19.0" in out


def test_git_tag_wins_over_package_info_and_subfolder_of_a_repo_works(tmp_path):
    # Megatron-LM's core_v0.19.0 tag carries package_info 0.19.1; here the checkout is also a folder inside
    # another repository, where git apply takes paths from that repository's top
    outer = tmp_path / "project"
    checkout = make_checkout(outer / "third_party" / "Megatron-LM", version=(0, 16, 2))
    git("init", "-q", cwd=outer)
    git("add", ".", cwd=outer)
    git("commit", "-qm", "vendored", cwd=outer)
    patches = make_patches(tmp_path / "patches", versions=("0.16.1",))
    code, out = run_tool(checkout, patches)
    assert code == 0 and "NO patch set" in out, out
    assert (checkout / "pretrain_gpt.py").read_text() == PATCHED
    tagged = make_checkout(tmp_path / "tagged", version=(0, 19, 1))
    git("init", "-q", cwd=tagged)
    git("add", ".", cwd=tagged)
    git("commit", "-qm", "release", cwd=tagged)
    git("tag", "core_v0.19.0", cwd=tagged)
    code, out = run_tool(tagged, make_patches(tmp_path / "more", versions=("0.19.0", "0.19.1")), "--check")
    assert code == 1 and "core_v0.19.0 (exact match of git tag 0.19.0)" in out, out


def test_version_override_and_usage_errors(setup, tmp_path):
    checkout, patches = setup
    code, out = run_tool(checkout, patches, "--check", "--version", "0.19.0")
    assert code == 1 and "core_v0.19.0 (exact match of --version 0.19.0)" in out, out
    code, out = run_tool(checkout, patches, "--version", "latest")
    assert code == 2 and "MAJOR.MINOR.PATCH" in out
    code, out = run_tool(tmp_path, patches)  # no pretrain_gpt.py
    assert code == 2 and "no pretrain_gpt.py" in out
    (checkout / "megatron" / "core" / "package_info.py").unlink()
    code, out = run_tool(checkout, patches)
    assert code == 2 and "--version X.Y.Z" in out


@pytest.mark.parametrize("patch_set", sorted(p.name for p in (REPO / "patches").glob("core_v*")))
def test_shipped_patch_sets_are_valid_and_touch_pretrain_gpt(patch_set):
    patches = sorted((REPO / "patches" / patch_set).glob("*.patch"))
    assert patches, f"{patch_set} holds no .patch file"
    touched = []
    for patch in patches:
        result = subprocess.run(["git", "apply", "--numstat", str(patch)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        touched += [line.split("\t")[2] for line in result.stdout.splitlines()]
    assert "pretrain_gpt.py" in touched


# Megatron-LM releases the shipped sets are for (MAJOR.MINOR picks the set; main is the next release in development).
# Run against a real Megatron-LM clone when one is at MEGATRON_LM_REPO (a git repository with these tags), e.g. the
# mirror `fetch github:NVIDIA/Megatron-LM` gives; skipped without one (CI has none).
RELEASES = {"core_v0.16.1": "core_v0.16.1", "core_v0.17.1": "core_v0.17.1", "core_v0.18.2": "core_v0.18.2",
            "core_v0.19.0": "core_v0.19.0", "main": "core_v0.20.0"}
MEGATRON_LM_REPO = Path(os.environ.get("MEGATRON_LM_REPO", "/work/.mirror/NVIDIA+Megatron-LM/repo"))


@pytest.mark.parametrize("ref", list(RELEASES))
def test_each_release_takes_its_patch_set_and_still_compiles(tmp_path, ref):
    """On a worktree of the real release: --check picks the set for its MAJOR.MINOR and says it applies; applying
    it leaves every patched file compiling, and --check then says it is applied."""
    if not (MEGATRON_LM_REPO / "HEAD").exists() and not (MEGATRON_LM_REPO / ".git").exists():
        pytest.skip(f"no Megatron-LM clone at {MEGATRON_LM_REPO} (set MEGATRON_LM_REPO)")
    if subprocess.run(["git", "-C", str(MEGATRON_LM_REPO), "rev-parse", "--verify", "-q", ref],
                      capture_output=True).returncode != 0:
        pytest.skip(f"{MEGATRON_LM_REPO} has no {ref}")
    checkout = tmp_path / "Megatron-LM"
    git("worktree", "add", "-f", "--detach", str(checkout), ref, cwd=MEGATRON_LM_REPO)
    try:
        code, out = run_tool(checkout, REPO / "patches", "--check")
        assert code == 1 and f"patch set {REPO / 'patches' / RELEASES[ref]} (exact match" in out, out
        code, out = run_tool(checkout, REPO / "patches")
        assert code == 0, out
        touched = subprocess.run(["git", "diff", "--name-only"], cwd=checkout, capture_output=True, text=True)
        for name in touched.stdout.split():
            compile((checkout / name).read_text(), name, "exec")
        assert "pretrain_gpt.py" in touched.stdout.split()
        code, out = run_tool(checkout, REPO / "patches", "--check")
        assert code == 0 and "applied" in out, out
    finally:
        git("worktree", "remove", "--force", str(checkout), cwd=MEGATRON_LM_REPO)
