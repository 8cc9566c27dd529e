"""Build ``leank/data/prose.txt``: plain English prose for long-context haystacks.

RULER's essay haystack (Paul Graham's essays) cannot be downloaded here, so the bundled
prose is gathered offline from the docstrings of a fixed list of pure-Python standard
library modules, keeping only paragraphs of ordinary sentences: anything that looks like
code, a doctest, a table, a signature or a parameter list is dropped. Output is one
paragraph per line, deduplicated, in a fixed order.

    python -m leank.data.build_prose            # rewrites leank/data/prose.txt
    python -m leank.data.build_prose --out x.txt
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics as pydoc_topics

MODULES = (
    "_pydecimal", "abc", "argparse", "ast", "asyncio.base_events", "asyncio.events",
    "asyncio.futures", "asyncio.locks", "asyncio.protocols", "asyncio.queues",
    "asyncio.streams", "asyncio.subprocess", "asyncio.tasks", "asyncio.transports",
    "base64", "bdb", "calendar", "cmd", "code", "codecs", "collections", "collections.abc",
    "compileall", "concurrent.futures._base", "concurrent.futures.process",
    "concurrent.futures.thread", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "difflib", "dis", "doctest", "email.charset", "email.feedparser", "email.generator",
    "email.header", "email.headerregistry", "email.message", "email.parser", "email.policy",
    "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "heapq", "hmac",
    "html.parser", "http.client", "http.cookiejar", "http.cookies", "http.server",
    "imaplib", "importlib.abc", "inspect", "ipaddress", "json", "json.decoder",
    "json.encoder", "locale", "logging", "logging.config", "logging.handlers", "lzma",
    "mailbox", "mimetypes", "modulefinder", "multiprocessing.connection",
    "multiprocessing.managers", "multiprocessing.pool", "multiprocessing.process",
    "multiprocessing.queues", "netrc", "ntpath", "numbers", "optparse", "os", "pathlib",
    "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib",
    "posixpath", "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue",
    "quopri", "random", "re", "reprlib", "runpy", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string",
    "subprocess", "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest.case",
    "unittest.loader", "unittest.mock", "unittest.result", "unittest.runner",
    "urllib.parse", "urllib.request", "urllib.robotparser", "uuid", "warnings", "wave",
    "weakref", "webbrowser", "wsgiref.handlers", "wsgiref.headers", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax.handler", "xmlrpc.client", "xmlrpc.server", "zipfile",
    "zipimport",
)  # fmt: skip

DEFAULT_OUT = Path(__file__).with_name("prose.txt")

# Characters and fragments that never occur in the ordinary sentences we want to keep.
_CODE_HINT = re.compile(r"[{}\[\]<>=|*#`\\~^$@_]|\(\)|::|->|\.\.\.|\w\.\w|\w\(|\bNone\b|\bTrue\b|\bFalse\b")
_HEADING = re.compile(r"^\s*(\w+\s?){1,3}:\s*$")
_LIST_ITEM = re.compile(r"^\s*([-+*o]|\d+[.)]|[a-z][.)])\s")
_ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:'\"!?()%/&-]+$")
_CAMEL_OR_CAPS = re.compile(r"\b[a-z]+[A-Z]\w*|\b[A-Z]{2,}[a-z]\w*")
_RULE = re.compile(r"^\s*[-=*+~^]{3,}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _documented_objects(module) -> Iterator[object]:
    """The module, then its own classes/functions and their methods, in name order."""
    yield module
    for _, member in inspect.getmembers(module):
        if getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member):
            yield member
            for _, method in inspect.getmembers(member):
                if inspect.isfunction(method) and method.__module__ == module.__name__:
                    yield method
        elif inspect.isfunction(member):
            yield member


def _is_text_block(block: str) -> bool:
    """False for code, doctests, tables, headings, lists and parameter lists."""
    lines = block.strip("\n").splitlines()
    return bool(lines) and not any(
        line[:1].isspace() or _HEADING.match(line) or _LIST_ITEM.match(line) or _RULE.match(line) for line in lines
    )


def _is_sentence(sentence: str) -> bool:
    words = sentence.split()
    return (
        len(words) >= 5
        and sentence[0].isupper()
        and sentence[-1] in ".!?"
        and _ALLOWED.match(sentence) is not None
        and _CODE_HINT.search(sentence) is None
        and _CAMEL_OR_CAPS.search(sentence) is None
        # Ordinary language, not a terse fragment of names: mostly lowercase words.
        and sum(w.strip(".,;:()'\"!?").isalpha() and w.islower() for w in words) >= 0.7 * len(words)
    )


def _clean_paragraph(block: str) -> str | None:
    """The block's ordinary sentences as one single-spaced line, or None if too little is left."""
    if not _is_text_block(block):
        return None
    sentences = [s for s in _SENTENCE_END.split(" ".join(block.split())) if _is_sentence(s)]
    paragraph = " ".join(sentences)
    return paragraph if len(paragraph.split()) >= 8 else None


def _texts(modules: tuple[str, ...]) -> Iterator[str]:
    """Docstrings of ``modules`` (dedented), then the topics of the language reference."""
    for name in modules:
        for obj in _documented_objects(importlib.import_module(name)):
            yield inspect.getdoc(obj) or ""
    for topic in sorted(pydoc_topics):
        yield pydoc_topics[topic]


def prose_paragraphs(modules: tuple[str, ...] = MODULES) -> list[str]:
    """Prose paragraphs (one string each, single-spaced) from the documentation of the stdlib."""
    seen: set[str] = set()
    paragraphs = []
    for text in _texts(modules):
        for block in re.split(r"\n\s*\n", text):
            paragraph = _clean_paragraph(block)
            if paragraph is not None and paragraph not in seen:
                seen.add(paragraph)
                paragraphs.append(paragraph)
    return paragraphs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    text = "\n".join(prose_paragraphs()) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text.encode()) / 1024:.0f} KB, {text.count(chr(10))} paragraphs")


if __name__ == "__main__":
    main()
