"""Collect English sentences from the docstrings of Python standard-library modules."""
import importlib, inspect, re, sys, pkgutil, random
mods = ["os","os.path","sys","re","json","collections","itertools","functools","pathlib","string","textwrap","random",
 "statistics","math","datetime","calendar","csv","argparse","logging","shutil","tempfile","subprocess","threading",
 "queue","socket","email","http.client","urllib.parse","urllib.request","zipfile","tarfile","gzip","bz2","lzma",
 "hashlib","hmac","secrets","base64","binascii","struct","codecs","unicodedata","difflib","heapq","bisect","array",
 "weakref","copy","pprint","enum","dataclasses","typing","abc","contextlib","inspect","dis","ast","tokenize",
 "traceback","warnings","unittest","doctest","pdb","timeit","cProfile","pickle","shelve","sqlite3","zlib","io",
 "fractions","decimal","numbers","operator","glob","fnmatch","filecmp","configparser","getpass","locale",
 "gettext","platform","signal","select","selectors","asyncio","concurrent.futures","multiprocessing","ssl",
 "ftplib","smtplib","imaplib","poplib","mimetypes","html","html.parser","xml.dom.minidom","xml.etree.ElementTree",
 "wave","colorsys","sched","graphlib","ipaddress","uuid","zoneinfo","tomllib","trace","token","keyword","linecache",
 "shlex","cmd","code","codeop","runpy","importlib","pkgutil","modulefinder","sysconfig","site","atexit","gc",
 "stat","errno","ctypes","mmap","reprlib","types","string","optparse","quopri","plistlib","netrc","webbrowser"]
seen=set(); out=[]
for name in mods:
    try: m=importlib.import_module(name)
    except Exception: continue
    objs=[m]+[getattr(m,a) for a in sorted(dir(m)) if not a.startswith("_")]
    for o in objs:
        try: d=inspect.getdoc(o)
        except Exception: continue
        if not d or getattr(o,"__module__",name)!=name and o is not m: continue
        for para in d.split("\n\n"):
            para=" ".join(para.split())
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para):
                s=s.strip()
                if not (40<=len(s)<=300) or not s[0].isupper() or not s.endswith("."): continue
                if re.search(r"[>{}\[\]=|\\_]|\(\)|::|http|\.\.\.|  ", s): continue
                words=s.split()
                if len(words)<7: continue
                if sum(w.isalpha() for w in words)/len(words)<0.7: continue
                if s.lower() in seen: continue
                seen.add(s.lower()); out.append(s)
print(len(out), file=sys.stderr)
random.Random(0).shuffle(out)
for s in out: print(s)
