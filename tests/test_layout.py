"""Repository layout rules of ARCHITECTURE.md: one-way imports, one name stem per op."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "python" / "ringfuse"

# Lower levels never import higher ones: _C, kernels <- ops <- nn, layers <- distributed <- runtime
# <- serve <- cli (bench, the harness behind `ringfuse bench`, sits beside serve).
LEVEL = {"_C": 0, "kernels": 0, "ops": 1, "nn": 2, "layers": 2, "distributed": 3, "runtime": 4, "bench": 5, "serve": 5, "cli": 6,
         "cli_generate": 6, "__main__": 7}


def level_of(parts):
    return LEVEL.get(parts[0]) if parts else None


def imported_subpackages(path: pathlib.Path, module_parts):
    tree = ast.parse(path.read_text())
    pkg_parts = module_parts[:-1] if path.name != "__init__.py" else module_parts
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)] if node.level > 1 else pkg_parts
                target = list(base) + (node.module.split(".") if node.module else [])
                if node.module is None:
                    for alias in node.names:
                        yield node.lineno, target + [alias.name]
                else:
                    yield node.lineno, target
            elif node.module and node.module.split(".")[0] == "ringfuse":
                yield node.lineno, node.module.split(".")[1:]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ringfuse":
                    yield node.lineno, alias.name.split(".")[1:]


def test_imports_go_one_way():
    bad = []
    files = [(p, list(p.relative_to(PKG).with_suffix("").parts)) for p in PKG.rglob("*.py")]
    files += [(p, ["kernels", *p.relative_to(ROOT / "kernels").with_suffix("").parts])
              for p in (ROOT / "kernels").rglob("*.py")]
    assert len(files) > 5
    for path, parts in files:
        src = level_of(parts)
        if src is None:  # the package root (__init__) may import anything
            continue
        for lineno, target in imported_subpackages(path, parts):
            dst = level_of(target)
            if dst is not None and dst > src:
                bad.append(f"{path.relative_to(ROOT)}:{lineno} imports ringfuse.{'.'.join(target)}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_kernels_use_relative_imports_only():
    for path in (ROOT / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                assert not node.module.startswith(("kernels", "ringfuse")), f"{path}: {node.module}"


def test_one_name_stem_per_op():
    """Every CPU kernel source has its op module, tests and bench under the same stem (the
    collectives' Python side lives in distributed/, not ops/)."""
    helpers = {"isa", "limits", "memory"}  # infrastructure, not ops
    home = {"allreduce": "distributed"}
    paths = {"attention_amx": "attention"}  # an ISA's kernel of an op, in a file of its own
    for src in (ROOT / "csrc" / "cpu").glob("*.cpp"):
        stem = paths.get(src.stem, src.stem)
        if stem in helpers:
            continue
        package = home.get(stem, "ops")
        assert (PKG / package / f"{stem}.py").exists(), stem
        assert (ROOT / "tests" / package / f"test_{stem}.py").exists(), stem
        assert (ROOT / "bench" / f"bench_{stem}.py").exists(), stem


def test_no_top_level_directory_shadows_an_installed_distribution():
    """`python -m pytest` (and pytest's rootdir insertion for tests/__init__.py) put the
    repository root first on sys.path, so a top-level directory importable under a name that
    an installed distribution provides would replace it: kernels/ did that to Hugging Face's
    `kernels`, which transformers >= 5.25 imports. From a Python started at the root, every
    such name must resolve outside the repository; the Triton sources' directory is no package
    of its own (the only import name is ringfuse.kernels)."""
    import importlib.metadata
    import subprocess
    import sys

    assert not (ROOT / "kernels" / "__init__.py").exists()
    provided = set(importlib.metadata.packages_distributions())
    names = sorted({p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir()} & provided)
    code = ("import importlib.util, sys\n"
            "for n in sys.argv[1:]:\n"
            "    s = importlib.util.find_spec(n)\n"
            "    print(n, *(([s.origin] if s.origin else []) + list(s.submodule_search_locations or [])), sep='|')\n")
    lines = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()  # fmt: skip
    assert len(lines) == len(names)
    def in_tree(name, path):  # the top-level entry itself (a .venv inside the root is no shadow)
        path = pathlib.Path(path).resolve()
        return path.is_relative_to(ROOT / name) or path == ROOT / f"{name}.py"

    shadowed = [line for line in lines if any(in_tree(line.split("|")[0], p) for p in line.split("|")[1:])]
    assert not shadowed, f"top-level directories shadow installed distributions: {shadowed}"
