"""How far a pipeline's whole config travels: follow `cfg` from a pipeline's entry point through every
call that hands it on whole, and list the functions (and classes) outside the entry module that
receive it. Each is a climb back up: a reader there must return to the pipeline to know which of the
config's sections matter. A component that takes its own section or plain values ends the walk.

    python tools/config_walk.py                        # both walks (distill, evaluate), a line per climb
    python tools/config_walk.py opcd.pipelines.evaluate:run_evaluate --quiet

Read from the source with `ast` (nothing is imported or run). Calls are resolved through the module's
own definitions and its `from opcd... import name` lines, `Class(...)` to `Class.__init__`, and
`Class.method(...)` / `self.method(...)` within the package; a config handed on under another name
(`config=cfg`) is followed under the callee's parameter name. Stored configs (`self.cfg = cfg`) are
followed through the class's methods.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "opcd"
WALKS = ("opcd.pipelines.distill:run_distill", "opcd.pipelines.evaluate:run_evaluate")


@dataclass
class Module:
    name: str
    path: Path
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)  # "f" and "Class.method"
    classes: set[str] = field(default_factory=set)
    imported: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (module, name)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_package() -> dict[str, Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        module = Module(_module_name(path), path)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                module.functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                module.classes.add(node.name)
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        module.functions[f"{node.name}.{item.name}"] = item
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opcd"):
                for alias in node.names:
                    module.imported[alias.asname or alias.name] = (node.module, alias.name)
        modules[module.name] = module
    return modules


def _resolve(modules: dict[str, Module], module: Module, call: ast.Call, klass: str | None):
    """(module, function key) of the callee, or None outside the package."""
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        owner, attr = func.value.id, func.attr
        if owner == "self" and klass and f"{klass}.{attr}" in module.functions:
            return module, f"{klass}.{attr}"
        if owner in module.classes and f"{owner}.{attr}" in module.functions:
            return module, f"{owner}.{attr}"
        target = module.imported.get(owner)
        if target:
            source, name = target
            if f"{source}.{name}" in modules:  # `from opcd.x import mod` then mod.f(...)
                found = modules[f"{source}.{name}"]
                return (found, attr) if attr in found.functions else None
            found = modules.get(source)
            if found and f"{name}.{attr}" in found.functions:
                return found, f"{name}.{attr}"
        return None
    if not isinstance(func, ast.Name):
        return None
    name = func.id
    if name in module.functions:
        return module, name
    if name in module.classes:
        return (module, f"{name}.__init__") if f"{name}.__init__" in module.functions else None
    target = module.imported.get(name)
    while target and target[0] in modules and target[1] in modules[target[0]].imported:  # a package's re-export
        target = modules[target[0]].imported[target[1]]
    if not target or target[0] not in modules:
        return None
    found, original = modules[target[0]], target[1]
    if original in found.functions:
        return found, original
    if original in found.classes and f"{original}.__init__" in found.functions:
        return found, f"{original}.__init__"
    return None


def _parameter(func: ast.FunctionDef, call: ast.Call, config: str) -> str | None:
    """The callee's parameter that receives the name `config` in `call`."""
    params = [a.arg for a in func.args.posonlyargs + func.args.args]
    bound = any(isinstance(d, ast.Name) and d.id in ("classmethod",) for d in func.decorator_list)
    if params and params[0] in ("self", "cls") or bound:
        params = params[1:]
    for index, arg in enumerate(call.args):
        if isinstance(arg, ast.Name) and arg.id == config and index < len(params):
            return params[index]
    for keyword in call.keywords:
        if isinstance(keyword.value, ast.Name) and keyword.value.id == config and keyword.arg:
            return keyword.arg
    return None


def _stored_as(func: ast.FunctionDef, config: str) -> str | None:
    """`self.<attr> = config` in a method: the attribute the class keeps it under."""
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id == config:
            for target in node.targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                    return target.attr
    return None


def walk(entry: str, modules: dict[str, Module]) -> list[tuple[str, str, str]]:
    """(module, function, parameter) of every function that receives the whole config, entry first."""
    module_name, function = entry.split(":")
    start = modules[module_name]
    func = start.functions[function]
    config = next(a.arg for a in func.args.args if a.arg in ("cfg", "config"))
    seen, order, todo = set(), [], [(start, function, config)]
    while todo:
        module, key, name = todo.pop(0)
        if (module.name, key) in seen:
            continue
        seen.add((module.name, key))
        order.append((module.name, key, name))
        func = module.functions[key]
        klass = key.split(".")[0] if "." in key else None
        stored = _stored_as(func, name) if klass else None
        if stored:  # every method of the class reads it as self.<stored>
            for other in module.functions:
                if other.startswith(f"{klass}.") and other != key:
                    todo.append((module, other, f"self.{stored}"))
        for node in ast.walk(func):
            if not isinstance(node, ast.Call):
                continue
            if name.startswith("self."):
                hands_on = any(ast.unparse(a) == name for a in [*node.args, *(k.value for k in node.keywords)])
                if not hands_on:
                    continue
                probe = ast.Call(node.func, [ast.Name("__cfg__") if ast.unparse(a) == name else a for a in node.args],
                                 [ast.keyword(k.arg, ast.Name("__cfg__") if ast.unparse(k.value) == name else k.value)
                                  for k in node.keywords])
                target, local = _resolve(modules, module, node, klass), "__cfg__"
                call = probe
            else:
                target, local, call = _resolve(modules, module, node, klass), name, node
            if target is None:
                continue
            callee_module, callee = target
            param = _parameter(callee_module.functions[callee], call, local)
            if param:
                todo.append((callee_module, callee, param))
    return order


def climbs(order: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    entry_module = order[0][0]
    return [step for step in order if step[0] != entry_module]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("entries", nargs="*", default=list(WALKS), help="module:function (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="only the counts")
    args = parser.parse_args(argv)
    modules = read_package()
    for entry in args.entries:
        found = climbs(walk(entry, modules))
        files = sorted({m for m, _, _ in found})
        print(f"{entry}: {len(found)} climbs back up, {len(files)} files")
        if not args.quiet:
            for module, function, param in found:
                print(f"    {module}:{function} ({param})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
