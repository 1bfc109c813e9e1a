"""One log record, one line: control characters in a message are escaped.

Messages carry text from outside: file names (a name may hold a newline or a tab), XO's error text (which
can run over several lines) and a plugin's words. Written raw, one record could split into lines that
`grep`, syslog and `xofs status` take for records of their own, even made to look like xofs's. Escaped as
Python does in a string's repr (`\\n`, `\\t`, `\\x1b`, `\\u2028`); a traceback still follows on its own lines.
"""

from __future__ import annotations

import logging

_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """`text` with every control character, and the Unicode line and paragraph separators, escaped."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """A `logging.Formatter` whose messages are `one_line`."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = one_line(record.message)
        return super().formatMessage(record)
