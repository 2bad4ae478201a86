"""The package's log lines print once: through its own handler, or the app's if it has one."""

import io
import logging

import vllm_runner  # noqa: F401  (installs the package's handler)


def _package_stream() -> io.StringIO:
    (handler,) = logging.getLogger("vllm_runner").handlers
    stream = io.StringIO()
    handler.setStream(stream)
    return stream


def test_lines_print_through_the_package_handler_without_a_root_handler(monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    stream = _package_stream()
    logging.getLogger("vllm_runner.engine").warning("alone %d", 1)
    assert stream.getvalue() == "WARNING vllm_runner.engine: alone 1\n"


def test_an_app_that_configures_logging_gets_each_line_once(monkeypatch):
    app_stream = io.StringIO()
    app_handler = logging.StreamHandler(app_stream)
    monkeypatch.setattr(logging.getLogger(), "handlers", [app_handler])
    stream = _package_stream()
    logging.getLogger("vllm_runner.engine").warning("with the app")
    assert app_stream.getvalue() == "with the app\n"
    assert stream.getvalue() == ""
