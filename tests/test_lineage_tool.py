"""tools/lineage.py: `check` on the real lineage and on tiny synthetic ones, `diff`, and `propagate` (--from-file
and git modes). The tool runs as a subprocess, the way people run it; the synthetic scripts import nothing but
sys, so every test takes well under a second except the real check (one `--help` per real script)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "lineage.py")

HELP_BODY = 'if "--help" in sys.argv:\n    print("help")\n    sys.exit(0)\n'
BASE_BODY = [
    "import sys",
    "",
    "LEARNING_RATE = 0.1",
    "BATCH_SIZE = 4",
    "",
    "",
    "def main():",
    '    print("lr", LEARNING_RATE)',
    '    print("batch", BATCH_SIZE)',
    "    # each step adds its feature below",
    "",
    "",
]
FEATURE_02 = '    print("feature 02: ddp")'
FEATURE_03 = '    print("feature 03: shards")'
FEATURE_04 = '    print("feature 04: validation")'
NAMES = ["01-base.py", "02-add-ddp.py", "03-add-shards.py", "04-add-validation.py"]


def run_tool(*args, cwd=REPO, timeout=60):
    return subprocess.run([sys.executable, TOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def header(step, parent):
    return [f'"""Step {step:02d} of the lineage: a synthetic step for the tool\'s tests.', f"Parent: {parent}",
            "", "Run: python this.py --help", '"""']


def lineage_texts(steps=3):
    """Texts of a synthetic lineage: 01 the base, each later step its parent plus one feature line."""
    features = [FEATURE_02, FEATURE_03, FEATURE_04][:steps - 1]
    texts = {}
    for i in range(steps):
        body = list(BASE_BODY)
        hook = body.index("    # each step adds its feature below") + 1
        body[hook:hook] = features[:i]
        parent = "none" if i == 0 else NAMES[i - 1]
        texts[NAMES[i]] = "\n".join(header(i + 1, parent) + body) + "\n" + HELP_BODY
    return texts


def write_lineage(root, texts):
    for name, text in texts.items():
        (root / name).write_text(text)


def read_all(root):
    return {p.name: p.read_text() for p in sorted(root.glob("[0-9][0-9]-*.py"))}


# ---------------------------------------------------------------------------------------------------- check

def test_check_real_lineage_passes():
    """Needs the lead's real scripts in the repo root (fails while none exist): headers, numbering, and every
    `--help` exiting 0 with no side effects."""
    proc = run_tool("check", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lineage check OK" in proc.stdout


def test_check_clean_synthetic_lineage(tmp_path):
    write_lineage(tmp_path, lineage_texts(3))
    proc = run_tool("check", "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lineage check OK: 3 script(s)" in proc.stdout
    assert proc.stdout.count("\n") == 1  # the summary line only


def test_check_root_option_after_the_command_and_before_it(tmp_path):
    write_lineage(tmp_path, lineage_texts(2))
    assert run_tool("--root", str(tmp_path), "check", "--no-run").returncode == 0
    assert run_tool("check", "--no-run", "--root", str(tmp_path)).returncode == 0


def break_gap(texts):
    del texts["02-add-ddp.py"]
    return "03-add-shards.py", "gap"


def break_parent(texts):
    texts["03-add-shards.py"] = texts["03-add-shards.py"].replace("Parent: 02-add-ddp.py", "Parent: 01-base.py")
    return "03-add-shards.py", "should be 'Parent: 02-add-ddp.py'"


def break_missing_parent_line(texts):
    texts["02-add-ddp.py"] = texts["02-add-ddp.py"].replace("Parent: 01-base.py\n", "")
    return "02-add-ddp.py", "no 'Parent: FILE' line"


def break_first_parent(texts):
    texts["01-base.py"] = texts["01-base.py"].replace("Parent: none", "Parent: 00-nothing.py")
    return "01-base.py", "should be 'Parent: none'"


def break_missing_step_line(texts):
    texts["02-add-ddp.py"] = texts["02-add-ddp.py"].replace("Step 02 of", "Second step of")
    return "02-add-ddp.py", "no 'Step 02' line"


def break_wrong_step_number(texts):
    texts["02-add-ddp.py"] = texts["02-add-ddp.py"].replace("Step 02 of", "Step 03 of")
    return "02-add-ddp.py", "header says Step 03"


def break_duplicate(texts):
    texts["02-add-other.py"] = texts["02-add-ddp.py"]
    return "02-add-other.py", "duplicate step 02"


def break_start(texts):
    for name in list(texts):
        del texts[name]
    texts["02-add-ddp.py"] = lineage_texts(2)["02-add-ddp.py"]
    return "02-add-ddp.py", "starts at 02"


def break_syntax(texts):
    texts["03-add-shards.py"] += "def broken(:\n"
    return "03-add-shards.py", "does not compile"


def break_help_side_effect(texts):
    texts["02-add-ddp.py"] = texts["02-add-ddp.py"].replace(
        'print("help")', 'print("help")\n    open("input.txt", "w").write("downloaded")')
    return "02-add-ddp.py", "left input.txt in its working directory"


def break_help_exit_status(texts):
    texts["03-add-shards.py"] = texts["03-add-shards.py"].replace("sys.exit(0)", 'sys.exit("no such option")')
    return "03-add-shards.py", "--help exited with status 1: no such option"


def break_help_silent(texts):
    texts["03-add-shards.py"] = texts["03-add-shards.py"].replace('print("help")', "pass")
    return "03-add-shards.py", "printed nothing on stdout"


STRUCTURE_BREAKS = [break_gap, break_parent, break_missing_parent_line, break_first_parent, break_missing_step_line,
                    break_wrong_step_number, break_duplicate, break_start, break_syntax]
HELP_BREAKS = [break_help_side_effect, break_help_exit_status, break_help_silent]


@pytest.mark.parametrize("breakage", STRUCTURE_BREAKS + HELP_BREAKS, ids=lambda f: f.__name__[len("break_"):])
def test_check_reports_the_broken_file(tmp_path, breakage):
    texts = lineage_texts(3)
    name, message = breakage(texts)
    write_lineage(tmp_path, texts)
    proc = run_tool("check", "--root", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any(line.startswith(f"{name}: ") and message in line for line in proc.stdout.splitlines()), proc.stdout
    assert "lineage check FAILED" in proc.stdout.splitlines()[-1]


def break_help_crash(texts):
    texts["02-add-ddp.py"] = texts["02-add-ddp.py"].replace('print("help")', 'print("help")\n    [][0]')
    return "02-add-ddp.py", "--help exited with status 1: IndexError: list index out of range"


@pytest.mark.parametrize("breakage", HELP_BREAKS + [break_help_crash], ids=lambda f: f.__name__[len("break_"):])
def test_forked_and_isolated_help_runs_report_the_same(tmp_path, breakage):
    """The default runs every --help in a child forked from one interpreter (torch imported once); --isolated runs
    each in a fresh `python FILE --help`. Both report the same problem, and leave nothing in the scripts' folder."""
    texts = lineage_texts(3)
    name, message = breakage(texts)
    write_lineage(tmp_path, texts)
    outputs = [run_tool("check", "--root", str(tmp_path), *mode).stdout for mode in ([], ["--isolated"])]
    assert outputs[0] == outputs[1] and f"{name}: " in outputs[0] and message in outputs[0], outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(texts)


def test_a_help_run_that_hangs_is_stopped(tmp_path):
    """A --help that never ends is killed at the time limit and reported, the other scripts still checked."""
    texts = lineage_texts(3)
    texts["02-add-ddp.py"] = texts["02-add-ddp.py"].replace('print("help")', 'import time\n    time.sleep(600)')
    write_lineage(tmp_path, texts)
    source = open(TOOL).read().replace("HELP_TIMEOUT_S = 60", "HELP_TIMEOUT_S = 2")
    fast_tool = tmp_path.parent / "lineage_fast.py"
    fast_tool.write_text(source)
    proc = subprocess.run([sys.executable, str(fast_tool), "check", "--root", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "02-add-ddp.py: --help did not finish within 2 s" in proc.stdout, proc.stdout
    assert "FAILED: 1 problem(s)" in proc.stdout


@pytest.mark.parametrize("breakage", HELP_BREAKS, ids=lambda f: f.__name__[len("break_"):])
def test_check_no_run_skips_the_help_runs(tmp_path, breakage):
    texts = lineage_texts(3)
    breakage(texts)
    write_lineage(tmp_path, texts)
    proc = run_tool("check", "--no-run", "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "structure only" in proc.stdout
    assert not (tmp_path / "input.txt").exists()


def test_check_an_empty_folder_fails(tmp_path):
    proc = run_tool("check", "--root", str(tmp_path))
    assert proc.returncode == 1
    assert "no lineage scripts" in proc.stdout


# ----------------------------------------------------------------------------------------------------- diff

def test_diff_prints_what_the_step_adds(tmp_path):
    write_lineage(tmp_path, lineage_texts(3))
    proc = run_tool("diff", "2", "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["--- 01-base.py", "+++ 02-add-ddp.py"]
    added = [line[1:] for line in lines[2:] if line.startswith("+")]
    removed = [line[1:] for line in lines[2:] if line.startswith("-")]
    assert FEATURE_02 in added and FEATURE_03 not in added
    assert added == ['"""Step 02 of the lineage: a synthetic step for the tool\'s tests.', "Parent: 01-base.py",
                     FEATURE_02]
    assert len(removed) == 2  # the header's Step and Parent lines

    by_name = run_tool("diff", "02-add-ddp.py", "--root", str(tmp_path))
    assert by_name.stdout == proc.stdout


def test_diff_stat_counts_lines(tmp_path):
    write_lineage(tmp_path, lineage_texts(3))
    proc = run_tool("diff", "03", "--stat", "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "02-add-ddp.py -> 03-add-shards.py: 3 line(s) added, 2 removed"


def test_diff_of_step_01_or_a_missing_step_is_a_usage_error(tmp_path):
    write_lineage(tmp_path, lineage_texts(2))
    for step in ("1", "5"):
        proc = run_tool("diff", step, "--root", str(tmp_path))
        assert proc.returncode == 2 and "error" in proc.stderr and not proc.stdout


# ------------------------------------------------------------------------------------------------ propagate

def edit(text, old, new):
    assert text.count(old) == 1, (old, text)
    return text.replace(old, new)


def git(root, *args):
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main",
                    "-c", "commit.gpgsign=false", *args], cwd=root, env=env, check=True, capture_output=True)


def git_lineage(root, texts):
    write_lineage(root, texts)
    git(root, "init", "-q")
    git(root, "add", *texts)
    git(root, "commit", "-q", "-m", "lineage")


def assert_carried(before, after, names):
    """Every file in names has the edit and keeps its own feature lines."""
    for name in names:
        assert after[name] == edit(before[name], "LEARNING_RATE = 0.1", "LEARNING_RATE = 0.2"), name


def test_propagate_from_file_carries_an_edit_and_keeps_the_features(tmp_path):
    texts = lineage_texts(3)
    write_lineage(tmp_path, texts)
    old = tmp_path / "old-01.py"
    old.write_text(texts["01-base.py"])
    (tmp_path / "01-base.py").write_text(edit(texts["01-base.py"], "LEARNING_RATE = 0.1", "LEARNING_RATE = 0.2"))

    proc = run_tool("propagate", "1", "--from-file", str(old), "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "updated 02-add-ddp.py" in proc.stdout and "updated 03-add-shards.py" in proc.stdout
    after = read_all(tmp_path)
    assert_carried(texts, after, ["02-add-ddp.py", "03-add-shards.py"])
    assert FEATURE_02 in after["03-add-shards.py"] and FEATURE_03 in after["03-add-shards.py"]
    assert run_tool("check", "--no-run", "--root", str(tmp_path)).returncode == 0


def test_propagate_from_a_middle_step_leaves_earlier_steps_alone(tmp_path):
    texts = lineage_texts(3)
    write_lineage(tmp_path, texts)
    old = tmp_path / "old-02.py"
    old.write_text(texts["02-add-ddp.py"])
    (tmp_path / "02-add-ddp.py").write_text(edit(texts["02-add-ddp.py"], "BATCH_SIZE = 4", "BATCH_SIZE = 8"))

    proc = run_tool("propagate", "02", "--from-file", str(old), "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = read_all(tmp_path)
    assert after["01-base.py"] == texts["01-base.py"]
    assert after["03-add-shards.py"] == edit(texts["03-add-shards.py"], "BATCH_SIZE = 4", "BATCH_SIZE = 8")


def test_an_edit_next_to_a_childs_own_change_is_a_conflict(tmp_path):
    """git merge-file's rule: changes on adjacent lines conflict (03's feature line follows 02's)."""
    texts = lineage_texts(3)
    write_lineage(tmp_path, texts)
    old = tmp_path / "old-02.py"
    old.write_text(texts["02-add-ddp.py"])
    (tmp_path / "02-add-ddp.py").write_text(edit(texts["02-add-ddp.py"], FEATURE_02, FEATURE_02 + "  # fixed"))

    proc = run_tool("propagate", "02", "--from-file", str(old), "--root", str(tmp_path))
    assert proc.returncode == 1 and "CONFLICT in 03-add-shards.py" in proc.stdout, proc.stdout + proc.stderr
    assert "updated: nothing" in proc.stdout
    assert read_all(tmp_path)["03-add-shards.py"] == texts["03-add-shards.py"]


def conflicting_lineage():
    """Four steps where 03 changed the line that the edit of 01 changes (a re-tuned default)."""
    texts = lineage_texts(4)
    texts["03-add-shards.py"] = edit(texts["03-add-shards.py"], "LEARNING_RATE = 0.1", "LEARNING_RATE = 0.05")
    texts["04-add-validation.py"] = edit(texts["04-add-validation.py"], "LEARNING_RATE = 0.1", "LEARNING_RATE = 0.05")
    return texts


@pytest.mark.parametrize("write_conflicts", [False, True], ids=["report", "write-conflicts"])
def test_propagate_stops_at_the_first_conflict(tmp_path, write_conflicts):
    texts = conflicting_lineage()
    write_lineage(tmp_path, texts)
    old = tmp_path / "old-01.py"
    old.write_text(texts["01-base.py"])
    (tmp_path / "01-base.py").write_text(edit(texts["01-base.py"], "LEARNING_RATE = 0.1", "LEARNING_RATE = 0.2"))

    extra = ["--write-conflicts"] if write_conflicts else []
    proc = run_tool("propagate", "1", "--from-file", str(old), "--root", str(tmp_path), *extra)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "CONFLICT in 03-add-shards.py: 1 conflict hunk(s)" in proc.stdout
    assert "updated: 02-add-ddp.py" in proc.stdout
    after = read_all(tmp_path)
    assert_carried(texts, after, ["02-add-ddp.py"])
    assert after["04-add-validation.py"] == texts["04-add-validation.py"]
    if write_conflicts:
        assert "wrote 03-add-shards.py with conflict markers" in proc.stdout
        assert "left untouched: 04-add-validation.py" in proc.stdout
        conflicted = after["03-add-shards.py"]
        assert "<<<<<<< 03-add-shards.py" in conflicted and ">>>>>>> 02-add-ddp.py after the edit" in conflicted
        assert "LEARNING_RATE = 0.05" in conflicted and "LEARNING_RATE = 0.2" in conflicted
    else:
        assert "left untouched: 03-add-shards.py, 04-add-validation.py" in proc.stdout
        assert after["03-add-shards.py"] == texts["03-add-shards.py"]


def test_propagate_git_mode_uses_the_uncommitted_edit(tmp_path):
    texts = lineage_texts(3)
    git_lineage(tmp_path, texts)
    (tmp_path / "01-base.py").write_text(edit(texts["01-base.py"], "LEARNING_RATE = 0.1", "LEARNING_RATE = 0.2"))

    dry = run_tool("propagate", "1", "--dry-run", "--root", str(tmp_path))
    assert dry.returncode == 0 and "would update 02-add-ddp.py" in dry.stdout, dry.stdout + dry.stderr
    assert read_all(tmp_path)["02-add-ddp.py"] == texts["02-add-ddp.py"]

    proc = run_tool("propagate", "1", "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_carried(texts, read_all(tmp_path), ["02-add-ddp.py", "03-add-shards.py"])

    again = run_tool("propagate", "2", "--root", str(tmp_path))  # 02 vs HEAD is the carried edit: 03 has it
    assert again.returncode == 0 and "unchanged 03-add-shards.py" in again.stdout, again.stdout + again.stderr


def test_propagate_git_mode_with_base_revision(tmp_path):
    texts = lineage_texts(3)
    git_lineage(tmp_path, texts)
    (tmp_path / "01-base.py").write_text(edit(texts["01-base.py"], "LEARNING_RATE = 0.1", "LEARNING_RATE = 0.2"))
    git(tmp_path, "commit", "-q", "-am", "fix 01 only")

    assert "no change" in run_tool("propagate", "1", "--root", str(tmp_path)).stdout
    proc = run_tool("propagate", "1", "--base", "HEAD~1", "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_carried(texts, read_all(tmp_path), ["02-add-ddp.py", "03-add-shards.py"])


def test_propagate_git_mode_conflict(tmp_path):
    texts = conflicting_lineage()
    git_lineage(tmp_path, texts)
    (tmp_path / "01-base.py").write_text(edit(texts["01-base.py"], "LEARNING_RATE = 0.1", "LEARNING_RATE = 0.2"))

    proc = run_tool("propagate", "1", "--root", str(tmp_path))
    assert proc.returncode == 1 and "CONFLICT in 03-add-shards.py" in proc.stdout, proc.stdout + proc.stderr
    assert "carry on with: propagate 03" in proc.stdout
    after = read_all(tmp_path)
    assert_carried(texts, after, ["02-add-ddp.py"])
    assert after["03-add-shards.py"] == texts["03-add-shards.py"]
    assert after["04-add-validation.py"] == texts["04-add-validation.py"]


def test_propagate_outside_git_without_from_file_is_a_usage_error(tmp_path):
    write_lineage(tmp_path, lineage_texts(2))
    proc = run_tool("propagate", "1", "--root", str(tmp_path))
    assert proc.returncode == 2 and "--from-file" in proc.stderr
    assert read_all(tmp_path) == lineage_texts(2)
