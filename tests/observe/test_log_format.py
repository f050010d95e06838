"""Log formatting (issue 25): one line per record whatever logger made it,
and no outgoing URL's query string in the log."""

from __future__ import annotations

import io
import logging
from typing import Any, Iterator

import httpx
import pytest

from comfy_embed.observe.logs import TextFormatter, configure_logging, escape_controls
from tests.observe.test_logs import _handler


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    """configure_logging into a buffer; the root logger and the library
    loggers' levels restored afterwards."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in ("httpx", "httpcore")}
    stream = io.StringIO()
    configure_logging("text", stream=stream)
    try:
        yield stream
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


# Item 9: no record spans lines, whatever logger wrote it.

def _text_lines(*records: tuple[str, tuple[Any, ...]], exc: bool = False) -> list[str]:
    stream = io.StringIO()
    logger = logging.getLogger("comfy_embed.test_logs.text")
    logger.propagate = False
    logger.addHandler(_handler(stream, TextFormatter()))
    logger.setLevel(logging.INFO)
    try:
        for msg, args in records:
            logger.info(msg, *args)
        if exc:
            try:
                raise ValueError("boom\n2026-01-01 00:00:00,000 WARNING x [-] FORGED")
            except ValueError:
                logger.exception("failed")
    finally:
        logger.handlers.clear()
        logger.propagate = True
    return stream.getvalue().splitlines()


FORGED = "2026-01-01 00:00:00,000 WARNING comfy_embed.auth [-] FORGED"


def test_text_format_escapes_line_breaks_in_message_and_arguments() -> None:
    lines = _text_lines((f"path /status\n{FORGED}", ()),
                        ("ckpt_name %r and %s", (f"a\r\n{FORGED}", f"b\u2028\x85\x0b\x1b[2J{FORGED}")),
                        exc=True)
    assert len(lines) == 3, lines  # one line per record, the traceback's included
    assert not any(x.startswith("2026-01-01") for x in lines), lines
    assert lines[0].endswith(f"path /status\\n{FORGED}")
    assert "\\u2028\\x85\\x0b\\x1b[2J" in lines[1]
    assert "Traceback" in lines[2] and "\\nValueError: boom\\n2026" in lines[2]


def test_text_format_leaves_ordinary_text_alone() -> None:
    assert escape_controls("a b\tc ü 日本 C:\\path") == "a b\tc ü 日本 C:\\path"
    assert escape_controls("x\ny\rz\x00") == "x\\ny\\rz\\x00"


def test_configure_logging_installs_the_one_line_formatter(configured: io.StringIO) -> None:
    # uvicorn's access log (log_config=None) goes through the root handler.
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1", "GET",
                                             f"/api/serverless/status\n{FORGED}", "1.1", 401)
    lines = configured.getvalue().splitlines()
    assert len(lines) == 1 and "status\\n2026-01-01" in lines[0], lines


# Item 10: httpx logs every request's URL at INFO, query string included.

def test_no_outgoing_query_string_reaches_the_log(configured: io.StringIO) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200))
    secret = "X-Amz-Signature=deadbeef&token=webhook-secret"
    with httpx.Client(transport=transport) as client:
        client.get(f"https://bucket.example/out.png?{secret}")
        client.post(f"https://hooks.example/cb?{secret}", json={})

    async def go() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(f"https://bucket.example/async.png?{secret}")
    import anyio
    anyio.run(go)
    logging.getLogger("comfy_embed.test").info("still logging")
    text = configured.getvalue()
    assert "still logging" in text
    assert "deadbeef" not in text and "webhook-secret" not in text, text
    # Warnings from those libraries still come through.
    logging.getLogger("httpx").warning("a warning")
    assert "a warning" in configured.getvalue()
