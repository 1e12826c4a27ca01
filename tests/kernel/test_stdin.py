"""input() and getpass in the guest reach the frontend through input_request (when allowed)."""
from __future__ import annotations

from .harness import stdout_of


def test_input_roundtrip(kernel):
    prompts = []

    def answer(req):
        prompts.append(req["content"])
        return "forty-two"

    reply, outputs = kernel.execute("x = input('name? ')\nprint('got', x)", allow_stdin=True,
                                    on_input=answer)
    assert reply["status"] == "ok", reply
    assert prompts == [{"prompt": "name? ", "password": False}]
    assert "got forty-two" in stdout_of(outputs)


def test_getpass_is_a_password_request(kernel):
    prompts = []

    def answer(req):
        prompts.append(req["content"])
        return "s3cret"

    reply, outputs = kernel.execute("import getpass\nprint(len(getpass.getpass('pw: ')))",
                                    allow_stdin=True, on_input=answer)
    assert reply["status"] == "ok", reply
    assert prompts[0]["password"] is True
    assert stdout_of(outputs).strip() == "6"


def test_input_without_stdin_raises(kernel):
    reply, outputs = kernel.execute("input('x')", allow_stdin=False)
    assert reply["status"] == "error"
    assert reply["ename"] == "StdinNotImplementedError"
    assert "does not support input requests" in reply["evalue"]


def test_several_inputs_in_one_cell(kernel):
    answers = iter(["1", "2", "3"])
    reply, outputs = kernel.execute("print(sum(int(input()) for _ in range(3)))",
                                    allow_stdin=True, on_input=lambda req: next(answers))
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs).strip() == "6"
