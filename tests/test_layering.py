"""The layout shows the data flow: imports go cli -> engines, reports, runtime -> planner -> costmodel.

Every import statement of every module is read (ast), including imports inside functions,
so a lazy import cannot hide a cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "costmodel": ("planner", "runtime", "reports", "cli", "engines"),
    "planner": ("runtime", "reports", "cli", "engines"),
    "runtime": ("reports", "cli", "engines", "planner.search", "planner.intra_op", "planner.inter_op"),
    "reports": ("cli", "runtime", "engines"),
    "engines": ("cli", "runtime", "reports", "planner.search"),
}


def imports_of(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_what_sits_above_it(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(ROOT)} imports {name}" for f in files for name in imports_of(f)
           if any(name == top or name.startswith(top + ".") for top in FORBIDDEN[package])]
    assert not bad, bad


def test_the_reader_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from runtime.launch import run\n    import reports.build\n")
    assert imports_of(f) == ["runtime.launch", "reports.build"]


def test_nothing_points_outside_the_repository():
    needle = "../" + "shared"  # the team's notes beside the checkout, which users do not have
    tops = [ROOT / d for d in ("cli", "planner", "costmodel", "runtime", "reports", "engines", "docs", "tests",
                               "bench", "profiles")]
    files = [p for top in tops for p in top.rglob("*")] + [ROOT / "README.md", ROOT / "pyproject.toml"]
    hits = [str(p.relative_to(ROOT)) for p in files if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".toml")
            and needle in p.read_text(errors="ignore")]
    assert hits == [], hits
