"""The handler map in supermachine_kernel/kernel/__init__.py agrees with the code: every message
ipykernel dispatches for our kernel and every guest frame type is listed, and every function the
map names is defined in the file it names and is the one that handles the message."""
from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import ipykernel
import pytest
from ipykernel.kernelbase import Kernel

import supermachine_kernel
from supermachine_kernel.kernel import ui_channel
from supermachine_kernel.kernel.microvm import MicroVMKernel
from supermachine_kernel.repl_client import frames

PACKAGE = Path(supermachine_kernel.__file__).parent
IPYKERNEL = Path(ipykernel.__file__).parent
ROW = re.compile(r"^\s{4}(?P<name>\w+)\s+(?P<first>\S+)(?:\s+->\s+(?P<then>\S+))?\s*$")
# Made by the guest REPL client (repl_client/client.py), not sent by the guest.
CLIENT_EVENTS = {"died", "invalid"}
STDIN_MESSAGES = {"input_reply"}


def _sections() -> dict[str, dict[str, tuple[str, str | None]]]:
    doc = (PACKAGE / "kernel" / "__init__.py").read_text()
    tree = ast.parse(doc)
    assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr), \
        "kernel/__init__.py must hold its docstring only (the entry imports the package first)"
    text = ast.get_docstring(tree, clean=False) or ""
    sections: dict[str, dict[str, tuple[str, str | None]]] = {}
    current: dict[str, tuple[str, str | None]] | None = None
    for line in text.splitlines():
        if line.startswith("Jupyter messages"):
            current = sections.setdefault("jupyter", {})
        elif line.startswith("Guest REPL frames"):
            current = sections.setdefault("guest", {})
        elif line.startswith("Host requests to the guest REPL"):
            current = sections.setdefault("requests", {})
        elif line.startswith("UI channel requests"):
            current = sections.setdefault("ui", {})
        elif current is not None and (m := ROW.match(line)):
            assert m["name"] not in current, f"{m['name']} is listed twice"
            current[m["name"]] = (m["first"], m["then"])
    assert set(sections) == {"jupyter", "guest", "requests", "ui"}, \
        "the map's four headings are missing"
    return sections


MAP = _sections()


def _file(target: str) -> Path:
    path, _, _ = target.partition(":")
    if path.startswith("ipykernel/"):
        return IPYKERNEL / path.removeprefix("ipykernel/")
    return PACKAGE / path


def _definition(target: str) -> ast.AST:
    """The def of `path:Class.method` / `path:function` in that file's source."""
    path, _, qualname = target.partition(":")
    file = _file(target)
    assert file.is_file(), f"{target}: no file {file}"
    scope: ast.AST = ast.parse(file.read_text())
    for part in qualname.split("."):
        found = [n for n in ast.iter_child_nodes(scope)
                 if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == part]
        assert found, f"{target}: {file} defines no {part}"
        scope = found[-1]
    return scope


def _source(target: str) -> str:
    return ast.get_source_segment(_file(target).read_text(), _definition(target)) or ""


def _dispatched() -> set[str]:
    kernel = MicroVMKernel()
    return set(kernel.shell_handlers) | set(kernel.control_handlers)


def test_every_dispatched_message_and_guest_frame_is_mapped():
    assert set(MAP["jupyter"]) == _dispatched() | STDIN_MESSAGES
    assert set(MAP["guest"]) == frames.EVENT_TYPES | CLIENT_EVENTS


@pytest.mark.parametrize("section,name", [(s, n) for s in MAP for n in MAP[s]])
def test_mapped_functions_exist_where_the_map_says(section, name):
    first, then = MAP[section][name]
    _definition(first)
    if then is not None:
        _definition(then)
        called = then.partition(":")[2].rpartition(".")[2]
        assert called in _file(first).read_text(), \
            f"{name}: {first} does not lead to {then} ({called} is not used in its file)"


@pytest.mark.parametrize("msg_type", sorted(_dispatched()))
def test_the_mapped_function_is_the_one_ipykernel_dispatches_to(msg_type):
    first, _ = MAP["jupyter"][msg_type]
    handler = getattr(MicroVMKernel, msg_type)
    handler_file = Path(inspect.getsourcefile(handler) or "")
    handler_target = f"{handler.__qualname__}"
    if handler_file.is_relative_to(PACKAGE):
        # Our own handler: the map names it.
        assert first == f"{handler_file.relative_to(PACKAGE)}:{handler_target}"
        return
    assert handler_file.is_relative_to(IPYKERNEL), handler_file
    path, _, qualname = first.partition(":")
    if path.startswith("ipykernel/"):
        # ipykernel answers it unchanged: nothing of ours may take part.
        assert first == f"ipykernel/{handler_file.relative_to(IPYKERNEL)}:{handler_target}"
        hooks = re.findall(r"self\.(\w+)\(", inspect.getsource(handler))
        ours = [h for h in hooks if getattr(MicroVMKernel, h, None) is not getattr(Kernel, h, None)]
        assert not ours, f"{msg_type}: the map says ipykernel's, but it calls our {ours}"
        return
    # ipykernel's handler, calling a hook of ours: the map names that hook.
    cls, _, hook = qualname.partition(".")
    assert cls == MicroVMKernel.__name__
    assert re.search(rf"self\.{hook}\(", inspect.getsource(handler)), \
        f"{msg_type}: ipykernel's {handler_target} does not call {hook}"
    ours = getattr(MicroVMKernel, hook)
    assert Path(inspect.getsourcefile(ours) or "") == PACKAGE / path
    assert ours.__qualname__ == qualname


@pytest.mark.parametrize("kind", sorted(frames.EVENT_TYPES | CLIENT_EVENTS))
def test_the_mapped_function_handles_the_guest_frame(kind):
    first, then = MAP["guest"][kind]
    # The type is named in the handler's module (the relay groups them in constants).
    assert f'"{kind}"' in _file(first).read_text(), f"{first} does not name {kind!r}"
    if then is not None:
        assert then.rpartition(".")[2] in _source(first)


# Read by the guest's frame reader or its serve loop, not by a do_<type> method.
GUEST_LOOP_REQUESTS = {"input_reply", "shutdown"}


def _guest_request_handlers() -> dict[str, str]:
    """request type -> the Driver method that handles it (do_<type>, or what it aliases)."""
    tree = ast.parse((PACKAGE / "guest" / "repl.py").read_text())
    driver = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Driver")
    handlers = {n.name[3:]: n.name for n in driver.body
                if isinstance(n, ast.FunctionDef) and n.name.startswith("do_")}
    for n in driver.body:
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Name):
            for target in n.targets:
                if isinstance(target, ast.Name) and target.id.startswith("do_"):
                    handlers[target.id[3:]] = n.value.id
    return handlers


def test_every_guest_request_type_is_mapped_to_its_handler():
    handlers = _guest_request_handlers()
    assert set(MAP["requests"]) == set(handlers) | GUEST_LOOP_REQUESTS
    for kind, method in handlers.items():
        assert MAP["requests"][kind][0] == f"guest/repl.py:Driver.{method}", kind
    for kind in GUEST_LOOP_REQUESTS:
        assert f'"{kind}"' in _source(MAP["requests"][kind][0]), kind


def test_every_ui_channel_request_is_mapped_to_the_magic_it_runs():
    assert set(MAP["ui"]) == set(ui_channel.REQUESTS)
    for request, (first, then) in MAP["ui"].items():
        assert first == "kernel/ui_channel.py:UiChannel._on_message"
        if request == "refresh":
            continue
        data = {"request": request, "ref": "s1", "name": "s1", "new_name": "s2"}
        name, _ = ui_channel.magic_line(data)
        assert then == f"magics/{name}.py:magic", request
