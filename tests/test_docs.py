"""The documentation stays true: the generated configuration reference, the links, the README's length."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from urllib.parse import unquote

import pytest

from quota_sidecar.server.settings import Boolean, Settings, env_name
from quota_sidecar.tools import config_reference
from quota_sidecar.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
README_MAX_LINES = 320


def _documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "helm" / "quota-sidecar" / "README.md"]


# --------------------------------------------------------------------------- configuration reference


def test_configuration_reference_is_generated_from_the_settings() -> None:
    assert CONFIGURATION.is_file(), f"docs/configuration.md is missing: run `{config_reference.COMMAND}`"
    assert CONFIGURATION.read_text(encoding="utf-8") == config_reference.render(), (
        f"docs/configuration.md differs from the Settings fields: run `{config_reference.COMMAND}`")


def test_configuration_reference_lists_every_setting_as_serve_takes_it() -> None:
    text = config_reference.render()
    parser = build_parser()
    for f in fields(Settings):
        flag = config_reference.flag_name(f)
        assert f"`{flag}" in text and f"`{env_name(f.name)}`" in text, f.name
        # The flag in the reference is the one `serve` accepts (and --help shows).
        if isinstance(f.default, tuple):
            sample = "127.0.0.1:1"
        elif isinstance(f.default, Boolean):
            sample = "true"
        elif isinstance(f.default, (int, float)):
            sample = "1"
        else:
            sample = "x"
        assert getattr(parser.parse_args(["serve", flag, sample]), f.name) is not None, flag
    assert "`QUOTA_REDIS_MODE`" in text


def test_config_reference_main_prints_and_checks(capsys: pytest.CaptureFixture[str]) -> None:
    assert config_reference.main([]) == 0
    assert capsys.readouterr().out == config_reference.render()
    assert config_reference.main(["--check"]) == 0


# --------------------------------------------------------------------------- links

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]\n]+\]:[ \t]*<?([^\s<>]+)>?", re.MULTILINE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def _links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link and image outside code; link texts may wrap."""
    prose = ["" for _ in path.read_text(encoding="utf-8").splitlines()]
    for number, line in _outside_fences(path.read_text(encoding="utf-8")):
        prose[number - 1] = _CODE_SPAN.sub("code", line)  # `[x](y)` in code is not a link
    text = "\n".join(prose)
    found = [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _INLINE_LINK.finditer(text)]
    found += [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _REFERENCE.finditer(text)]
    return found


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    anchors: set[str] = set()
    for _, line in _outside_fences(path.read_text(encoding="utf-8")):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))  # a link: its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document: Path) -> None:
    assert document.is_file(), document
    broken = []
    for number, target in _links(document):
        if _SCHEME.match(target):
            continue  # https:, mailto:, ...: not ours to check offline
        where = f"{document.relative_to(ROOT)}:{number}: {target}"
        path_part, _, fragment = target.partition("#")
        resolved = (document.parent / unquote(path_part)).resolve() if path_part else document
        if not resolved.exists():
            broken.append(f"{where} (no such file)")
            continue
        if ROOT not in resolved.parents and resolved != ROOT:
            broken.append(f"{where} (outside the repository)")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{where} (no heading #{fragment} in {resolved.relative_to(ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


# --------------------------------------------------------------------------- README


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move the details to docs/")
