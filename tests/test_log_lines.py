"""One log record, one line (`xofs/log_lines.py`), at the formatter and through a real mount's log."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from tests.support import wait_for
from tests.test_imports import sr_ids
from xofs.log_lines import OneLineFormatter, one_line


def test_control_characters_and_line_separators_are_escaped():
    assert one_line("a\nb\tc\rd\x1b[31me\x7ff\x85g\u2028h\u2029i") == \
        "a\\nb\\tc\\rd\\x1b[31me\\x7ff\\x85g\\u2028h\\u2029i"
    assert one_line("é ü 日本 /srs/x/import/disk.raw") == "é ü 日本 /srs/x/import/disk.raw"


def test_a_record_is_one_line_but_its_traceback_follows():
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("xofs", logging.WARNING, __file__, 1, "%s failed:\n%s",
                                   ("/a\nINFO forged", "XO's\n+ two lines"), sys.exc_info())
    text = formatter.format(record)
    first, *rest = text.split("\n")
    assert first == "WARNING /a\\nINFO forged failed:\\nXO's\\n+ two lines"
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


@pytest.mark.mount
def test_a_file_name_with_a_newline_cannot_forge_a_log_line(fresh_sim, make_mount, tmp_path):
    mount = make_mount(fresh_sim)
    target = mount / "srs" / sr_ids(fresh_sim)[0] / "import" / "nl\nINFO forged line.txt"
    src = tmp_path / "x"
    src.write_bytes(b"x")
    done = subprocess.run(["cp", str(src), str(target)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0  # .txt is no image name: refused, and logged
    wait_for(lambda: "forged line.txt" in mount.log_text(), 10, "the refusal in the log")
    assert not any(line.startswith("INFO forged") for line in mount.log_text().splitlines())
    assert "nl\\nINFO forged line.txt" in mount.log_text()
