"""The shape of the code: a method is one module, the schema is declared once, the docs follow it."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from switchkd.checks import DIVERGENCE_PARAMS
from switchkd.config import Config, load_config
from switchkd.methods import SECTIONS, SOURCES
from switchkd.methods.base import Source
from switchkd.schema import entries, markdown

ROOT = Path(__file__).resolve().parents[1]
#: the registry's own files: method names live in methods/, divergence names in the registry
REGISTRIES = ("divergences.py", "divergence_table.py")
#: names that are also plain words of the code (a source named after its sequences)
PLAIN_WORDS = {"dataset", "teacher", "student", "mixture"}
#: the names allowed elsewhere, each with why it keys no behaviour
ALLOWED = {("config.py", "sft"): "the default label of method.name (logs and reports only)",
           ("records.py", "minillm"): "a record format, named after the data files MiniLLM publishes"}


def _code_tokens(path: Path) -> list:
    """``(line, text)`` of every token of ``path`` but comments and docstrings (string literals kept: a name in a
    message or a key is a name in the code)."""
    import ast
    import io
    import tokenize

    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type != tokenize.COMMENT and not (tok.type == tokenize.STRING and tok.start[0] in docstrings)]


def test_no_method_or_divergence_name_outside_methods_and_the_registry():
    """Behaviour is never keyed on a method's or a divergence's name outside its own module: every module of
    switchkd/ but methods/ and the divergence registry is scanned (code and string literals; docs in docstrings and
    comments may cite the papers)."""
    names = (set(SOURCES) | set(DIVERGENCE_PARAMS) | {"seqkd", "gkd", "imitkd", "bild", "minillm", "distillm", "sft",
                                                      "skd", "switch"}) - PLAIN_WORDS
    hits = []
    for path in sorted((ROOT / "switchkd").rglob("*.py")):
        rel = path.relative_to(ROOT / "switchkd").as_posix()
        if rel.startswith("methods/") or rel in REGISTRIES:
            continue
        for line, text in _code_tokens(path):  # ("CE", the abbreviation of cross-entropy, is a word, not the key "ce")
            hits += [(rel, line, n) for n in sorted(names) if (rel, n) not in ALLOWED and
                     re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", text, 0 if n == "ce" else re.IGNORECASE)]
    assert not hits, hits


def test_every_method_module_declares_itself():
    """Every module of switchkd/methods/ but the base is found, and each declares one source (no list to edit)."""
    modules = sorted(p.stem for p in (ROOT / "switchkd" / "methods").glob("*.py") if p.stem not in ("__init__", "base"))
    assert sorted({cls.__module__.rsplit(".", 1)[1] for cls in SOURCES.values()}) == modules
    for name, cls in SOURCES.items():
        assert issubclass(cls, Source) and cls.name == name
        assert cls.__module__.startswith("switchkd.methods.")
        if cls.section:  # its section is part of the config tree, every field documented
            assert SECTIONS[cls.section] is cls.Section
            assert all(f.metadata.get("help") for f in dataclasses.fields(cls.Section)), name
    assert all(e.help for e in entries(Config)), [e.key for e in entries(Config) if not e.help]


def test_the_source_contract_is_small():
    """The base class's public members: the core contract only (at most 15)."""
    members = [n for n in vars(Source) if not n.startswith("_")]
    assert len(members) <= 15, members


def test_config_reference_is_generated_from_the_schema():
    doc = (ROOT / "docs/configuration.md").read_text()
    table = doc.split("<!-- schema:start -->\n")[1].split("<!-- schema:end -->")[0]
    assert table == markdown(Config), "regenerate: python -m switchkd.config"


def test_declared_ranges_and_choices_are_enforced():
    """Each declared rule is what the loader checks: a value outside it is refused, naming the key."""
    from switchkd.config import ConfigError

    cases = 0
    for e in entries(Config):
        if e.optional_section:
            continue
        bad = (["not-a-choice"] if e.choices else
               [-1e9] if e.rule and not e.rule[0](-1e9) else [1e9] if e.rule and not e.rule[0](1e9) else [])
        for value in bad:
            extra = ["teacher.name=tiny:gpt2", "data.dev=synthetic:dev"]
            with pytest.raises(ConfigError, match=re.escape(e.key)):
                load_config(None, extra + [f"{e.key}={value}"])
            cases += 1
    assert cases > 50


def _imports(path: Path) -> set:
    """The switchkd modules ``path`` imports anywhere (a function's deferred import included; an
    ``if TYPE_CHECKING:`` block, read by type checkers only, left out)."""
    import ast

    found = set()

    def visit(nodes: list) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("switchkd"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("switchkd"))
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child])

    visit(ast.parse(path.read_text()).body)
    return found


def test_the_import_graph_has_no_circle():
    """No module of switchkd/ reaches itself through its imports (deferred imports inside functions count: a
    circle hidden in a function is still a circle)."""
    package = ROOT / "switchkd"
    modules = {".".join(("switchkd",) + p.relative_to(package).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph = {m: {d for d in _imports(p) if d in modules and d != m} for m, p in modules.items()}
    state: dict = {}
    path: list = []

    def walk(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                walk(d)
        path.pop()
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            walk(m)


def test_the_packages_import_without_circles():
    """Each module imports on its own in a fresh interpreter (no import-order dependence)."""
    for m in ("switchkd.synthetic", "switchkd.arith", "switchkd.methods.minillm"):  # the former circles' far ends
        r = subprocess.run([sys.executable, "-c", f"import {m}"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (m, r.stderr[-500:])


def test_eval_flags_come_from_the_schema():
    from switchkd.cli import build_parser
    from switchkd.config import EvalConfig

    p = build_parser()
    sub = next(a for a in p._actions if getattr(a, "choices", None) and "eval" in a.choices).choices["eval"]
    flags = {a.dest: a for a in sub._actions}
    for name in ("batch_size", "max_length", "max_prompt_length", "metric"):
        f = next(f for f in dataclasses.fields(EvalConfig) if f.name == name)
        assert flags[name].default == f.default and f.metadata["help"] in flags[name].help
    assert flags["metric"].choices == ["rougeL", "accuracy"]
