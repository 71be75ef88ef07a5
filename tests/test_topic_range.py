"""consumer/topic_range.py on the real broker: the due range from a group's committed offsets,
batches that stop at the ends seen at the start, transaction markers, a stall."""

from __future__ import annotations

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from consumer.errors import InfrastructureError, RtcbusError
from consumer.kafka.config import consumer_config
from consumer.topic_range import assign_due, due_ranges, partitions_of, read_batch, read_range

pytestmark = pytest.mark.kafka


def fill(kafka, topic: str, partition: int, values: list[bytes]) -> None:
    """``values`` on one partition of ``topic``, in order, acknowledged."""
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "enable.idempotence": True})
    for value in values:
        producer.produce(topic, value=value, partition=partition)
    assert producer.flush(30) == 0


def read_all(consumer: Consumer, topic: str, ends: dict[int, int], batch_size: int, **kwargs) -> list[list]:
    """Every batch ``read_batch`` gives until ``ends`` is empty (at most 100 of them)."""
    batches = []
    while ends:
        assert len(batches) < 100, f"partitions {sorted(ends)} never reached their ends"
        batches.append(read_batch(consumer, topic, ends, batch_size, **kwargs))
    return batches


def test_due_ranges_start_at_the_committed_offsets_and_leave_out_what_is_read(kafka, make_topic, make_group_id):
    topic = make_topic(partitions=3)
    fill(kafka, topic, 0, [b"a0", b"a1", b"a2", b"a3"])
    fill(kafka, topic, 1, [b"b0", b"b1"])
    fill(kafka, topic, 2, [b"c0"])
    consumer = Consumer(consumer_config(kafka.settings(), make_group_id()))
    try:
        assert due_ranges(consumer, topic) == ({0: (0, 4), 1: (0, 2), 2: (0, 1)}, 0)
        consumer.commit(offsets=[TopicPartition(topic, 0, 3), TopicPartition(topic, 2, 1)], asynchronous=False)
        assert due_ranges(consumer, topic) == ({0: (3, 4), 1: (0, 2)}, 0)
    finally:
        consumer.close()


def test_a_missing_topic_is_named(kafka, unique_name):
    consumer = Consumer(consumer_config(kafka.settings(), unique_name("group")))
    missing = unique_name("topic")
    try:
        with pytest.raises(RtcbusError, match=f"topic not found: {missing}"):
            due_ranges(consumer, missing)
        with pytest.raises(RtcbusError, match=f"topic not found: {missing}"):
            partitions_of(consumer, missing)
    finally:
        consumer.close()


def test_batches_stop_at_the_ends_seen_at_the_start_though_more_arrives(kafka, make_topic, make_group_id):
    topic = make_topic(partitions=2)
    fill(kafka, topic, 0, [b"p0-%d" % i for i in range(7)])
    fill(kafka, topic, 1, [b"p1-%d" % i for i in range(3)])
    consumer = Consumer(consumer_config(kafka.settings(), make_group_id()))
    try:
        due, _expired = due_ranges(consumer, topic)
        assert due == {0: (0, 7), 1: (0, 3)}
        # Records that arrive after the start are already there to be fetched: the ends hold.
        fill(kafka, topic, 0, [b"late-0-%d" % i for i in range(5)])
        fill(kafka, topic, 1, [b"late-1-%d" % i for i in range(5)])
        batches = read_all(consumer, topic, assign_due(consumer, topic, due), batch_size=4)
    finally:
        consumer.close()
    assert all(0 < len(batch) <= 4 for batch in batches)
    read = [(m.partition(), m.offset(), m.value()) for batch in batches for m in batch]
    assert sorted(read) == [(0, i, b"p0-%d" % i) for i in range(7)] + [(1, i, b"p1-%d" % i) for i in range(3)]


def test_a_partition_ending_in_a_transaction_marker_is_read_to_its_end(kafka, make_topic, make_group_id, unique_name):
    topic = make_topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "transactional.id": unique_name("txn")})
    producer.init_transactions(30)
    producer.begin_transaction()
    for value in (b"t0", b"t1", b"t2"):
        producer.produce(topic, value=value, partition=0)
    producer.commit_transaction(30)
    consumer = Consumer(consumer_config(kafka.settings(), make_group_id()))
    try:
        due, _expired = due_ranges(consumer, topic)
        assert due == {0: (0, 4)}  # three records and the commit marker at offset 3
        consumer.assign([TopicPartition(topic, 0, 0)])
        # No record at end - 1 ever comes: only the position says the partition is done.
        batches = read_all(consumer, topic, {0: 4}, batch_size=10, stall_s=10)
    finally:
        consumer.close()
    assert [m.value() for batch in batches for m in batch] == [b"t0", b"t1", b"t2"]


def test_a_read_that_gets_no_record_stops_after_the_stall_and_names_the_partitions(kafka, make_topic, make_group_id):
    topic = make_topic(partitions=1)
    consumer = Consumer(consumer_config(kafka.settings(), make_group_id()))
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        with pytest.raises(InfrastructureError, match=rf"no record of {topic} within 2 s, though partitions \[0\]"):
            read_batch(consumer, topic, {0: 1}, 10, stall_s=2)
    finally:
        consumer.close()


def test_read_range_reads_from_the_beginning_to_the_high_watermarks_passing_over_empty_partitions(
    kafka, make_topic, make_group_id
):
    topic = make_topic(partitions=3)
    fill(kafka, topic, 0, [b"x0", b"x1"])
    fill(kafka, topic, 2, [b"z0"])
    reader = Consumer(consumer_config(kafka.settings(), make_group_id()))
    try:
        starts = {p: OFFSET_BEGINNING for p in partitions_of(reader, topic)}
        assert sorted(starts) == [0, 1, 2]
        read = sorted((m.partition(), m.value()) for m in read_range(reader, topic, starts))
        assert reader.assignment() == []
    finally:
        reader.close()
    assert read == [(0, b"x0"), (0, b"x1"), (2, b"z0")]
