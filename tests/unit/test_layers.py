"""The shape of the house, checked from the source (every import statement, module level and inside functions):

- ``sd35fp8`` is layered one way, core → kernels → linear/model → runtime, io: a module imports only from its own
  layer or those below, and no import cycle exists between its modules;
- nothing in ``sd35fp8`` imports ComfyUI, the adapter, the benchmarks, the tests or the scripts;
- only ``nodes/`` imports ComfyUI, and nothing the nodes import (transitively) is a study or reads the environment.
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIB = "sd35fp8"
# layer of each part of the library (a module imports from its own layer or lower ones)
LAYERS = {"core": 0, "kernels": 1, "linear": 2, "model": 2, "runtime": 3, "io": 3, "integrations": 4}
COMFY = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server", "execution",
         "latent_preview", "node_helpers"}
REPO_TOOLS = {"bench", "tests", "scripts", "common", "tiny_sd35", "comfy_harness", "run_batch"}


def modules(root: str, package: str) -> dict[str, str]:
    """{dotted module name: file} of a package folder."""
    out = {}
    for d, _, files in os.walk(os.path.join(REPO, root)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.join(REPO, root))[:-3].replace(os.sep, ".")
                name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                out[name] = os.path.join(d, f)
    return out


def imports(name: str, path: str) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, relative ones resolved; ``from X import y`` gives
    ``X.y`` too (y may be a submodule)."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - node.level + 1]
                mod = ".".join(parent + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.append((mod, node.lineno))
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return out


def layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 99  # the package's __init__: the public API, above everything


def library_graph() -> dict[str, set[str]]:
    mods = modules(LIB, LIB)
    return {m: {i for i, _ in imports(m, p) if i in mods and i != m} for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_library_has_no_import_cycle():
    assert find_cycle(library_graph()) is None, " -> ".join(find_cycle(library_graph()))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_every_library_module_imports_only_its_own_layer_or_lower():
    bad = []
    for m, deps in library_graph().items():
        if m == LIB:
            continue
        bad += [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})" for d in deps
                if d != LIB and not d.startswith(m + ".") and layer(d) > layer(m)]
        bad += [f"{m} imports the package's public API ({LIB}/__init__.py): import the module itself"
                for d in deps if d == LIB]
    assert not bad, "\n".join(bad)


def test_the_layer_check_sees_function_level_and_relative_imports(tmp_path):
    f = tmp_path / "mod.py"
    f.write_text("def g():\n    from ..runtime.static import set_static\n    import comfy.sd\n")
    got = [i for i, _ in imports("sd35fp8.kernels.mod", str(f))]
    assert "sd35fp8.runtime.static" in got and "comfy.sd" in got
    assert layer("sd35fp8.runtime.static") > layer("sd35fp8.kernels.mod")


@pytest.mark.parametrize("forbidden,what", [(COMFY, "ComfyUI"), (REPO_TOOLS, "the repository's tools")])
def test_the_library_imports_neither_comfyui_nor_the_repositorys_tools(forbidden, what):
    bad = [f"{os.path.relpath(p, REPO)}:{line} imports {i}" for m, p in modules(LIB, LIB).items()
           for i, line in imports(m, p) if i.split(".")[0] in forbidden]
    assert not bad, f"{what} imported by the library:\n" + "\n".join(bad)


def test_the_service_package_is_pure_python():
    """service/ (request checks, configuration, workflow mapping) is shared by the batch client outside ComfyUI:
    no ComfyUI, no torch, no aiohttp, none of the repository's tools."""
    bad = [f"{os.path.relpath(p, REPO)}:{line} imports {i}" for m, p in modules("service", "service").items()
           for i, line in imports(m, p) if i.split(".")[0] in COMFY | REPO_TOOLS | {"torch", "aiohttp", "sd35fp8"}]
    assert not bad, "\n".join(bad)
    assert len(modules("service", "service")) >= 3


def test_only_the_adapter_imports_comfyui_and_it_reaches_no_study():
    """The pack's own code outside nodes/ (its __init__ and the library) imports no ComfyUI; whatever the nodes
    import, followed through the library, is product code: no bench/ study, no tests, and no module of it reads the
    environment (the experiments' routes were environment variables)."""
    pack = {**modules("nodes", "pack.nodes"), **modules(LIB, LIB)}
    init = os.path.join(REPO, "__init__.py")
    assert not [i for i, _ in imports("pack", init) if i.split(".")[0] in COMFY - {"nodes"}]
    seen, todo = set(), [m for m in pack if m.startswith("pack.nodes")]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for i, _ in imports(m, pack[m]):
            root = i.split(".")[0]
            assert root not in REPO_TOOLS, f"{m} reaches {i}"
            if i in pack:
                todo.append(i)
    assert any(m.startswith(LIB + ".kernels") for m in seen) and "pack.nodes.schemas" in seen
    env = [m for m in seen if "os.environ" in open(pack[m], encoding="utf-8").read()
           or "getenv(" in open(pack[m], encoding="utf-8").read()]
    assert not env, f"product modules reading the environment: {env}"
    assert not os.path.exists(os.path.join(REPO, LIB, "gluon_int8.py"))
