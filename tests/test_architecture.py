"""The package map holds: no import cycles inside raytp, and each layer imports only the layers below it."""

import ast
import re
from pathlib import Path

import raytp

ROOT = Path(raytp.__file__).parent

# What each package may import from raytp (besides itself). Mirrors the docstring of each package's __init__.
ALLOWED = {
    "kernels": set(),
    "model": {"parallel", "kernels"},
    "parallel": {"kernels"},  # the planner knows pieces, not models
    "weights": {"model", "parallel"},
    "runtime": {"model", "parallel", "weights", "kernels"},
    "ui": {"runtime", "parallel"},
    "serving": {"runtime", "ui"},
    "actors": {"runtime", "model", "parallel", "weights", "serving", "kernels"},
    "bench": {"actors", "runtime", "model", "parallel", "weights", "kernels"},
    "cli": {"bench", "actors", "serving", "ui", "runtime", "model", "parallel", "weights", "kernels"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every raytp module -> the raytp modules it imports (at module level or inside functions)."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("raytp")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raytp"):
                found.add(node.module)
        graph[name] = found
    return graph


def _resolve(name: str, modules: set[str]) -> str:
    """`raytp.parallel.comm` names a package: its __init__ module, which is in `modules` under that name."""
    while name not in modules:
        name = name.rsplit(".", 1)[0]
    return name


def test_no_import_cycles():
    graph = _imports()
    modules = set(graph)
    edges = {m: {_resolve(t, modules) for t in targets} - {m} for m, targets in graph.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m)


def test_layers_import_only_what_their_package_allows():
    wrong = []
    for module, targets in _imports().items():
        parts = module.split(".")
        if len(parts) < 3 or parts[1] not in ALLOWED:
            continue  # raytp, raytp.__main__
        package = parts[1]
        for target in targets:
            tparts = target.split(".")
            if len(tparts) < 2 or tparts[1] == package:
                continue
            allowed = ALLOWED[package]
            if tparts[1] not in allowed and ".".join(tparts[1:3]) not in allowed:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_package_says_what_it_may_import():
    for package in ALLOWED:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"raytp/{package}/__init__.py has no 'May import' line"



# Spelled only by a checkpoint method's own file (raytp.model.quant): its quant_method, formats and layouts
METHOD_STRINGS = {"compressed-tensors", "pack-quantized", "float-quantized", "int-quantized", "naive-quantized",
                  "gptq", "gptq_v2", "awq", "gemm", "fp8-blocks"}


def test_weight_formats_and_checkpoint_methods_are_told_apart_only_in_their_own_files():
    """A weight says itself how it fuses, repacks and applies (no isinstance on its class elsewhere), and a
    checkpoint method is one file (no comparison with its names elsewhere): a new format or method is one file."""
    import inspect

    from raytp.model import formats
    from raytp.model.quant.registry import METHODS

    weights = {name: Path(inspect.getfile(getattr(formats, name))) for name in
               ("DenseWeight", "IntWeight", "FP8Weight", "ActQuantWeight", "ConcatWeight", "PackedWeight")}
    method_files = {Path(inspect.getfile(m)) for m in METHODS.values()}
    wrong = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                wrong += [f"{path}:{node.lineno} isinstance(..., {c.id})" for c in classes
                          if isinstance(c, ast.Name) and weights.get(c.id, path) != path]
            elif isinstance(node, ast.Compare) and path not in method_files:
                sides = [node.left, *node.comparators]
                sides += [e for side in sides if isinstance(side, (ast.Tuple, ast.List, ast.Set)) for e in side.elts]
                wrong += [f"{path}:{node.lineno} compares {side.value!r}" for side in sides
                          if isinstance(side, ast.Constant) and side.value in METHOD_STRINGS]
    assert not wrong, "\n".join(wrong)

# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "prometheus_client": "prometheus-client"}
# imported inside try/except ImportError or on an optional path only
OPTIONAL = {"triton": "GPU kernels: every kernel has a torch fallback",
            "fla": "fla-core, the `fla` extra: the gated delta rule's GPU kernels, with a torch fallback",
            "transformers": "only `raytp bench --hf-peer`, which says to install it",
            "llmcompressor": "only weights/llmcompressor_script.py, run in llmcompressor's own virtual environment",
            "datasets": "likewise (llmcompressor's calibration data)"}


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_declared():
    import sys
    import tomllib

    requirements = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {re.split(r"[\[<>=!~ ]", r, maxsplit=1)[0].lower() for r in requirements}
    used = set().union(*(_top_level_imports(p) for p in ROOT.rglob("*.py")))
    third_party = used - set(sys.stdlib_module_names) - {"raytp"} - set(OPTIONAL)
    missing = sorted(m for m in third_party if DISTRIBUTION.get(m, m).lower() not in declared)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_gguf_is_imported_only_where_a_gguf_is_converted():
    importers = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if "gguf" in _top_level_imports(p))
    assert importers == ["weights/gguf_import.py"]
