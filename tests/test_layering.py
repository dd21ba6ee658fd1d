"""The folders show the architecture: docs/DESIGN.md's map matches the tree, its file:function
references exist, and the import rules it states hold."""
import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DESIGN = REPO / "docs" / "DESIGN.md"
CODE_ROOTS = ("kfac_mn", "models", "utils", "scripts", "tests")


def python_files(folder):
    return sorted(path for path in (REPO / folder).rglob("*.py")
                  if "__pycache__" not in path.parts)


def imported_modules(path):
    """Every module ``path`` imports (absolute names; ``from a import b`` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def under(module, package):
    return module == package or module.startswith(package + ".")


def violations(folder, forbidden):
    return sorted((str(path.relative_to(REPO)), module)
                  for path in python_files(folder) for module in imported_modules(path)
                  if any(under(module, package) for package in forbidden))


def test_design_map_names_every_package_folder_and_only_those():
    rows = re.findall(r"^\| `([\w/]+/)` \|", DESIGN.read_text(), re.MULTILINE)
    folders = {str(path.parent.relative_to(REPO)) + "/"
               for root in CODE_ROOTS for path in python_files(root)}
    assert len(rows) == len(set(rows)), "a package appears twice in the map"
    assert set(rows) == folders, (f"in the map, not in the tree: {sorted(set(rows) - folders)}; "
                                  f"in the tree, not in the map: {sorted(folders - set(rows))}")


def test_design_references_name_existing_functions():
    references = set(re.findall(r"`([\w/]+\.py):([\w.]+)`", DESIGN.read_text()))
    assert len(references) >= 15
    for file, name in sorted(references):
        tree = ast.parse((REPO / file).read_text())
        scope = tree.body
        for part in name.split("."):
            found = [node for node in scope
                     if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == part]
            assert found, f"docs/DESIGN.md names {file}:{name}, which does not exist"
            scope = found[0].body


@pytest.mark.parametrize("folder, forbidden", [
    ("kfac_mn", ("utils", "models", "scripts", "tests", "train_imagenet")),
    ("kfac_mn/fisher", ("kfac_mn.communicators", "kfac_mn.distributed",
                        "kfac_mn.optimizers")),
    ("kfac_mn/communicators", ("kfac_mn.fisher", "kfac_mn.distributed", "kfac_mn.optimizers")),
    ("kfac_mn/distributed", ("kfac_mn.communicators", "kfac_mn.optimizers")),
])
def test_import_rules(folder, forbidden):
    assert violations(folder, forbidden) == []


def test_no_script_imports_another_and_no_test_loads_a_script():
    scripts = tuple(path.stem for path in python_files("scripts"))
    assert violations("scripts", scripts) == []
    assert violations("tests", scripts + ("scripts",)) == []
    loaders = re.compile(r"spec_from_file_location|runpy|exec_module|"
                         r"sys\.path\.insert\([^)]*scripts")
    for root in ("tests", "scripts"):
        for path in python_files(root):
            if path.name == "test_layering.py":
                continue
            assert not loaders.search(path.read_text()), f"{path} loads a script file"


def test_one_synchronisation_and_one_kernel_applicability_test():
    library = {str(path.relative_to(REPO)): path.read_text() for path in python_files("kfac_mn")}
    syncing = sorted(name for name, text in library.items()
                     if re.search(r"(?<!backend)\.synchronize\(", text))
    assert syncing == ["kfac_mn/backend.py"]
    deciding = sorted(name for name, text in library.items() if "KERNEL_DTYPES" in text)
    assert deciding == ["kfac_mn/cuda_kernels.py"]


def test_the_open_mpi_run_covers_every_test_file_that_starts_mpiexec():
    starts = re.compile(r"run_mpi\(|mpi_command\(|run_training\(|run_test_arch\(|"
                        r"run_under_mpiexec|find_mpiexec\(")
    launching = sorted(f"tests/{path.name}" for path in python_files("tests")
                       if path.parent.name == "tests" and path.name != "test_layering.py"
                       and starts.search(path.read_text()))
    script = (REPO / "scripts" / "test_openmpi.sh").read_text()
    listed = sorted(script.split('FILES="', 1)[1].split('"', 1)[0].split())
    assert listed == launching
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith(
        "python -m pytest -q && bash scripts/test_openmpi.sh")
