"""Print the requirements in pyproject.toml, one a line, for the image's dependency layer.

    python3 requirements.py pyproject.toml [EXTRA,...]   # the dependencies, and those extras'
    python3 requirements.py pyproject.toml --build       # build-system.requires

The Dockerfile installs these before it copies the source, so that layer is keyed on
pyproject.toml alone and a change to the code does not download anything again. An extra's
reference to rtcbus itself (``rtcbus[registry]``) is left out: the package is installed later.
"""

import re
import sys
import tomllib

with open(sys.argv[1], "rb") as file:
    pyproject = tomllib.load(file)
if sys.argv[2:] == ["--build"]:
    requirements = pyproject["build-system"]["requires"]
else:
    project = pyproject["project"]
    extras = [extra for extra in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if extra]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    requirements = [r for r in requirements if re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0] != project["name"]]
print("\n".join(requirements))
