"""jupyter_kernel_test conformance for the microVM kernel, every optional sample filled in."""
from __future__ import annotations

import unittest

import jupyter_kernel_test as jkt
from jupyter_client.manager import start_new_kernel

from .harness import KERNEL, SLOW, START_TIMEOUT

jkt.TIMEOUT = int(15 * SLOW)


class MicroVMKernelConformance(jkt.KernelTests):
    kernel_name = KERNEL
    language_name = "python"
    file_extension = ".py"

    @classmethod
    def setUpClass(cls) -> None:
        cls.km, cls.kc = start_new_kernel(kernel_name=cls.kernel_name,
                                          startup_timeout=START_TIMEOUT)

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('oops', file=sys.stderr)"

    completion_samples = [
        {"text": "zi", "matches": {"zip"}},
        {"text": "import collections; collections.OrderedD", "matches": {"OrderedDict"}},
    ]

    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2", "for i in range(3):"]
    invalid_code_samples = ["import = 7q", ")"]

    code_page_something = "zip?"

    code_generate_error = "raise ValueError('boom')"

    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
        {"code": "from IPython.display import HTML; HTML('<b>hi</b>')", "mime": "text/html"},
    ]

    code_display_data = [
        {"code": "from IPython.display import display, HTML; display(HTML('<b>x</b>'))",
         "mime": "text/html"},
        {"code": "from IPython.display import display, Math; display(Math('x^2'))",
         "mime": "text/latex"},
    ]

    code_history_pattern = "1+2*"
    supported_history_operations = ("tail", "range", "search")

    code_inspect_sample = "zip"

    code_clear_output = "from IPython.display import clear_output; clear_output()"

    def test_no_debugger_advertised(self) -> None:
        reply = self.kc.kernel_info(reply=True, timeout=jkt.TIMEOUT)
        features = reply["content"].get("supported_features", [])
        self.assertNotIn("debugger", features)
        self.assertNotIn("kernel subshells", features)
        self.assertTrue(reply["content"]["language_info"]["version"].startswith("3."))


if __name__ == "__main__":
    unittest.main()
