"""Prompt templates and `when` expressions: rendering, the variables they read, and the sandbox."""

from __future__ import annotations

import pytest

from modelyard.errors import ConfigError
from modelyard.templates import Condition, RenderError, Template, variables_of

ROW = {"text": "hello", "n": 3, "label": "bug", "tags": ["a", "b"], "name with space": "spaced",
       "missing_value": None}


def test_render_columns_row_and_filters():
    t = Template("{{ text | upper }} x{{ n + 1 }} {{ row['name with space'] }} {{ tags | join(',') }}"
                 "{% for t in tags %}[{{ t }}]{% endfor %}{% if n > 2 %} big{% endif %}")
    assert t.render(ROW) == "HELLO x4 spaced a,b[a][b] big"
    assert Template("{{ row.text }}/{{ row['n'] }}").render(ROW) == "hello/3"
    assert Template("line\n").render(ROW) == "line\n"  # trailing newline kept
    assert Template("<b>{{ '<&>' }}</b>").render(ROW) == "<b><&></b>"  # no HTML escaping in prompts


def test_variables_of_templates_and_expressions():
    assert variables_of("{{ text }} {{ row['name with space'] }} {% for t in tags %}{{ t }}{% endfor %}") == {
        "text", "tags"}
    assert Template("{% set x = n %}{{ x }} {{ label }}").variables == {"n", "label"}
    assert variables_of("label in ['bug', 'billing'] and n > 2", expression=True) == {"label", "n"}
    assert Condition("row['name with space'] == 'x' or text").variables == {"text"}
    with pytest.raises(ConfigError, match="invalid template"):
        variables_of("{{ text ")
    with pytest.raises(ConfigError, match="invalid expression"):
        variables_of("label ==", expression=True)
    with pytest.raises(ConfigError):
        Template("{% if %}")
    with pytest.raises(ConfigError):
        Condition("a b")


def test_missing_column_raises_render_error():
    with pytest.raises(RenderError, match="'txt' is undefined"):
        Template("{{ txt }}").render(ROW)
    with pytest.raises(RenderError, match="nope"):
        Template("{{ row['nope'] }}").render(ROW)
    with pytest.raises(RenderError, match="undefined"):
        Condition("lable == 'bug'")(ROW)
    with pytest.raises(RenderError, match="undefined"):
        Condition("nope")(ROW)


def test_other_failures_are_render_errors_too():
    with pytest.raises(RenderError, match="ZeroDivisionError"):
        Template("{{ n / 0 }}").render(ROW)
    with pytest.raises(RenderError, match="ZeroDivisionError"):
        Condition("n / 0")(ROW)
    with pytest.raises(RenderError, match="TypeError"):
        Template("{{ n | join(',') }}").render(ROW)


def test_unknown_filter_is_a_config_error():
    with pytest.raises(ConfigError, match="nosuchfilter"):
        Template("{{ text | nosuchfilter }}")


@pytest.mark.parametrize("expr, expected", [
    ("label in ['bug', 'billing']", True),
    ("label == 'feature'", False),
    ("n > 2 and text", True),
    ("n", True),
    ("n - 3", False),
    ("tags", True),
    ("missing_value", False),
    ("missing_value is none", True),
    ("''", False),
    ("text | length > 3", True),
    ("'ell' in text", True),
])
def test_condition_truthiness(expr, expected):
    result = Condition(expr)(ROW)
    assert result is expected


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ text.__class__.__base__ }}",
    "{{ row.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ range(10) }}",
    "{{ dict(a=1) }}",
    "{{ self.__init__.__globals__ }}",
    "{{ row.update({'a': 1}) }}",
    "{{ row.pop('text') }}",
    "{{ row.clear() }}",
    "{{ tags.append('c') }}",
    "{{ tags.__setitem__(0, 'x') }}",
    "{{ '{0.__class__.__mro__}'.format(text) }}",
    "{{ '{text.__class__}'.format_map(row) }}",
    "{{ '%s' % row.__class__ }}",
    "{% set x = row.setdefault('z', 1) %}{{ x }}",
    "{{ (row | attr('__class__')) }}",
    "{{ row.items.__self__.__class__ }}",
])
def test_sandbox_escapes_are_refused(source):
    row = {**ROW, "tags": list(ROW["tags"])}
    before = {k: (list(v) if isinstance(v, list) else v) for k, v in row.items()}
    with pytest.raises(RenderError) as e:
        Template(source).render(row)
    assert "refused by the sandbox" in str(e.value) or "is undefined" in str(e.value)
    assert row == before  # nothing was changed on the way


@pytest.mark.parametrize("expr", [
    "().__class__.__base__.__subclasses__()",
    "''.__class__.__mro__[1].__subclasses__()",
    "cycler.__init__.__globals__",
    "range(10)",
    "lipsum()",
    "row.update({'label': 'x'}) or true",
    "tags.append('x') or true",
    "text.__class__",
])
def test_sandbox_escapes_in_when_are_refused(expr):
    row = {**ROW, "tags": list(ROW["tags"])}
    with pytest.raises(RenderError) as e:
        Condition(expr)(row)
    assert "refused by the sandbox" in str(e.value) or "is undefined" in str(e.value)
    assert row["label"] == "bug" and row["tags"] == ["a", "b"]


def test_globals_are_cleared_but_filters_and_tests_remain():
    assert Template("{{ tags | length }} {{ n is odd }} {{ text | replace('l', 'L') }}").render(ROW) == "2 True heLLo"
    # a column may share a name with a former global: the row wins
    assert Template("{{ range }}").render({"range": "1-5"}) == "1-5"


def test_a_column_named_row_does_not_break_rendering():
    row = {"row": 7, "text": "t"}
    assert Template("{{ row['row'] }} {{ text }}").render(row) == "7 t"
    assert Condition("row['row'] == 7 and text == 't'")(row) is True


@pytest.mark.parametrize("source", [
    "Classify this ticket: {{ text }}", "{{text}}{{ n }}", "a {{ text }}\r\nb {{ tags }}\n", "{{- text -}}  x ",
    "", "no columns", "{# a comment #}{{ missing_value }}|{{ n }}", "{% raw %}{{ text }}{% endraw %} {{ text }}",
    "é {{ text }} \u2028",
])
def test_plain_templates_render_as_jinja_does(source):
    """Text and bare ``{{ column }}`` are joined without Jinja's per-call context: the same text."""
    t = Template(source)
    assert t._plain is not None
    for row in (ROW, {**ROW, "text": 1.5, "n": None}, {**ROW, "text": {"k": [1, "x"]}, "n": True}):
        assert t.render(row) == t._tmpl.render({**row, "row": row})


def test_other_templates_and_bad_rows_go_through_jinja():
    for source in ("{{ text | upper }}", "{{ row.text }}", "{{ row }}", "{% if n %}x{% endif %}", "{{ n + 1 }}"):
        assert Template(source)._plain is None
    t = Template("Classify: {{ txt }}")
    assert t._plain is not None
    with pytest.raises(RenderError, match="'txt' is undefined"):
        t.render(ROW)  # the message is Jinja's

    class Bad:
        def __str__(self):
            raise ValueError("no text")
    with pytest.raises(RenderError, match="ValueError: no text"):
        Template("{{ text }}").render({"text": Bad()})
