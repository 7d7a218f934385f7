"""Collect English sentences from the docstrings of Python standard-library modules.

    python make_sentences.py > all.txt    # then: head -400 = calibration.txt, lines 401-656 = validation.txt

Prints one sentence per line, deduplicated (case-insensitive) and shuffled with seed 0; the
count goes to stderr. Kept: sentences of 40-300 characters and 7+ words, starting with a capital
letter and ending with a full stop, mostly alphabetic words, without code-like characters.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import sys

MODULES = """os os.path sys re json collections itertools functools pathlib string textwrap random statistics math
datetime calendar csv argparse logging shutil tempfile subprocess threading queue socket email http.client
urllib.parse urllib.request zipfile tarfile gzip bz2 lzma hashlib hmac secrets base64 binascii struct codecs
unicodedata difflib heapq bisect array weakref copy pprint enum dataclasses typing abc contextlib inspect dis ast
tokenize traceback warnings unittest doctest pdb timeit cProfile pickle shelve sqlite3 zlib io fractions decimal
numbers operator glob fnmatch filecmp configparser getpass locale gettext platform signal select selectors asyncio
concurrent.futures multiprocessing ssl ftplib smtplib imaplib poplib mimetypes html html.parser xml.dom.minidom
xml.etree.ElementTree wave colorsys sched graphlib ipaddress uuid zoneinfo tomllib trace token keyword linecache
shlex cmd code codeop runpy importlib pkgutil modulefinder sysconfig site atexit gc stat errno ctypes mmap reprlib
types string optparse quopri plistlib netrc webbrowser""".split()
CODE_LIKE = re.compile(r"[>{}\[\]=|\\_]|\(\)|::|http|\.\.\.|  ")
SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _keep(s: str) -> bool:
    words = s.split()
    return (
        40 <= len(s) <= 300
        and s[0].isupper()
        and s.endswith(".")
        and not CODE_LIKE.search(s)
        and len(words) >= 7
        and sum(w.isalpha() for w in words) / len(words) >= 0.7
    )


def sentences() -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        for obj in [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]:
            try:
                doc = inspect.getdoc(obj)
            except Exception:
                continue
            if not doc or (getattr(obj, "__module__", name) != name and obj is not mod):
                continue
            for para in doc.split("\n\n"):
                for s in SPLIT.split(" ".join(para.split())):
                    s = s.strip()
                    if _keep(s) and s.lower() not in seen:
                        seen.add(s.lower())
                        out.append(s)
    return out


if __name__ == "__main__":
    found = sentences()
    print(len(found), file=sys.stderr)
    random.Random(0).shuffle(found)
    print("\n".join(found))
