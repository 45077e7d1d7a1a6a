"""Layers that never point up, and no name that another shadows.

The layers, lowest first, are kernels (`tokenprobe.kernels.*`), core (every other
`tokenprobe.*` module, `tokenprobe.cli.args` included), probes (`tokenprobe.probes.*`),
analyses (`tokenprobe.analyses.*`), app (`tokenprobe.app.*`) and cli (`tokenprobe.cli.*` but
`tokenprobe.cli.args`), and a module may import its own layer or a lower one, never a higher one.

Every import counts: module-level and inside functions (lazy imports), under
`if TYPE_CHECKING:`, relative ones, and `importlib.import_module("tokenprobe...")` with a literal
name. Files map to module names through pyproject's `package-dir`. The package face
`tokenprobe/__init__.py` (a lazy name map over the layers) is exempt.
"""
from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

# (layer, the module prefixes it holds), lowest first; a module's layer is its longest prefix.
LAYERS = [
    ("kernels", ["tokenprobe.kernels"]),
    ("core", ["tokenprobe", "tokenprobe.cli.args"]),
    ("probes", ["tokenprobe.probes"]),
    ("analyses", ["tokenprobe.analyses"]),
    ("app", ["tokenprobe.app"]),
    ("cli", ["tokenprobe.cli"]),
]
EXEMPT = {"tokenprobe"}  # the package face: a lazy name map
ROOT = Path(__file__).resolve().parents[1]


def package_dirs() -> dict[str, Path]:
    """Package name -> its folder, from pyproject's [tool.setuptools.package-dir]."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder
            for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of the package -> its file (a package -> its `__init__.py`)."""
    dirs = package_dirs()
    owned = {folder.resolve() for folder in dirs.values()}
    found: dict[str, Path] = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            # a folder mapped to a package of its own is that package's, not this one's
            if any((folder / Path(*parts[:i])).resolve() in owned for i in range(1, len(parts))):
                continue
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def layer(module: str) -> int:
    """The index in LAYERS of the layer holding `module`."""
    best, index = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    return index


def imports(module: str, path: Path, source: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported `tokenprobe` module, line) for every import in `source`, at any depth.

    `from P import n` counts as importing `P.n` when that is a module (`known`), else `P`.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) in {"import_module", "__import__"})):
            names = [node.args[0].value]
        found += [(name, node.lineno) for name in names
                  if name == "tokenprobe" or name.startswith("tokenprobe.")]
    return sorted(set(found), key=lambda item: (item[1], item[0]))


def violations(sources: dict[str, tuple[Path, str]], known: set[str] | None = None) -> list[str]:
    """Every import in `sources` (module -> (file, text)) of a higher layer than its module's."""
    known = set(sources) if known is None else known
    out = []
    for module, (path, source) in sorted(sources.items()):
        if module in EXEMPT:
            continue
        mine = layer(module)
        for name, line in imports(module, path, source, known):
            if layer(name) > mine:
                where = path.relative_to(ROOT) if path.is_absolute() else path
                out.append(f"{module} ({LAYERS[mine][0]}) -> {name} ({LAYERS[layer(name)][0]}) "
                           f"at {where}:{line}")
    return out


def sources() -> dict[str, tuple[Path, str]]:
    return {module: (path, path.read_text()) for module, path in modules().items()}


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer(m) < 0] == []


def test_no_import_points_up():
    found = violations(sources())
    print("\n".join(found))
    assert not found, "imports of a higher layer:\n" + "\n".join(found)


def test_the_check_can_fail():
    """Upward imports of every kind are reported; imports of the same or a lower layer are not."""
    fake = {
        "tokenprobe.kernels.fake": (Path("kernels/fake.py"),
                                    "def f():\n    import tokenprobe.app.dashboard\n"),
        "tokenprobe.models": (Path("tokenprobe/models.py"),
                              "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from tokenprobe.probes import make_probes\n"
                              "import importlib\nimportlib.import_module('tokenprobe.cli.main')\n"
                              "from tokenprobe.cli import args\nfrom tokenprobe import tokens\n"),
        "tokenprobe.probes.fake": (Path("probes/fake.py"),
                                   "from ..analyses import views\nfrom . import sinks\n"
                                   "from ..kernels import attention\n"),
        "tokenprobe.cli.args": (Path("tokenprobe/cli/args.py"), "from . import main\n"),
        "tokenprobe": (Path("tokenprobe/__init__.py"), "import tokenprobe.app.dashboard\n"),
    }
    known = {"tokenprobe.analyses.views", "tokenprobe.cli.args", "tokenprobe.cli.main",
             "tokenprobe.tokens", "tokenprobe.probes.sinks", "tokenprobe.kernels.attention"}
    assert violations(fake, known) == [
        "tokenprobe.cli.args (core) -> tokenprobe.cli.main (cli) at tokenprobe/cli/args.py:1",
        "tokenprobe.kernels.fake (kernels) -> tokenprobe.app.dashboard (app) at "
        "kernels/fake.py:2",
        "tokenprobe.models (core) -> tokenprobe.probes (probes) at tokenprobe/models.py:3",
        "tokenprobe.models (core) -> tokenprobe.cli.main (cli) at tokenprobe/models.py:5",
        "tokenprobe.probes.fake (probes) -> tokenprobe.analyses.views (analyses) at "
        "probes/fake.py:1",
    ]


def name_problems(found: dict[str, Path]) -> list[str]:
    """Imports of `tokenprobe` modules that do not exist, modules hidden by a package of the
    same name, and package names that one of its submodules would replace when imported."""
    known = set(found)
    problems = []
    for module, path in sorted(found.items()):
        source = path.read_text()
        for name, line in imports(module, path, source, known):
            if name not in known:
                problems.append(f"{module} imports {name}, which is no module, at "
                                f"{_relative(path)}:{line}")
        if path.name == "__init__.py":
            for sibling in sorted(path.parent.glob("*.py")):
                if (path.parent / sibling.stem / "__init__.py").exists():
                    problems.append(f"{_relative(sibling)} is hidden by the package "
                                    f"{sibling.stem}/ beside it")
            subs = {m.rpartition(".")[2] for m in known if m.rpartition(".")[0] == module}
            for name in sorted(bound_names(module, source) & subs):
                problems.append(f"{module} binds {name!r}, the name of its submodule "
                                f"{module}.{name}")
    return problems


def _relative(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def test_every_import_names_a_module_and_nothing_is_shadowed():
    """Every `tokenprobe` import names a module that exists; no folder holds both `x.py` and a
    package `x/` (the package would hide the module); and no package binds a name that is
    also one of its submodules (importing the submodule would replace it: a `main` function
    in `tokenprobe/cli/__init__.py` beside `tokenprobe.cli.main`, a lazy `tokenprobe.run`
    beside a `tokenprobe/run.py`)."""
    problems = name_problems(modules())
    assert not problems, "\n".join(problems)


def test_the_name_check_can_fail(tmp_path):
    files = {"cli/__init__.py": "def main():\n    pass\n", "cli/main.py": "",
             "cli/query.py": "", "cli/query/__init__.py": "",
             "cli/args.py": "from tokenprobe.cli.gone import x\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = {"tokenprobe.cli": tmp_path / "cli/__init__.py",
             "tokenprobe.cli.main": tmp_path / "cli/main.py",
             "tokenprobe.cli.query": tmp_path / "cli/query/__init__.py",
             "tokenprobe.cli.args": tmp_path / "cli/args.py"}
    assert name_problems(found) == [
        f"{tmp_path / 'cli/query.py'} is hidden by the package query/ beside it",
        "tokenprobe.cli binds 'main', the name of its submodule tokenprobe.cli.main",
        "tokenprobe.cli.args imports tokenprobe.cli.gone, which is no module, at "
        f"{tmp_path / 'cli/args.py'}:1",
    ]


def test_the_kernels_folder_does_not_shadow_hugging_faces_kernels():
    """Started in the clone's root, Python sees the folder kernels/ as a top-level `kernels`,
    the name of Hugging Face's package that transformers (>= 5.25) imports with its models.
    There, `import kernels` gives Hugging Face's package and tokenprobe's kernels still load."""
    code = ("import kernels, transformers.modeling_utils, tokenprobe.kernels.common as ours\n"
            "print(kernels.__file__); print(ours.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:  # no Hugging Face kernels: a clear error
        assert done.returncode != 0 and "tokenprobe.kernels" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr
    theirs, ours = done.stdout.split()
    assert Path(theirs).resolve() != ROOT / "kernels" / "__init__.py"
    assert Path(ours).resolve() == ROOT / "kernels" / "common.py"


def bound_names(package: str, source: str) -> set[str]:
    """Names a package's `__init__` binds at module level (its lazy `_EXPORTS` keys too),
    leaving out imports of its own submodules."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
            if any(getattr(t, "id", None) == "_EXPORTS" for t in targets) and isinstance(
                    node.value, ast.Dict):
                names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        elif isinstance(node, ast.Import):
            names |= {alias.asname or alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names |= {alias.asname or alias.name for alias in node.names
                      if f"{base}.{alias.name}" != f"{package}.{alias.asname or alias.name}"}
    return names
