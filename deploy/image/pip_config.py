"""The host's effective pip configuration, as one file a build container can read.

    python3 pip_config.py OUT.conf < <(pip config list)

Reads ``pip config list`` (every file pip loads, and PIP_* variables as the ``:env:``
section) on stdin, writes it to OUT.conf as pip.conf, the variables under ``[global]``, and
prints the local paths it names (``cert``, ``client-cert``, local ``find-links`` and index
directories), one a line, so that the caller can mount them too. The file may hold an index URL
with credentials: build.sh mounts it read-only for the build, and no layer keeps it.
"""

import ast
import configparser
import os
import sys

PATH_KEYS = {"cert", "client-cert", "find-links", "index-url", "extra-index-url"}

config = configparser.ConfigParser(interpolation=None)
paths: list[str] = []
# PIP_* variables override every file, so they are applied last.
lines = sorted(sys.stdin.read().splitlines(), key=lambda line: line.startswith(":env:."))
for line in lines:
    name, sep, raw = line.partition("=")
    if not sep or "." not in name:
        continue
    section, key = name.rsplit(".", 1)
    value = ast.literal_eval(raw)
    section = "global" if section == ":env:" else section
    if not config.has_section(section):
        config.add_section(section)
    config.set(section, key, value)
    if key in PATH_KEYS:
        for item in value.split():
            item = item.removeprefix("file://")
            if item.startswith("/") and os.path.exists(item):
                paths.append(item)

with open(sys.argv[1], "w") as out:
    config.write(out)
print("\n".join(dict.fromkeys(paths)))
