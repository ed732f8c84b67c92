"""The rooms of dft_ds/ import only rooms to their left in the order of the architecture table
(README, "Architecture"), so there is no import circle; entry points sit on top and no room
imports one. Imports inside functions count as much as those at the top of a file."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dft_ds")
# Left to right: a room may import only rooms before it.
ROOMS = ["errors", "faults", "net", "loss", "translate", "config", "batch", "config_docs", "hub", "synthetic", "families", "metrics",
         "data", "tokenised", "model", "deepspeed_setup", "procgroup", "ds_config", "schedule", "sequence_parallel", "engine",
         "checkpoint", "rundir", "memory", "runplan", "trainer", "adapter", "convert", "eval", "sample"]
# Command-line entry points: they may import any room, and no room imports them.
ENTRY_POINTS = ["plan", "launch", "train"]


def room_of(module: str) -> str:
    """dft_ds.eval.grading -> eval; dft_ds.checkpoint -> checkpoint."""
    return module.split(".")[1]


def imports_of(path: str, module: str) -> set[str]:
    """Every dft_ds module a file imports, anywhere in it."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module.rsplit(".", 1)[0] if not path.endswith("__init__.py") else module
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dft_ds."))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base == "dft_ds":  # from dft_ds import synthetic
                found.update(f"dft_ds.{a.name}" for a in node.names)
            elif base.startswith("dft_ds."):
                found.add(base)
    return found


def modules():
    for dirpath, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__")


def edges() -> list[tuple[str, str]]:
    out = []
    for path, module in modules():
        if module == "dft_ds":
            continue
        for target in imports_of(path, module):
            if room_of(target) != room_of(module):
                out.append((room_of(module), room_of(target)))
    return sorted(set(out))


def test_every_module_is_a_named_room_or_entry_point():
    rooms = {room_of(m) for _, m in modules() if m != "dft_ds"}
    assert rooms - set(ROOMS) - set(ENTRY_POINTS) == set()


@pytest.mark.parametrize("source, target", edges())
def test_imports_point_left(source, target):
    if source in ENTRY_POINTS:
        assert target not in ENTRY_POINTS or ENTRY_POINTS.index(target) < ENTRY_POINTS.index(source), \
            f"entry point {source} imports entry point {target}"
        return
    assert target not in ENTRY_POINTS, f"room {source} imports the entry point {target}"
    assert ROOMS.index(target) < ROOMS.index(source), f"{source} imports {target}, which stands to its right"


def test_the_checker_sees_function_level_imports(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from dft_ds.train import main\n    from dft_ds import engine\n")
    assert imports_of(str(path), "dft_ds.x") == {"dft_ds.train", "dft_ds.engine"}
