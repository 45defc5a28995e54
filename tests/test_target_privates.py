"""targets/ uses the vault's and common's public names only: nothing private of another
package of ours is imported, and no attribute of ours beginning with '_' is reached
through anything but ``self`` or ``cls`` (the Azure SDK's own internals are the SDK's)."""

from __future__ import annotations

import ast

from tests.helpers import REPO

OURS = ("vault", "common", "wire", "configserver", "procserver", "mobility", "siterecovery")
# Attributes of the Azure SDK's generated models and request builders, read on purpose
# (targets/armtemplate.py says why): not ours.
SDK = {"_attr_to_rest_field", "_rest_name", "_visibility", "_operations"}


def test_targets_use_no_private_name_of_another_package() -> None:
    found: list[str] = []
    for path in sorted((REPO / "targets").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in OURS:
                found += [f"{where}: from {node.module} import {a.name}"
                          for a in node.names if a.name.startswith("_")]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in SDK
                    and not (isinstance(node.value, ast.Name)
                             and node.value.id in ("self", "cls"))):
                found.append(f"{where}: {ast.unparse(node)}")
    assert found == []
