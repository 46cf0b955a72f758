"""The product's rule on outside libraries: each is imported in one module, so an upgrade or a
swap touches one file. numpy is the exception by design (arrays are the engine's common
currency), and telegram belongs to the bot package as a whole. Tests, benchmarks and their
support code may use any library to make fixtures."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_PACKAGES = ("indexer", "bot")
EVERYWHERE = frozenset({"numpy"})


def imported_libraries(source: Path) -> set[str]:
    """Top-level names of the outside libraries ``source`` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - set(PRODUCT_PACKAGES) - {"__future__"}


def importers_by_library() -> dict[str, list[str]]:
    importers: dict[str, list[str]] = defaultdict(list)
    for package in PRODUCT_PACKAGES:
        for source in sorted((ROOT / package).rglob("*.py")):
            for library in imported_libraries(source):
                importers[library].append(source.relative_to(ROOT).as_posix())
    return importers


def test_each_outside_library_is_imported_in_one_product_module() -> None:
    importers = importers_by_library()
    telegram_users = importers.pop("telegram", [])
    shared = {
        library: modules
        for library, modules in importers.items()
        if len(modules) > 1 and library not in EVERYWHERE
    }

    assert not shared, shared
    assert all(module.startswith("bot/") for module in telegram_users), telegram_users
    assert importers["PIL"] == ["indexer/pictures.py"]
    assert importers["cv2"] == ["indexer/features.py"]
