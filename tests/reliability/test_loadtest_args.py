"""loadtests/run.py's options: what locust and the locustfile cannot take is refused at once
(exit status 2, naming the value), before a server is started or a step is run."""

from __future__ import annotations

import pytest

from loadtests import run


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # locust's -t and --stop-timeout take whole seconds; -t 0s means "run forever"
        (["--duration", "2.5"], "--duration"),
        (["--duration", "0"], "--duration must be at least 1 second, got 0"),
        (["--duration", "-5"], "--duration must be at least 1 second, got -5"),
        (["--stop-timeout", "1.5"], "--stop-timeout"),
        (["--stop-timeout", "-1"], "--stop-timeout must be 0 or more seconds, got -1"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
        (["--prompt-words", "abc"], "--prompt-words must be positive integers, got 'abc'"),
        (["--prompt-words", "8,,64"], "--prompt-words must be positive integers"),
        (["--prompt-words", "0"], "--prompt-words must be positive integers"),
        (["--user-class", "Nope"], "--user-class: unknown 'Nope' (locustfile.py has ChatUser"),
        (["--user-class", "ChatUser,LLMUser"], "unknown 'LLMUser'"),
    ],
)
def test_bad_options_are_refused_naming_the_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_good_options_are_taken() -> None:
    args = run.parse_args(
        ["--duration", "6", "--stop-timeout", "0", "--max-tokens", "4", "--prompt-words", "4, 24"]
        + ["--user-class", "ChatUser,GenerateUser,CompleteUser,MixedUser"]
    )
    assert (args.duration, args.stop_timeout, args.max_tokens) == (6, 0, 4)
    assert args.prompt_words == "4, 24"


@pytest.mark.parametrize("host", ["127.0.0.1:3000", "localhost:3000", "ftp://127.0.0.1:3000"])
def test_a_host_without_http_is_refused_as_such(
    host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--host 127.0.0.1:3000` was refused as "only loopback hosts are allowed" (it is one):
    without a scheme there is no host to read."""
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--host", host])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--host must be an http:// or https:// URL, got {host!r}" in err, err
