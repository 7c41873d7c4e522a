"""The house's floors: train/ is layered by the stage of the run a module serves, and no module
imports from a floor above its own (so there is no circle between floors, and a reader can learn
the code bottom up). eval/, data_prep/ and bench/ sit above train/ and train/ never imports them."""
import ast
from pathlib import Path

from tests.conftest import ROOT

# bottom to top; train/args.py and train/fault_injection.py import nothing of the project
FLOORS = ["losses", "input", "models", "step", "kinds", "run"]
ABOVE_TRAIN = ("eval", "data_prep", "bench", "tests")


def floor(module: str) -> int:
    """train.<pkg>... -> its floor; the scripts (train.pretrain, train.finetune) are the top."""
    parts = module.split(".")
    if parts[1] in ("args", "fault_injection"):
        return -1
    if parts[1] in ("pretrain", "finetune"):
        return len(FLOORS)
    return FLOORS.index(parts[1])


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the project in a file, type-checking-only ones left out."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, m) for line, m in found if m.split(".")[0] in ("train", *ABOVE_TRAIN)]


def test_no_module_of_train_imports_from_a_floor_above_its_own():
    wrong = []
    for path in sorted((ROOT / "train").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module in ("train.__init__",) or module.endswith(".__init__") and module.count(".") == 1:
            continue
        mine = floor(module) if module.count(".") > 1 or module.split(".")[1] in ("args", "fault_injection",
                                                                                     "pretrain", "finetune") else None
        for line, target in imports(path):
            if target.split(".")[0] in ABOVE_TRAIN:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (above train/)")
            elif target != "train" and mine is not None and floor(target) > mine:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({FLOORS[mine] if mine >= 0 else 'base'}) imports "
                             f"{target} ({FLOORS[floor(target)] if floor(target) < len(FLOORS) else 'scripts'})")
    assert not wrong, "\n".join(wrong)


def test_train_has_no_flat_modules_but_the_scripts_and_two_seams():
    flat = sorted(p.name for p in (ROOT / "train").glob("*.py"))
    assert flat == ["__init__.py", "args.py", "fault_injection.py", "finetune.py", "pretrain.py"], flat


def test_the_flags_doc_is_made_from_the_parsers_and_current():
    """docs/flags.md is written by docs/make_flags.py from the scripts' parsers: after a flag changes,
    run it again (this test says so)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_flags", ROOT / "docs/make_flags.py")
    make_flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_flags)
    assert (ROOT / "docs/flags.md").read_text() == make_flags.flags_doc(), "run: python docs/make_flags.py"
