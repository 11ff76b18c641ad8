"""The README's curl examples are accepted as they are: a JSON body goes with its content type
(the API refuses a body it cannot take as JSON with 422)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _curl_commands() -> list[list[str]]:
    text = README.read_text()
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.S)
    commands: list[list[str]] = []
    for block in blocks:
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            pending += line + "\n"
            try:  # a body may span lines inside its quotes: read on until they close
                words = shlex.split(pending, comments=True)
            except ValueError:
                continue
            pending = ""
            if words[:1] == ["curl"]:
                commands.append(words[1:])
    return commands


def test_every_curl_example_with_a_body_names_its_content_type() -> None:
    commands = _curl_commands()
    with_body = [c for c in commands if "-d" in c or "--data" in c]
    assert len(with_body) >= 5, commands  # the parse itself must find the examples
    missing = []
    for command in with_body:
        headers = [command[i + 1].lower() for i, word in enumerate(command[:-1]) if word == "-H"]
        if not any(h.startswith("content-type:") for h in headers):
            missing.append(" ".join(command))
    assert missing == []
