"""Prompt templates and `when` expressions, both in Jinja2's immutable sandbox.

A template sees the row's columns as variables (and the whole row as ``row``), nothing else:
no Python builtins, no attribute access to internals, no files, no network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jinja2 import StrictUndefined, TemplateError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from modelyard.errors import ConfigError

# One environment for the whole process: it is thread-safe once templates are compiled.
ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
ENV.globals.clear()  # no range(), lipsum(), dict(), cycler() …: a template sees the row only


class RenderError(Exception):
    """A row could not be rendered or evaluated; becomes an error row."""


def variables_of(source: str, *, expression: bool = False) -> set[str]:
    """Names a template (or a `when` expression) reads from the row."""
    text = "{{ (" + source + ") }}" if expression else source
    try:
        return meta.find_undeclared_variables(ENV.parse(text)) - {"row"}
    except TemplateError as e:
        kind = "expression" if expression else "template"
        raise ConfigError(f"invalid {kind}: {e}") from None


@dataclass
class Template:
    """A compiled prompt template."""

    source: str
    variables: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.variables = variables_of(self.source)
        self._tmpl = ENV.from_string(self.source)
        self._plain = _plain_parts(self)

    def render(self, row: dict[str, Any]) -> str:
        plain = self._plain
        if plain is not None:
            try:
                return "".join([text if name is None else str(row[name]) for text, name in plain])
            except Exception:  # noqa: BLE001 - a missing column, a value whose str() fails: Jinja says it
                pass
        try:
            return self._tmpl.render({**row, "row": row})
        except SecurityError as e:
            raise RenderError(f"template refused by the sandbox: {e}") from None
        except TemplateError as e:
            raise RenderError(f"template error: {e}") from None
        except Exception as e:  # a filter applied to the wrong type, a division by zero …
            raise RenderError(f"template error: {type(e).__name__}: {e}") from None


def _plain_parts(t: Template) -> list[tuple[str | None, str | None]] | None:
    """A template of text and bare ``{{ column }}`` only, as (text, None) and (None, column) parts,
    which ``render`` joins itself: what Jinja's compiled code does for them (``str`` of the value),
    without the context Jinja builds per call (most of a short prompt's cost, rendered per row).
    None for anything else (filters, attributes, blocks, ``row``), and if a probe row renders any
    differently than through Jinja."""
    body = ENV.parse(t.source).body
    if not body:
        return [("", None)]
    if len(body) != 1 or type(body[0]) is not nodes.Output:
        return None
    parts: list[tuple[str | None, str | None]] = []
    for n in body[0].nodes:
        if type(n) is nodes.TemplateData:
            parts.append((n.data, None))
        elif type(n) is nodes.Name and n.ctx == "load" and n.name != "row":
            parts.append((None, n.name))
        else:
            return None
    probe = {name: f"<{i}:{name}>" for i, (_, name) in enumerate(parts) if name is not None}
    joined = "".join(text if name is None else probe[name] for text, name in parts)
    return parts if joined == t._tmpl.render({**probe, "row": probe}) else None


@dataclass
class Condition:
    """A compiled `when` expression; truthy means the stage runs on the row."""

    source: str
    variables: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.variables = variables_of(self.source, expression=True)
        try:
            self._expr = ENV.compile_expression(self.source, undefined_to_none=False)
        except TemplateError as e:
            raise ConfigError(f"invalid when expression {self.source!r}: {e}") from None

    def __call__(self, row: dict[str, Any]) -> bool:
        try:
            return bool(self._expr(**{**row, "row": row}))  # a column named `row` must not clash
        except SecurityError as e:
            raise RenderError(f"when refused by the sandbox: {e}") from None
        except Exception as e:
            raise RenderError(f"when {self.source!r} failed: {type(e).__name__}: {e}") from None
