"""The repository's shape, as a reader meets it: the algorithm's eight files at the top and the
support code in packages; imports that run one way (no cycle; aepo.py, loss.py and support/data.py
import nothing of the project; the support code never imports the sampler, the trainer or the
evaluator); no function over 80 lines in the algorithm's files."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHM = {"aepo", "rollout", "engine", "kvcache", "loss", "tools", "train", "eval"}
PACKAGES = ("support", "sandbox", "course")


def project_modules() -> dict[str, Path]:
    """Module name -> file: the top-level files and every package's modules."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for package in PACKAGES:
        for p in (ROOT / package).glob("*.py"):
            found[package if p.stem == "__init__" else f"{package}.{p.stem}"] = p
    return found


def project_imports(path: Path, known: dict) -> set[str]:
    """The project modules a file imports, anywhere in it (`from support import data` imports
    support.data)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            inner = {f"{node.module}.{alias.name}" for alias in node.names} & known.keys()
            names |= inner or {node.module}
    return names & known.keys()


def test_the_top_level_holds_the_algorithm_and_the_rest_is_in_packages():
    assert {p.stem for p in ROOT.glob("*.py")} == ALGORITHM
    assert all((ROOT / package / "__init__.py").is_file() for package in PACKAGES)


def test_imports_run_one_way():
    known = project_modules()
    graph = {name: project_imports(path, known) - {name} for name, path in known.items()}
    for leaf in ("aepo", "loss", "support.data"):
        assert graph[leaf] == set(), (leaf, graph[leaf])
    assert graph["tools"] <= {"sandbox"}
    for name, imported in graph.items():
        if name.startswith(("support", "sandbox")):
            assert not imported & {"rollout", "engine", "kvcache", "train", "eval"}, name
    assert not [name for name, imported in graph.items() if "train" in imported]

    def visit(name: str, path: tuple):
        assert name not in path, f"import cycle: {' -> '.join(path + (name,))}"
        for other in graph[name]:
            visit(other, path + (name,))

    for name in graph:
        visit(name, ())


def test_no_function_in_the_algorithm_files_is_over_80_lines():
    long = [f"{name}.py:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name in sorted(ALGORITHM)
            for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long
