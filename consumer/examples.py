"""The vendor's example events, as data.

The events page (``spec/rtc-callback-events.md``) shows one JSON example ("参数示例") per event
variant: 43 of them, plus the two whiteboard events, which have none and get one built from their
field tables. :func:`load_examples` reads the packaged copy, ``consumer/examples.json``;
:func:`from_markdown` extracts the same list from the page, so a test keeps the two equal.

Regenerate the packaged copy after the page changed::

    python -c "import sys; from consumer.examples import from_markdown, to_json; \\
        sys.stdout.write(to_json(from_markdown(open(sys.argv[1], encoding='utf-8').read())))" \\
        ../shared/spec/rtc-callback-events.md > consumer/examples.json
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.resources import files

# The Version of events the page does not version.
DEFAULT_VERSION = "2020-12-01"


@dataclass(frozen=True)
class Example:
    """One example event: its EventData and where on the page it comes from."""

    event_type: str
    version: str
    event_data: dict
    section: str  # the page's heading, e.g. "RecordStopped(2022-06-01)"
    built: bool = False  # the page has no example; built from the field table's example values


@dataclass(frozen=True)
class Repair:
    """A typo in one of the page's JSON examples and its fix; ``typo`` must occur exactly once."""

    section: str
    typo: str
    fix: str
    why: str


# Only typos that stop the JSON from parsing. Odd values that are valid JSON (e.g. SegmentRealTimeData's
# "SampleRate": "44100", a string for an Int) are the sender's quirks and are kept as they are.
REPAIRS: tuple[Repair, ...] = (
    Repair("RecordAudioStreamStateChanged", '"UserId": "Your_UserId,', '"UserId": "Your_UserId",',
           "the UserId string lacks its closing quote"),
    Repair("RecordVideoStreamStateChanged", '"UserId": "Your_UserId,', '"UserId": "Your_UserId",',
           "the UserId string lacks its closing quote"),
    Repair("RelayStreamStateChanged", '"Vid": "xxxxvvv"\uff0c', '"Vid": "xxxxvvv",',
           "a full-width comma (U+FF0C) separates two members"),
    Repair("RelayStreamStateChanged", "        },\n}", "        }\n}",
           "a trailing comma after the last member (EventData) of the envelope"),
)

_SECTION = re.compile(r"^#{1,3} (.+)$", re.M)  # "####" headings stay inside their section
_HEADING = re.compile(r"(\w+)(?:\((\d{4}-\d{2}-\d{2})\))?")
_EVENT_TYPE = re.compile(r"\*\*EventType\*\*\s*`(\w+)`")
_JSON_BLOCK = re.compile(r"```json\n(.*?)```", re.S)
_LINK = re.compile(r"\[`?(\w+)`?\]\(#([^)]+)\)")
_INTEGER_TYPES = {"Int", "int", "Int32", "Int64", "Uint32", "Uint64"}


def from_markdown(text: str, repairs: Sequence[Repair] = REPAIRS) -> list[Example]:
    """Every example event of the events page, in page order.

    Args:
        text: the events page (Markdown).
        repairs: typo fixes applied to the JSON examples before parsing.

    Raises:
        ValueError: an example does not parse, or a repair does not match exactly once (the page
            changed: update :data:`REPAIRS`).
    """
    examples = []
    unused = list(repairs)
    headings = list(_SECTION.finditer(text))
    for heading, following in zip(headings, headings[1:] + [None]):
        if not heading.group(0).startswith("### "):
            continue
        body = text[heading.end() : following.start() if following else len(text)]
        section = heading.group(1).strip()
        event_type_match, heading_match = _EVENT_TYPE.search(body), _HEADING.fullmatch(section)
        if not event_type_match or not heading_match:
            raise ValueError(f"section {section!r} names no EventType")
        event_type = event_type_match.group(1)
        name, version = heading_match.groups()
        if name != event_type:
            raise ValueError(f"section {section!r} documents EventType {event_type!r}")
        blocks = _JSON_BLOCK.findall(body)
        if len(blocks) > 1:
            raise ValueError(f"section {section!r} has {len(blocks)} JSON examples")
        if not blocks:
            examples.append(Example(event_type, version or DEFAULT_VERSION,
                                    _build_from_table(body, section), section, built=True))
            continue
        source = blocks[0]
        for repair in [r for r in unused if r.section == section]:
            if source.count(repair.typo) != 1:
                raise ValueError(f"section {section!r}: repair {repair.typo!r} does not match once")
            source = source.replace(repair.typo, repair.fix)
            unused.remove(repair)
        try:
            data = json.loads(source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"section {section!r}: the example is not JSON: {exc}") from exc
        if "EventData" in data:  # a whole envelope: the relay section shows one
            version = data.get("Version", version)
            data = data["EventData"]
            if isinstance(data, str):
                data = json.loads(data)
        examples.append(Example(event_type, version or DEFAULT_VERSION, data, section))
    if unused:
        raise ValueError(f"repairs for sections not on the page: {[r.section for r in unused]}")
    return examples


def load_examples() -> list[Example]:
    """The packaged examples (``consumer/examples.json``), in page order."""
    text = files("consumer").joinpath("examples.json").read_text(encoding="utf-8")
    return [Example(**entry) for entry in json.loads(text)]


def to_json(examples: Sequence[Example]) -> str:
    """The text of ``consumer/examples.json`` for ``examples``."""
    entries = [asdict(example) for example in examples]
    return json.dumps(entries, ensure_ascii=False, indent=2) + "\n"


def _build_from_table(body: str, section: str, anchor: str | None = None) -> dict:
    """An object built from a field table's example values (示例值).

    The table is the first one after ``**EventData**``, or after ``<span id="anchor">`` for a nested
    type; a field whose type links to a nested table gets one object built from that table.
    """
    marker = re.search(rf'<span id=\s*"{re.escape(anchor)}"' if anchor else r"\*\*EventData\*\*", body)
    if marker is None:
        raise ValueError(f"section {section!r}: no table for {anchor or 'EventData'}")
    lines = body[marker.end() :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    header = _cells(lines[start])
    type_col = next(i for i, cell in enumerate(header) if "类型" in cell)
    example_col = next(i for i, cell in enumerate(header) if "示例值" in cell)
    built = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        name, kind, example = cells[0], cells[type_col], cells[example_col].strip("`")
        if not name:  # the continuation line of a multi-line cell
            continue
        link = _LINK.search(kind)
        if link:
            nested = _build_from_table(body, section, link.group(2))
            built[name] = [nested] if kind.lower().startswith("array of") else nested
        elif kind in _INTEGER_TYPES:
            built[name] = int(example)
        elif kind == "String":
            built[name] = example
        else:
            raise ValueError(f"section {section!r}: cannot build {name} of type {kind!r}")
    return built


def _cells(line: str) -> list[str]:
    return [cell.strip().strip("*").strip() for cell in line.strip()[1:].split("|")]
