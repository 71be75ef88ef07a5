"""The packaged examples against the vendor's events page."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

import pytest

from consumer.examples import DEFAULT_VERSION, REPAIRS, from_markdown, load_examples, to_json

PAGE = Path(__file__).parents[2] / "shared" / "spec" / "rtc-callback-events.md"
VERSIONED = {
    "RecordStopped": ["2020-12-01", "2022-06-01", "2023-06-01", "2023-11-01"],
    "SegmentRealTimeData": ["2020-12-01", "2022-06-01", "2023-11-01"],
    "SnapshotRealTimeData": ["2020-12-01", "2022-06-01", "2023-11-01"],
}


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


def test_packaged_examples_are_what_the_page_gives(page):
    assert from_markdown(page) == load_examples()


def test_packaged_file_is_in_canonical_form():
    packaged = files("consumer").joinpath("examples.json").read_text(encoding="utf-8")
    assert to_json(load_examples()) == packaged


def test_45_examples_of_38_event_types_in_the_pages_order(page):
    examples = load_examples()
    assert len(examples) == 45
    assert len({e.event_type for e in examples}) == 38
    # The page's overview table lists every variant, in the order of its sections.
    overview = re.findall(r"\[`(\w+(?:\(\d{4}-\d{2}-\d{2}\))?)`\]\(#", page[: page.index("\n## ")])
    assert [e.section for e in examples] == overview


def test_versions():
    examples = load_examples()
    for event_type, versions in VERSIONED.items():
        assert [e.version for e in examples if e.event_type == event_type] == versions
        assert [e.section for e in examples if e.event_type == event_type] == [
            f"{event_type}({v})" for v in versions
        ]
    others = {e.version for e in examples if e.event_type not in VERSIONED}
    assert others == {DEFAULT_VERSION}


def test_only_the_whiteboard_examples_are_built():
    built = {e.event_type: e.event_data for e in load_examples() if e.built}
    assert built == {
        "WbTranscodeProgressChanged": {
            "TaskId": "5f848de8-4258-4c41-964b-80556552ae82", "TranscodeMode": 0, "Progress": 0,
            "FileName": "demo", "TotalPages": 5,
        },
        "WbTranscodeFinished": {
            "TaskId": "5f848de8-4258-4c41-964b-80556552ae82", "TranscodeMode": 0, "FileName": "demo",
            "FileId": "001", "TotalPages": 5, "Width": 640, "Height": 360,
            "ThumbnailWidth": 64, "ThumbnailHeight": 64,
            "Images": [{
                "PageId": 1, "Img": "https://example.com/demo.png",
                "ThumbnailUrl": "https://example.com/thumbnail.png",
            }],
            "ErrCodeN": 400, "ErrCode": "InvalidParameter", "ErrMsg": "和错误参数有关的信息",
        },
    }


def test_the_relay_envelope_gives_its_event_data():
    relay = next(e for e in load_examples() if e.event_type == "RelayStreamStateChanged")
    assert relay.event_data == {
        "RoomId": "Your_RoomId", "TaskId": "Your_TaskId", "UserId": "Your_UserId",
        "StreamUrl": "rtmp://xxx", "Status": 1, "StartTimeStamp": 0, "Msg": "",
        "Vid": "xxxxvvv", "Reason": 4,
    }


def test_quirks_that_are_valid_json_are_kept():
    segments = [e for e in load_examples() if e.event_type == "SegmentRealTimeData"]
    assert [e.event_data["Data"][0]["SampleRate"] for e in segments] == ["44100"] * 3


@pytest.mark.parametrize("repair", REPAIRS, ids=lambda r: f"{r.section}:{r.why}")
def test_every_repair_is_needed(page, repair):
    with pytest.raises(ValueError, match=re.escape(repair.section)):
        from_markdown(page, repairs=[r for r in REPAIRS if r is not repair])


@pytest.mark.parametrize("repair", REPAIRS, ids=lambda r: f"{r.section}:{r.why}")
def test_a_repair_whose_typo_is_gone_is_reported(page, repair):
    fixed_page = page.replace(repair.typo, repair.fix)
    with pytest.raises(ValueError, match="does not match once"):
        from_markdown(fixed_page)
