"""User text made literal for display: on a terminal through rich, and in the HTML report.

Ids, image URIs, batch names, model names and error messages come from whoever wrote the dataset
or the models file. Printed as they are, they are instructions, not text:

- rich reads ``[...]`` as markup: ``[/x]`` in an id crashed ``results`` with a ``MarkupError``, and
  ``[link=https://…]click[/link]`` became a clickable terminal hyperlink (OSC 8);
- C0/C1 control characters (ESC above all) reach the terminal as escape sequences: set the window
  title, repaint the screen, move the cursor over earlier lines;
- bidirectional overrides and isolates (U+202A-U+202E, U+2066-U+2069) reorder what follows them:
  ``\\u202egnp.exe`` displays as ``exe.png``, in a terminal and in a browser alike.

``show_controls`` replaces every such character with a visible escape (``\\x1b``, ``\\u202e``),
so the reader sees that it is there; ``terminal_literal`` does that and escapes rich's markup. A tab
is a control character too (a cell would jump columns); a newline is kept only where a multi-line
message is expected (``newlines=True``).
"""

from __future__ import annotations

import re

from rich.markup import escape

__all__ = ["show_controls", "terminal_literal"]

# C0 controls and DEL, C1 controls, the bidirectional marks, embeddings, overrides and isolates
# (ALM U+061C, LRM/RLM U+200E-U+200F, LRE..RLO U+202A-U+202E, LRI..PDI U+2066-U+2069), and the
# line and paragraph separators, which break a line like a newline does.
_OTHER_CONTROLS = "\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_ANY_CONTROL = re.compile(f"[\x00-\x1f{_OTHER_CONTROLS}]")
_CONTROL_BUT_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f{_OTHER_CONTROLS}]")


def _escape_sequence(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def show_controls(text: str, *, newlines: bool = False) -> str:
    """``text`` with every control, bidi-override and line-separator character written as an escape.

    ``show_controls("a\\x1b[31mb")`` is ``"a\\\\x1b[31mb"``: the ESC is shown, not obeyed. With
    ``newlines=True`` a plain ``\\n`` is kept (a multi-line message); everything else is escaped.
    """
    pattern = _CONTROL_BUT_NEWLINE if newlines else _ANY_CONTROL
    return pattern.sub(_escape_sequence, text)


def terminal_literal(value: object, *, newlines: bool = False) -> str:
    """``value`` as rich markup that prints exactly its text: markup escaped, controls shown.

    The one function for every user-controlled string that reaches a rich table, title or message.
    ``None`` becomes ``""``; other non-strings are formatted with ``str`` first. A final backslash
    is doubled (rich's ``escape``), so that it cannot escape a tag that follows it in the markup.
    """
    if value is None:
        return ""
    return escape(show_controls(str(value), newlines=newlines))
