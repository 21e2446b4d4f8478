"""README.md opens with exactly the two set-up commands, and .ci/run runs the second."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block and text.index("```sh") < 30, "README must open with the set-up commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert "ringfuse bench" in cmds[0] or "ringfuse generate" in cmds[0]
    assert "pytest" in cmds[1] and "[test]" in cmds[1]
    for cmd in cmds:  # never an unpinned torch on a CPU machine
        assert "-c constraints.txt" in cmd


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"( {readme_commands()[1]} )" in ci


def test_constraints_pin_torch_and_triton():
    pins = (ROOT / "constraints.txt").read_text()
    assert "torch==2.13.0" in pins and re.search(r"triton==3\.7\.\d", pins)
