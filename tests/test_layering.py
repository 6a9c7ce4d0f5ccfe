"""Import layering of the package: the evaluation and the shared data never import the demo or
the CLI, pid_fast.models has no import circle (function-level imports included), and the digits
modules' old paths (pid_fast.demo.data, pid_fast.demo.classifier) still work."""

import ast
import os
import sys
import warnings

import pid_fast

PACKAGE_DIR = os.path.dirname(pid_fast.__file__)


def _imported_modules(path):
    """Every pid_fast module ``path`` imports, at any depth of the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pid_fast"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # from pid_fast.x import module
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pid_fast"))
    return found


def _modules_of(subpackage):
    folder = os.path.join(PACKAGE_DIR, subpackage)
    return {f"pid_fast.{subpackage}.{name[:-3]}": os.path.join(folder, name)
            for name in sorted(os.listdir(folder)) if name.endswith(".py")}


def test_eval_and_data_never_import_the_demo_or_the_cli():
    for subpackage in ("eval", "data"):
        for module, path in _modules_of(subpackage).items():
            upward = sorted(m for m in _imported_modules(path) if m.startswith(("pid_fast.demo", "pid_fast.cli")))
            assert not upward, f"{module} imports {upward}"


def test_models_have_no_import_circle():
    modules = {m: p for m, p in _modules_of("models").items() if not m.endswith("__init__")}
    graph = {m: {d for d in _imported_modules(p) if d in modules and d != m} for m, p in modules.items()}
    done, visiting = set(), []

    def visit(m):
        assert m not in visiting, f"import circle: {' -> '.join(visiting[visiting.index(m):] + [m])}"
        if m in done:
            return
        visiting.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        visiting.pop()
        done.add(m)

    for m in sorted(modules):
        visit(m)
    # the builder of a preconditioned network sits above both the networks and the preconditionings
    assert "pid_fast.models.preconditioning" in graph["pid_fast.models.networks"]
    assert "pid_fast.models.networks" not in graph["pid_fast.models.preconditioning"]


def test_old_digits_paths_forward_to_the_new_modules():
    import pid_fast.data.assets
    import pid_fast.data.digits
    import pid_fast.demo.files
    import pid_fast.eval.digits

    for old in ("pid_fast.demo.classifier", "pid_fast.demo.data"):  # imported before: import afresh
        sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        import pid_fast.demo.classifier as old_classifier
        import pid_fast.demo.data as old_data
    assert any("pid_fast.demo.data moved to pid_fast.data.digits" in str(w.message) for w in caught)
    assert old_data.load_digits is pid_fast.data.digits.load_digits
    assert old_data.random_shift is pid_fast.data.digits.random_shift
    assert old_classifier.DigitsClassifier is pid_fast.eval.digits.DigitsClassifier
    assert old_classifier.load_classifier is pid_fast.eval.digits.load_classifier
    for name in ("DEFAULT_TEACHER", "DEFAULT_FEATURES", "RECIPE_KEY", "write_weights", "missing_file"):
        assert getattr(pid_fast.demo.files, name) is getattr(pid_fast.data.assets, name)
