"""Training corpora as plain files with one document per line (UTF-8).

Besides the toy languages, two real-text corpora come from the Python standard library, because it
is present offline on every machine that runs this package and none of it is written by us:
English prose from docstrings and Python source from top-level functions. Their exact contents depend
on the Python version, so record the version alongside results that use them.
"""

from __future__ import annotations

import ast
import os
import random
import re
import sysconfig
import textwrap
import warnings
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from jointdlm.data.tasks import tasks_corpus
from jointdlm.data.toy import LANGUAGES
from jointdlm.outputs import atomic_write_text, check_output_file

CODE_NEWLINE = "\u21b5"
DEFAULT_TOY_DOCS = 20000
MAX_CORPUS_DOCS = 10_000_000  # a corpus is built in memory before it is written; pre-training uses far fewer
STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "__pycache__"}
)

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def encode_code(text: str) -> str:
    """Fold a multi-line snippet onto one line so it fits the one-document-per-line format."""
    return text.replace("\t", "    ").replace("\n", CODE_NEWLINE)


def decode_code(line: str) -> str:
    """Inverse of `encode_code` (tabs stay expanded)."""
    return line.replace(CODE_NEWLINE, "\n")


def _stdlib_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
        for filename in sorted(filenames):
            if filename.endswith(".py"):
                yield Path(dirpath) / filename


def _docstring_nodes(body: list[ast.stmt]) -> Iterator[ast.AST]:
    for node in body:
        if isinstance(node, _DEFINITIONS):
            yield node
            yield from _docstring_nodes(node.body)


def _clean_docstring(doc: str) -> str | None:
    """First paragraph on one line, or None when it is not short, plain English prose."""
    text = " ".join(_PARAGRAPH_BREAK.split(doc.strip(), maxsplit=1)[0].split())
    if not 20 <= len(text) <= 300 or not text.isascii() or ">>>" in text:
        return None
    letters = sum(c.isalpha() for c in text)
    punctuation = sum(not (c.isalnum() or c == " ") for c in text)
    if letters < 0.75 * len(text) or punctuation > 0.06 * len(text):
        return None
    return text


def _docstrings(tree: ast.Module) -> Iterator[str]:
    for node in (tree, *_docstring_nodes(tree.body)):
        doc = ast.get_docstring(node)  # type: ignore[arg-type]
        if doc:
            text = _clean_docstring(doc)
            if text is not None:
                yield text


def _is_plain_source(text: str) -> bool:
    """Printable ASCII plus newlines and tabs: anything else could split or corrupt a corpus line."""
    return all(" " <= c <= "~" or c in "\n\t" for c in text)


def _top_level_functions(source: str, tree: ast.Module) -> Iterator[str]:
    """Source of each short top-level function, one line per document.

    Slices the already-split lines instead of calling `ast.get_source_segment` per function, which
    re-splits the whole file each time and makes the walk quadratic in file size; the result is the
    same text (no decorators, `def` to end of body).
    """
    lines: list[str] | None = None
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.end_lineno is None:
            continue
        if not 3 <= node.end_lineno - node.lineno + 1 <= 25:
            continue
        if lines is None:
            lines = source.split("\n")
        region = lines[node.lineno - 1 : node.end_lineno]
        if not _is_plain_source("\n".join(region)):
            continue
        region[-1] = region[-1][: node.end_col_offset]
        region[0] = region[0][node.col_offset :]
        text = textwrap.dedent("\n".join(region).replace("\t", "    "))
        if len(text) <= 800:
            yield encode_code(text)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


@lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(docstrings, functions) of the standard library in a fixed order.

    One walk serves both corpora and is cached because parsing the whole library takes seconds.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    functions: list[str] = []
    for path in _stdlib_files(root):
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(source, filename=str(path))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        docs.extend(_docstrings(tree))
        functions.extend(_top_level_functions(source, tree))
    return tuple(_unique(docs)), tuple(_unique(functions))


def _shuffled(items: Iterable[str], num: int | None, seed: int) -> list[str]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items if num is None else items[:num]


def _toy_builder(name: str) -> Callable[[int | None, int], list[str]]:
    def build(num: int | None, seed: int) -> list[str]:
        return LANGUAGES[name].sample(DEFAULT_TOY_DOCS if num is None else num, seed)

    return build


def _english(num: int | None, seed: int) -> list[str]:
    return _shuffled(_stdlib_documents()[0], num, seed)


def _code(num: int | None, seed: int) -> list[str]:
    return _shuffled(_stdlib_documents()[1], num, seed)


CORPORA: dict[str, Callable[[int | None, int], list[str]]] = {
    **{name: _toy_builder(name) for name in LANGUAGES},
    "english": _english,
    "code": _code,
    "tasks": tasks_corpus,
}


def build_corpus(name: str, num: int | None = None, seed: int = 0) -> list[str]:
    """Documents of a named corpus; `num=None` means the default size (toy) or everything (stdlib)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid names: {', '.join(sorted(CORPORA))}")
    if num is not None and num < 0:
        raise ValueError(f"num must be non-negative, got {num}")
    if num is not None and num > MAX_CORPUS_DOCS:
        raise ValueError(f"num={num:,} is more documents than one corpus file holds (at most {MAX_CORPUS_DOCS:,})")
    docs = CORPORA[name](num, seed)
    if not docs:
        raise ValueError(f"corpus {name!r} produced no documents (num={num}); nothing to write")
    return docs


def write_corpus(name: str, path: str | Path, num: int | None = None, seed: int = 0) -> int:
    """Write a corpus atomically, so an interrupted run never leaves a truncated file behind."""
    path = check_output_file(path)
    docs = build_corpus(name, num, seed)
    for doc in docs:
        if not doc.strip() or len(doc.splitlines()) != 1:
            raise ValueError(f"corpus {name!r} has a document that is not exactly one line: {doc[:80]!r}")
    atomic_write_text(path, "\n".join(docs) + "\n")
    return len(docs)


def read_corpus(path: str | Path) -> list[str]:
    """Non-empty lines of a corpus file, one document each."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} not found; create it with write_corpus() first")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    docs = [line for line in text.split("\n") if line.strip()]
    if not docs:
        raise ValueError(f"corpus {path} is empty")
    return docs
