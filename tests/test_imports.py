"""The package's layering, read from the source with `ast` (every import, also those inside functions):
a few modules at the top and the rest in districts; pure pieces never reach up to Ray, workers or
pipelines; the loss and data districts stand on nothing above them; games and tasks stand on the pure
bottom only; pipelines share through their set-up modules (run_setup, domain_setup, worker_setup), never
through each other's helpers; building a domain and building worker groups stay apart;
no import cycle; the seed formulas and the dataset/game switch exist once; one scorer for every model
worker."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "opcd"

# The driver and worker sides: everything else is a pure piece.
NOT_PURE = ("opcd.cli", "opcd.trainer", "opcd.pipelines", "opcd.workers", "opcd.rollout",
            "opcd.runtime.raywatch")  # raywatch: the driver's edge that stops Ray's agents after a SIGKILL
UPWARD = ("ray", "opcd.workers", "opcd.rollout", "opcd.pipelines", "opcd.trainer", "opcd.cli")
# What games/ and tasks/ may import from the rest of opcd besides their own package.
BOTTOM = ("opcd.errors", "opcd.protocol", "opcd.data")
# The districts of the package and the top-level modules; anything new finds its place in one of them.
DISTRICTS = {"config", "data", "domains", "games", "loss", "pipelines", "rollout", "runs", "runtime", "tasks",
             "workers", "conf"}
TOP_LEVEL_MODULES = {"__init__", "cli", "errors", "metrics", "models", "protocol", "trainer"}
# What the pipelines share: a training run's set-up, what builds a domain, what builds worker groups.
SHARED_PIPELINE_MODULES = ("opcd.pipelines.run_setup", "opcd.pipelines.domain_setup", "opcd.pipelines.worker_setup")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import in the file; `from opcd.loss import kl` counts
    as an import of the module opcd.loss.kl."""
    found = []
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(base, alias.name) for alias in node.names]
    return found


def _targets(path: Path, modules: dict[str, Path]) -> set[str]:
    """The opcd modules (and `ray`) a file imports."""
    out = set()
    for module, name in _imports(path):
        if name is not None and f"{module}.{name}" in modules:
            out.add(f"{module}.{name}")
        elif module in modules or module.split(".")[0] == "ray":
            out.add(module if module in modules else "ray")
    return out


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_a_few_modules_at_the_top_and_the_rest_in_districts():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert top == TOP_LEVEL_MODULES
    assert folders == DISTRICTS


def test_the_loss_and_the_data_stand_on_nothing_above_them():
    """opcd/loss is pure tensor math (torch only); opcd/data imports only itself and the error types."""
    modules = _modules()
    for district, allowed in (("opcd.loss", ("opcd.loss",)), ("opcd.data", ("opcd.data", "opcd.errors"))):
        for m, p in modules.items():
            if _within(m, (district,)):
                assert {t for t in _targets(p, modules) if t != "opcd" and not _within(t, allowed)} == set(), m


def test_pure_pieces_never_import_ray_workers_or_pipelines():
    modules = _modules()
    bad = {m: sorted(t for t in _targets(p, modules) if _within(t, UPWARD))
           for m, p in modules.items() if not _within(m, NOT_PURE)}
    assert not {m: t for m, t in bad.items() if t}


def test_games_and_tasks_stand_on_the_pure_bottom_only():
    modules = _modules()
    bad = {}
    for m, p in modules.items():
        for own in ("opcd.games", "opcd.tasks"):
            if _within(m, (own,)):
                wrong = [t for t in _targets(p, modules) if t != "opcd" and not _within(t, (own, *BOTTOM))]
                if wrong:
                    bad[m] = sorted(wrong)
    assert not bad


def test_rows_do_not_import_tasks():
    assert not [t for t in _targets(PACKAGE / "data" / "rows.py", _modules()) if _within(t, ("opcd.tasks",))]


def test_only_pipelines_and_the_cli_import_pipelines():
    modules = _modules()
    bad = [m for m, p in modules.items() if not _within(m, ("opcd.pipelines", "opcd.cli"))
           and any(_within(t, ("opcd.pipelines",)) for t in _targets(p, modules))]
    assert not bad


def test_pipelines_share_only_through_the_setup_modules_and_public_entry_points():
    """A pipeline may import anything public from the set-up modules, and another pipeline's `run_*`
    entry point; never another pipeline's helper."""
    bad = []
    for path in sorted((PACKAGE / "pipelines").glob("*.py")):
        for module, name in _imports(path):
            if not _within(module, ("opcd.pipelines",)) or module == _module_name(path):
                continue
            if name is not None and name.startswith("_"):
                bad.append(f"{path.name}: {module}.{name}")
            elif module not in SHARED_PIPELINE_MODULES and not (name or "").startswith("run_"):
                bad.append(f"{path.name}: {module}.{name}")
    assert not bad


def test_building_a_domain_and_building_worker_groups_stay_apart():
    """The domain (data, contexts, games) is built on the driver without Ray or a worker; the worker
    groups are built from specs and a finished domain, without reaching into data, tasks or games."""
    modules = _modules()
    domain = _targets(modules["opcd.pipelines.domain_setup"], modules)
    assert not [t for t in domain if _within(t, ("ray", "opcd.workers", "opcd.rollout", "opcd.pipelines"))]
    workers = _targets(modules["opcd.pipelines.worker_setup"], modules)
    assert not [t for t in workers if _within(t, ("opcd.data", "opcd.tasks", "opcd.games", "opcd.pipelines"))]
    assert "opcd.workers.group" in workers and "opcd.domains.dataset" in domain


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {t for t in _targets(p, modules) if t in modules and t != m and t != "opcd"}
             for m, p in modules.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles


def test_seed_formulas_exist_once():
    """Off-policy data matches an on-policy run only while every pipeline derives its seeds the same
    way: the constants live in opcd/data/seeds.py alone."""
    pattern = re.compile(r"1_?000_?003|\b7_?919\b")
    found = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert found == ["data/seeds.py"]


def test_datasets_and_games_part_in_one_place():
    """The game task's name is written once (config.schema.GAME_TASK); the pipelines part on it in
    domain_setup alone (the domain), and the run folder only to know that game settings do not matter to
    datasets."""
    named = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if re.search(r"""["']textgame["']""", p.read_text()))
    assert named == ["config/schema.py"]
    decided = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if re.search(r"GAME_TASK\b(?! =)", p.read_text()) and not p.is_relative_to(PACKAGE / "config"))
    assert decided == ["pipelines/domain_setup.py", "runs/folder.py"]


def test_one_scorer_for_the_student_and_every_frozen_model():
    """How log-probs at a support are computed (chunked head or full logits, packed or padded) is
    decided in workers/scoring.py alone: both model workers use it, nothing else reaches its parts."""
    modules = _modules()
    for worker in ("opcd.workers.student", "opcd.workers.frozen"):
        assert "opcd.workers.scoring" in _targets(modules[worker], modules)
    users = {part: sorted(m for m, p in modules.items() if part in _targets(p, modules))
             for part in ("opcd.workers.lm_head", "opcd.loss.chunked")}
    assert users == {"opcd.workers.lm_head": ["opcd.workers.scoring"], "opcd.loss.chunked": ["opcd.workers.scoring"]}


def test_the_rules_see_real_imports():
    """The checks above would pass on an empty graph: make sure they read what is there."""
    modules = _modules()
    assert "opcd.pipelines.run_setup" in _targets(modules["opcd.pipelines.distill"], modules)
    assert "opcd.loss.kl" in _targets(modules["opcd.loss.objective"], modules)  # `from opcd.loss import kl`
    assert "ray" in _targets(modules["opcd.workers.group"], modules)


def _config_walk():
    import importlib.util
    import sys

    path = PACKAGE.parent / "tools" / "config_walk.py"
    spec = importlib.util.spec_from_file_location("config_walk", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_pipelines_config_climbs_back_up_at_most_six_times():
    """Components take their own config section or plain values: the whole config reaches few places
    outside a pipeline (tools/config_walk.py lists them)."""
    walker = _config_walk()
    modules = walker.read_package()
    for entry in walker.WALKS:
        found = walker.climbs(walker.walk(entry, modules))
        assert len(found) <= 6, (entry, found)
    # the walk sees real hand-overs: the domain is built from the whole config, a worker spec holds its sections
    evaluate = {f"{m}:{f}" for m, f, _ in walker.climbs(walker.walk("opcd.pipelines.evaluate:run_evaluate", modules))}
    assert {"opcd.pipelines.domain_setup:make_domain", "opcd.workers.spec:WorkerSpec.from_config"} <= evaluate
    distill = {f"{m}:{f}" for m, f, _ in walker.climbs(walker.walk("opcd.pipelines.distill:run_distill", modules))}
    assert "opcd.config.limits:check_model_limits" in distill  # found through the package's re-export
