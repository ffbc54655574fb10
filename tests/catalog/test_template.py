"""Template syntax: placeholders, defaults, names, escapes and what is left alone."""

from __future__ import annotations

import pytest

from app.prompts.template import MissingVariables, TemplateSyntaxError, parse


def render(content: str, **values: str) -> str:
    return parse(content).render(values)


def test_a_value_replaces_its_placeholder() -> None:
    assert render("Hello ${var:name}!", name="Ann") == "Hello Ann!"


def test_a_default_is_used_when_no_value_is_given() -> None:
    assert render("Hello ${var:name:there}!") == "Hello there!"
    assert render("Hello ${var:name:there}!", name="Bo") == "Hello Bo!"


def test_an_empty_default_renders_as_nothing() -> None:
    assert render("a${var:suffix:}b") == "ab"


def test_a_default_may_contain_colons_and_spaces() -> None:
    assert render("${var:url:http://x:80/a b}") == "http://x:80/a b"


def test_names_may_contain_underscores_and_hyphens() -> None:
    content = "${var:target_language} ${var:max-words} ${var:_private} ${var:2nd}"
    rendered = render(
        content, **{"target_language": "fr", "max-words": "5", "_private": "p", "2nd": "two"}
    )
    assert rendered == "fr 5 p two"


def test_a_missing_required_variable_is_named() -> None:
    with pytest.raises(MissingVariables) as caught:
        render("${var:a} ${var:b:x} ${var:c}", a="1")
    assert caught.value.names == ["c"]
    assert "'c'" in str(caught.value)


def test_every_missing_variable_is_listed_once() -> None:
    with pytest.raises(MissingVariables) as caught:
        render("${var:a} ${var:b} ${var:a}")
    assert caught.value.names == ["a", "b"]


def test_a_variable_is_required_if_any_use_lacks_a_default() -> None:
    template = parse("${var:x:1} and ${var:x}")
    (variable,) = template.variables
    assert variable.required and variable.default == "1"
    with pytest.raises(MissingVariables):
        template.render({})


def test_variables_report_name_required_and_default_in_order() -> None:
    variables = parse("${var:b:dflt} ${var:a} ${var:c:}").variables
    assert [v.as_dict() for v in variables] == [
        {"name": "b", "required": False, "default": "dflt"},
        {"name": "a", "required": True, "default": None},
        {"name": "c", "required": False, "default": ""},
    ]


def test_double_dollar_escapes_a_literal_placeholder() -> None:
    assert render("$${var:name} is literal, ${var:name} is not", name="N") == (
        "${var:name} is literal, N is not"
    )


def test_other_dollar_brace_forms_are_left_alone() -> None:
    content = "${request:field} ${HOME} $5 {var:x} ${var:x}"
    assert render(content, x="X") == "${request:field} ${HOME} $5 {var:x} X"


@pytest.mark.parametrize(
    "content",
    ["${var:}", "${var:first name}", "${var:unclosed", "${var:-lead}", "${var:a.b}"],
)
def test_a_malformed_var_placeholder_is_refused(content: str) -> None:
    with pytest.raises(TemplateSyntaxError) as caught:
        parse(content)
    assert caught.value.offset == 0


def test_values_are_not_scanned_again() -> None:
    assert render("${var:a}", a="${var:b}", b="B") == "${var:b}"
